"""The effective learning rates a learned optimizer uses on the benchmark tasks.

    python -m benchmarks.step_sizes                                  # the shipped default, bare
    python -m benchmarks.step_sizes --ckpt my.nfopt --for-model --results benchmarks/results/benchmark.json

A learned step is Adam's direction u = m̂/(sqrt(v̂)+eps) bent and scaled by the NFN. Its
*effective learning rate* on a tensor at a step is ‖Δ‖/‖u‖: the learning rate Adam would need for a
step of the same length from the same statistics (a fresh rule, which is Adam at α, has α at
every step). Per task (benchmark seed 0, the task's horizon, the suite's initial weights and
batches) the report gives the median and the 10th and 90th percentiles over every tensor and
step, the medians over the first, middle and last thirds of the run (how the step size moves in
time), and, given a benchmark run's JSON, the learning rate tuned Adam chose for the task: the
question is whether the rule reaches the step sizes a tuned Adam picks where a task needs them.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from nfopt import NFNOptimizer

from .runs import OptimizerSpec, build_task
from .suite import ALL_TASKS

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "step_sizes.md"


def _adam_direction(opt: NFNOptimizer, p: torch.Tensor) -> torch.Tensor:
    """Adam's bias-corrected direction from ``p``'s statistics after the step just taken."""
    f = opt.rule.config.features
    st = opt.state[p]
    t = float(st["step"].reshape(-1)[0])
    m = st["momenta"][f.adam_momentum] / (1 - f.momentum_decays[f.adam_momentum] ** t)
    v = st["v"] / (1 - f.beta2**t)
    return m / (v.sqrt() + f.eps)


def effective_rates(task_name: str, optimizer: OptimizerSpec, steps: int | None = None, seed: int = 0) -> np.ndarray:
    """‖Δ‖/‖u‖ (steps, tensors) of ``optimizer`` (an NFN) training the benchmark task ``task_name``
    for ``steps`` steps (its horizon by default) from benchmark seed ``seed``; NaN where a tensor's
    direction is zero (no gradient yet)."""
    spec = ALL_TASKS[task_name]
    task = build_task(spec, seed)
    module = task.build_module(task.generator("init"))
    opt = optimizer.build(module)
    if not isinstance(opt, NFNOptimizer):
        raise ValueError(f"effective learning rates are measured for the NFN, got {optimizer.algorithm}")
    params = [p for p in module.parameters() if p.requires_grad]
    data = task.generator("data")
    rates = np.full((steps or spec.horizon, len(params)), np.nan)
    for step in range(rates.shape[0]):
        x, y = task.sample_batch(data)
        opt.zero_grad(set_to_none=True)
        task.criterion(module(x), y).backward()
        before = [p.detach().clone() for p in params]
        opt.step()
        with torch.no_grad():
            for i, (p, b) in enumerate(zip(params, before)):
                if p not in opt.state:
                    continue
                u = _adam_direction(opt, p).norm().item()
                if u > 0:
                    rates[step, i] = (p - b).norm().item() / u
    return rates


def summarise(rates: np.ndarray) -> dict[str, float]:
    """Median and 10th/90th percentiles over all finite entries; medians of each third of the steps."""
    finite = rates[np.isfinite(rates)]
    thirds = np.array_split(rates, 3)
    return {
        "median": float(np.median(finite)),
        "p10": float(np.percentile(finite, 10)),
        "p90": float(np.percentile(finite, 90)),
        **{f"median_{name}": float(np.nanmedian(t)) for name, t in zip(("first", "middle", "last"), thirds)},
    }


def _tuned_rates(results: Mapping[str, Any] | None) -> dict[str, float]:
    if results is None:
        return {}
    return {t["name"]: t["optimizers"]["adam_tuned"]["lr"] for t in results["tasks"]}


def report(rows: Sequence[Mapping[str, Any]], command: str, ckpt: str, alpha: float) -> str:
    """Markdown of the measured rows (each: task, its summary, tuned Adam's rate or None)."""
    lines = [
        "# Effective learning rates of the learned optimizer",
        "",
        f"Produced by `{command}`. Checkpoint `{ckpt}`, α = {alpha:.3g}. The effective learning rate of a "
        "tensor at a step is ‖Δ‖/‖u‖, u Adam's direction from the same statistics (a fresh rule: α at "
        "every step). Benchmark seed 0, each task's horizon.",
        "",
        "| task | median | 10th-90th percentile | median: first / middle / last third | tuned Adam's lr |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        s = r["summary"]
        tuned = "—" if r["tuned_lr"] is None else f"{r['tuned_lr']:g}"
        lines.append(
            f"| {r['task']} | {s['median']:.3g} | {s['p10']:.3g} - {s['p90']:.3g} | "
            f"{s['median_first']:.3g} / {s['median_middle']:.3g} / {s['median_last']:.3g} | {tuned} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.step_sizes", description=__doc__.split("\n\n")[0])
    parser.add_argument("--ckpt", default=None, help="NFN checkpoint (default: the one shipped in nfopt)")
    parser.add_argument("--for-model", action="store_true", help="NFNOptimizer.for_model instead of bare parameters")
    parser.add_argument("--tasks", default=",".join(ALL_TASKS), help="comma-separated benchmark task names")
    parser.add_argument("--results", default=None, help="a benchmark.json whose tuned Adam rates to show")
    parser.add_argument("--out", default=str(DEFAULT_OUT), help="markdown report (a .json beside it)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    optimizer = OptimizerSpec("nfn", ckpt=args.ckpt, bare=not args.for_model)
    tuned = _tuned_rates(json.loads(Path(args.results).read_text()) if args.results else None)
    rows = []
    for name in args.tasks.split(","):
        rows.append({"task": name, "summary": summarise(effective_rates(name, optimizer)), "tuned_lr": tuned.get(name)})
        print(name, rows[-1]["summary"], flush=True)
    alpha = float(NFNOptimizer([torch.zeros(1, requires_grad=True)], ckpt=args.ckpt).rule.scalars()[0].detach())
    argv_shown = " ".join(["python -m benchmarks.step_sizes", *(sys.argv[1:] if argv is None else argv)])
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(report(rows, argv_shown, args.ckpt or "the shipped default", alpha))
    out.with_suffix(".json").write_text(json.dumps({"command": argv_shown, "alpha": alpha, "rows": rows}, indent=1))
    print(f"wrote {out} and {out.with_suffix('.json')}")


if __name__ == "__main__":
    main()
