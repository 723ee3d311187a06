"""Benchmark NFNOptimizer, bare and told the model (for_model), against Adam (at 1e-3 and tuned), tuned
AdamW (weight decay 0.01), tuned SGD with momentum and a per-element ablation.

    python -m benchmarks            # the full suite (about 20 min on 2 cores):
                                    #   benchmarks/RESULTS.md, benchmarks/results/{benchmark.json,plots/}
    python -m benchmarks --quick    # a smoke test in under 3 minutes: benchmarks/results/quick/

Tasks: meta_train.tasks.HELD_OUT plus out-of-distribution architectures (benchmarks/extra_tasks.py).
See the report's Protocol section for the definitions of every number.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import torch

from .report import json_ready, write_outputs
from .suite import ALL_TASKS, DEFAULT_ABLATION_CKPT, SuiteConfig, quick_config, run_suite

HERE = Path(__file__).parent


def _grid(text: str) -> tuple[float, ...]:
    return tuple(float(v) for v in text.split(","))


def _tasks(text: str) -> tuple[Any, ...]:
    unknown = [n for n in text.split(",") if n not in ALL_TASKS]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown tasks {unknown}; known: {', '.join(ALL_TASKS)}")
    return tuple(ALL_TASKS[n] for n in text.split(","))


def machine_description() -> str:
    """CPU model, core count and OS, for the report."""
    model = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        model = next((ln.split(":", 1)[1].strip() for ln in cpuinfo.read_text().splitlines() if ln.startswith("model name")), model)
    return f"{model}, {os.cpu_count()} cores, {platform.system()}"


def parse_args(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smoke test: 4 tasks, 2 seeds, horizon 80, 3-point grids")
    ap.add_argument("--tasks", type=_tasks, help=f"comma-separated task names (default: all): {', '.join(ALL_TASKS)}")
    ap.add_argument("--seeds", type=int, help="seeds per task (default 3; 2 with --quick)")
    ap.add_argument("--horizon", type=int, help="steps to the horizon for every task (default: each task's own)")
    ap.add_argument("--adam-grid", type=_grid, help="comma-separated Adam learning rates; must include 1e-3")
    ap.add_argument("--adamw-grid", type=_grid, help="comma-separated AdamW learning rates (default: the Adam grid)")
    ap.add_argument("--sgd-grid", type=_grid, help="comma-separated SGD learning rates")
    ap.add_argument("--ckpt", help="NFN checkpoint to benchmark (default: the one shipped in nfopt)")
    ap.add_argument("--ablation-ckpt", help=f"per-element NFN checkpoint (default: {DEFAULT_ABLATION_CKPT.relative_to(HERE.parent)})")
    ap.add_argument("--workers", type=int, help="worker processes for the runs, one thread each (default: one per core)")
    ap.add_argument("--out", type=Path, help="folder for benchmark.json and plots/ (default results/, results/quick/ with --quick)")
    ap.add_argument("--markdown", type=Path, help="report path (default benchmarks/RESULTS.md; <out>/RESULTS.md with --quick)")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the suite as the command line asks, write its outputs, print the report; return the results."""
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    overrides = {
        field: value
        for field, value in (
            ("tasks", args.tasks),
            ("seeds", args.seeds),
            ("horizon", args.horizon),
            ("adam_grid", args.adam_grid),
            ("adamw_grid", args.adamw_grid),
            ("sgd_grid", args.sgd_grid),
            ("ckpt", args.ckpt),
            ("ablation_ckpt", args.ablation_ckpt),
            ("workers", args.workers if args.workers is not None else os.cpu_count() or 1),
        )
        if value is not None
    }
    config = quick_config(**overrides) if args.quick else SuiteConfig(**overrides)
    out = args.out or HERE / "results" / ("quick" if args.quick else "")
    markdown_path = args.markdown or (out / "RESULTS.md" if args.quick else HERE / "RESULTS.md")
    if config.quick:
        print(
            f"QUICK RUN (smoke test, not the benchmark): {len(config.tasks)} tasks, {config.seeds} seeds, "
            f"horizon {config.horizon}, Adam grid {config.adam_grid}, AdamW grid {config.grids['adamw']}, "
            f"SGD grid {config.sgd_grid}; writing to {out}",
            flush=True,
        )
    start = time.perf_counter()
    results = run_suite(config, progress=not args.no_progress)
    results["run"] = {
        "command": shlex.join(["python", "-m", "benchmarks", *argv]),
        "machine": machine_description(),
        "workers": config.workers,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "wall_time_s": time.perf_counter() - start,
    }
    results = json_ready(results)
    print(write_outputs(results, out, markdown_path))
    print(f"wrote {markdown_path}, {out / 'benchmark.json'} and {out / 'plots'}/ in {results['run']['wall_time_s']:.0f} s")
    return results


if __name__ == "__main__":
    main()
