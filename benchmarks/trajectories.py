"""Fingerprints of the learned optimizer's trajectories, to check that a change keeps behaviour.

For every benchmark task (seed 0) the optimizer trains the task's model for ``--steps`` steps on
the suite's batches, once with ``NFNOptimizer.for_model`` and once with bare parameters. A record
keeps the minibatch losses and a sha256 of the final parameters' bytes, so two runs of this
command before and after a change say whether it left every trajectory bit-identical, and if not,
how far the losses moved::

    python -m benchmarks.trajectories --out before.json
    python -m benchmarks.trajectories --out after.json --compare before.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from nfopt import NFNOptimizer

from .runs import build_task
from .suite import ALL_TASKS

MODES = ("for_model", "bare")


def trajectory(task_name: str, mode: str, steps: int, ckpt: str | None) -> dict[str, Any]:
    """Losses and the final parameters' hash of one run of the learned optimizer."""
    task = build_task(ALL_TASKS[task_name], 0)
    module = task.build_module(task.generator("init"))
    if mode == "for_model":
        opt = NFNOptimizer.for_model(module, ckpt=ckpt)
    else:
        opt = NFNOptimizer(module.parameters(), ckpt=ckpt)
    data = task.generator("data")
    losses = []
    for _ in range(steps):
        x, y = task.sample_batch(data)
        opt.zero_grad(set_to_none=True)
        loss = task.criterion(module(x), y)
        losses.append(loss.item())
        loss.backward()
        opt.step()
    digest = hashlib.sha256()
    for name, p in module.named_parameters():
        digest.update(name.encode())
        digest.update(p.detach().cpu().contiguous().numpy().tobytes())
    return {"losses": losses, "params_sha256": digest.hexdigest()}


def record(tasks: Sequence[str], steps: int, ckpt: str | None) -> dict[str, Any]:
    torch.set_num_threads(1)  # thread count changes reduction order, hence bits
    return {f"{t}/{m}": trajectory(t, m, steps, ckpt) for t in tasks for m in MODES}


def compare(ours: dict[str, Any], theirs: dict[str, Any]) -> list[str]:
    """One line per run: identical, or the largest relative change of a minibatch loss."""
    lines = []
    for key in sorted(set(ours) | set(theirs)):
        if key not in ours or key not in theirs:
            lines.append(f"{key}: only in {'this' if key in ours else 'the other'} record")
            continue
        a, b = ours[key], theirs[key]
        if a["params_sha256"] == b["params_sha256"] and a["losses"] == b["losses"]:
            lines.append(f"{key}: bit-identical")
            continue
        rel = max(
            (abs(x - y) / max(abs(y), 1e-12) if math.isfinite(x) and math.isfinite(y) else math.inf)
            for x, y in zip(a["losses"], b["losses"])
        )
        lines.append(f"{key}: differs (parameters {'equal' if a['params_sha256'] == b['params_sha256'] else 'differ'}, max relative loss change {rel:.3g})")
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--tasks", default=",".join(ALL_TASKS), help="comma-separated task names")
    ap.add_argument("--ckpt", default=None, help="checkpoint (default: the one shipped in the package)")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--compare", type=Path, help="an earlier record; exit 1 unless every run is bit-identical")
    args = ap.parse_args(argv)
    ours = record(args.tasks.split(","), args.steps, args.ckpt)
    args.out.write_text(json.dumps(ours) + "\n")
    if args.compare is None:
        return 0
    lines = compare(ours, json.loads(args.compare.read_text()))
    print("\n".join(lines))
    return 0 if all(line.endswith("bit-identical") for line in lines) else 1


if __name__ == "__main__":
    raise SystemExit(main())
