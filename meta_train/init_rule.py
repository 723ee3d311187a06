"""Write a freshly initialised learned update rule: exactly Adam until meta-trained.

    python -m meta_train.init_rule --out nfopt/default.nfopt --seed 0
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from nfopt.io import save_rule
from nfopt.optim.rule import LearnedUpdate, UpdateConfig


def init_rule(config: UpdateConfig, seed: int) -> LearnedUpdate:
    """A rule whose NFN is randomly initialised from ``seed`` and whose last layer is zero."""
    torch.manual_seed(seed)
    return LearnedUpdate(config)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--config", type=str, default="{}", help="UpdateConfig fields as JSON")
    args = ap.parse_args(argv)
    config = UpdateConfig(**json.loads(args.config))
    save_rule(
        init_rule(config, args.seed),
        args.out,
        provenance={"meta_trained": False, "seed": args.seed, "note": "initialisation: steps exactly as Adam(lr=alpha)"},
    )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
