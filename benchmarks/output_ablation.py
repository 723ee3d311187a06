"""Which output of a learned rule does what: the rule as meta-trained, without its direction d,
and without its step-size scale c.

    python -m benchmarks.output_ablation --ckpt benchmarks/checkpoints/meta_trained_v2.nfopt \\
        --tasks mlp_teacher_unseen,mlp_mixture_deep_gelu

Zeroing the NFN's last layer for one output channel leaves that output at 0: without d the step is
Adam's direction scaled per element by exp(γ·c); without c it is Adam's direction plus the learned
deviation at the meta-learned α. Each variant trains each task for twice its horizon, from the same
weights and batches; the table gives the full training loss at the horizon and at twice it.
Writes ``results/output_ablation.{json,md}``.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from nfopt.io import load_rule, save_rule
from nfopt.optim.rule import LearnedUpdate

from .report import save_experiment
from .runs import OptimizerSpec, RunSpec, train
from .suite import ALL_TASKS

RESULTS = Path(__file__).parent / "results"
OUTPUTS = {"d": 0, "c": 1}


def without(rule: LearnedUpdate, output: str) -> LearnedUpdate:
    """A copy of ``rule`` whose NFN output ``output`` ("d" or "c") is zero everywhere."""
    rule = copy.deepcopy(rule)
    k = OUTPUTS[output]
    with torch.no_grad():
        for name, w in rule.nfn.layers[-1].named_parameters():
            (w[:, k] if name == "bias" else w[..., k, :]).zero_()
    return rule


def ablate(ckpt: str, tasks: Sequence[str], seeds: int) -> list[dict]:
    """Per task and variant, the full training loss at the horizon and at twice it, per seed."""
    rule = load_rule(ckpt)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        paths = {"as trained": ckpt}
        for output in OUTPUTS:
            paths[f"without {output}"] = str(Path(tmp) / f"without_{output}.nfopt")
            save_rule(without(rule, output), paths[f"without {output}"], rule.provenance)
        for name in tasks:
            task = ALL_TASKS[name]
            for variant, path in paths.items():
                records = [train(RunSpec(task, s, OptimizerSpec("nfn", ckpt=path), 2 * task.horizon)) for s in range(seeds)]
                rows.append({
                    "task": name,
                    "variant": variant,
                    "at_horizon": [r["at_horizon"]["train_loss"] for r in records],
                    "at_2x": [r["at_end"]["train_loss"] for r in records],
                })
    return rows


def markdown(rows: list[dict], command: str, seconds: float) -> str:
    lines = [
        "# Output ablation of a learned rule",
        "",
        f"Produced by `{command}` in {seconds / 60:.1f} min. Full training loss, mean over seeds.",
        "",
        "| task | variant | at the horizon | at 2x the horizon |",
        "|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['task']} | {r['variant']} | {statistics.fmean(r['at_horizon']):.4g} | {statistics.fmean(r['at_2x']):.4g} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ckpt", required=True)
    ap.add_argument("--tasks", required=True, help=f"comma-separated, from: {', '.join(ALL_TASKS)}")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    tasks = args.tasks.split(",")
    unknown = [t for t in tasks if t not in ALL_TASKS]
    if unknown:
        ap.error(f"unknown task {unknown[0]!r}")
    start = time.perf_counter()
    rows = ablate(args.ckpt, tasks, args.seeds)
    seconds = time.perf_counter() - start
    save_experiment(args.out, "output_ablation", "benchmarks.output_ablation", argv, rows, seconds, lambda command: markdown(rows, command, seconds))


if __name__ == "__main__":
    main()
