"""Does sign-flip equivariance help the learned optimizer on tanh networks?

Two rules are meta-trained with the same config, seed and tasks (tanh networks only), one
equivariant to sign flips of the hidden neurons (``rule.sign_flips=true``), one to permutations
only::

    python -m meta_train --config meta_train/configs/sign_tanh.json --set rule.sign_flips=true --out sign.nfopt
    python -m meta_train --config meta_train/configs/sign_tanh.json --out perm.nfopt
    python -m benchmarks.sign_symmetry --sign sign.nfopt --perm perm.nfopt

This compares them on held-out tanh tasks (never drawn in meta-training): final training loss at
each task's horizon over several seeds, the same batches for both. Writes
``results/sign_symmetry.{json,md}``.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from meta_train.tasks import HELD_OUT, TaskConfig, sample_task_config

from .report import save_experiment
from .runs import OptimizerSpec, RunSpec, train

RESULTS = Path(__file__).parent / "results"


def tanh_tasks(n_sampled: int, seed: int = 0) -> list[TaskConfig]:
    """The named held-out tasks with tanh, and ``n_sampled`` held-out tanh tasks drawn from ``seed``."""
    rng = np.random.default_rng([seed, 7])
    sampled = []
    for i in range(n_sampled):
        config = sample_task_config(rng, "held_out", (200, 500), activation="tanh")
        sampled.append(TaskConfig.from_dict({**config.to_dict(), "name": f"sampled{i}_{config.arch}_{config.dataset}"}))
    return [t for t in HELD_OUT if t.activation == "tanh"] + sampled


def final_loss(task: TaskConfig, seed: int, ckpt: str) -> float:
    """Full training loss at the horizon (inf if the run stopped on a non-finite loss)."""
    record = train(RunSpec(task, seed, OptimizerSpec("nfn", ckpt=ckpt), task.horizon))
    return math.inf if record["stopped_nonfinite"] else record["at_horizon"]["train_loss"]


def compare(tasks: Sequence[TaskConfig], seeds: int, ckpts: dict[str, str]) -> list[dict]:
    """Per task, the mean final loss of each rule and the per-seed losses."""
    rows = []
    for task in tasks:
        losses = {name: [final_loss(task, s, path) for s in range(seeds)] for name, path in ckpts.items()}
        rows.append({"task": task.name, "config": task.to_dict(), "losses": losses,
                     "mean": {k: statistics.fmean(v) for k, v in losses.items()}})
    return rows


def markdown(rows: list[dict], command: str, seconds: float) -> str:
    wins = sum(r["mean"]["sign"] < r["mean"]["perm"] for r in rows)
    ratios = [r["mean"]["sign"] / r["mean"]["perm"] for r in rows if r["mean"]["perm"] > 0]
    lines = [
        "# Sign-flip equivariance for tanh networks",
        "",
        f"Produced by `{command}` in {seconds / 60:.1f} min. Final training loss at the horizon, mean over seeds.",
        "",
        "| task | sign-flip equivariant | permutations only | ratio |",
        "|---|---|---|---|",
    ]
    for r in rows:
        s, p = r["mean"]["sign"], r["mean"]["perm"]
        lines.append(f"| {r['task']} | {s:.4g} | {p:.4g} | {s / p if p else math.nan:.3g} |")
    lines += ["", f"Sign-flip equivariant lower on {wins} of {len(rows)} tasks; "
              f"geometric mean ratio {math.exp(statistics.fmean(map(math.log, ratios))):.3g}."]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sign", required=True, help="checkpoint meta-trained with rule.sign_flips=true")
    ap.add_argument("--perm", required=True, help="checkpoint meta-trained with permutations only")
    ap.add_argument("--sampled", type=int, default=5, help="held-out tanh tasks drawn besides the named ones")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    start = time.perf_counter()
    rows = compare(tanh_tasks(args.sampled), args.seeds, {"sign": args.sign, "perm": args.perm})
    seconds = time.perf_counter() - start
    save_experiment(args.out, "sign_symmetry", "benchmarks.sign_symmetry", argv, rows, seconds, lambda command: markdown(rows, command, seconds))


if __name__ == "__main__":
    main()
