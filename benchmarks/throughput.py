"""Meta-training throughput: inner steps per second of a config, and the rule's share of the time.

    python -m benchmarks.throughput          # default.json, 20 meta-steps: benchmarks/results/throughput.{json,md}
    python -m benchmarks.throughput --config meta_train/configs/v2.json --meta-steps 50 --set rule.hidden_channels=16

A short run of ``meta_train.cli.run`` exactly as meta-training makes one (one process, the
config's intra-op threads: one in the shipped configs), writing its rule and checkpoints to a
temporary folder. Inner steps per second are counted as a meta-trained checkpoint's provenance
counts them (every inner step over the wall time of the meta-steps, first task draws included),
so the number compares with the ``inner_steps_per_s`` of real runs; a run of few meta-steps
reads a little low, as its start costs are spread over fewer steps.

The rule's share: the time inside ``LearnedUpdate.forward`` over the wall time (its backward,
inside the meta-gradient, is not counted). Also the rate after the first meta-step, which draws
every slot's first task and fills the caches. On CUDA the timers synchronize around each call.
Only meaningful when nothing else runs on the machine.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import shlex
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from meta_train.cli import run
from meta_train.trainer import MetaConfig, MetaTrainer
from nfopt.optim.rule import LearnedUpdate

from .costs import RESULTS, machine, machine_line, synchronize
from .report import write_measurement

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = ROOT / "meta_train" / "configs" / "default.json"


@contextmanager
def timing(
    cls: type, name: str, device: torch.device, keep: Callable[[Any], Any] = lambda result: None
) -> Iterator[list[tuple[float, Any]]]:
    """While active, every call of the method ``cls.<name>`` appends its wall time and
    ``keep(its result)`` to the list yielded (by default nothing of the result, which may hold
    a graph). On CUDA it synchronizes around each call."""
    original = getattr(cls, name)
    calls: list[tuple[float, Any]] = []

    @functools.wraps(original)
    def timed(self: object, *args: Any, **kwargs: Any) -> Any:
        synchronize(device)
        t0 = time.perf_counter()
        result = original(self, *args, **kwargs)
        synchronize(device)
        calls.append((time.perf_counter() - t0, keep(result)))
        return result

    setattr(cls, name, timed)
    try:
        yield calls
    finally:
        setattr(cls, name, original)


def measure(config: MetaConfig, meta_steps: int) -> dict[str, Any]:
    """Meta-train ``config`` for ``meta_steps`` meta-steps in a temporary folder; its throughput.

    Returns the counts of the run's provenance (``inner_steps``, ``tasks_drawn``,
    ``wall_time_s``, ``inner_steps_per_s``); ``inner_steps_per_s_after_first``, the same over
    the meta-steps after the first (which draws every slot's task and fills the caches); and
    the rule's forward: ``rule_forward_s``, ``rule_forward_calls`` (one per inner step, taken by
    all slots together) and ``rule_forward_share`` of the wall time. This process's intra-op
    thread count is restored.
    """
    threads = torch.get_num_threads()
    device = torch.device(config.device)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "rule.nfopt"
        config = dataclasses.replace(
            config, meta_steps=meta_steps, out=str(out), checkpoint=f"{out}.train.pt", log_dir=""
        )
        try:
            with (
                timing(LearnedUpdate, "forward", device) as forwards,
                timing(MetaTrainer, "meta_step", device, keep=lambda stats: stats["inner_steps"]) as steps,
            ):
                provenance = run(config)
        finally:
            torch.set_num_threads(threads)
    assert provenance is not None  # one process: this is rank 0
    wall = provenance["wall_time_s"]
    later = steps[1:]
    rule_s = sum(t for t, _ in forwards)
    return {
        "meta_steps": provenance["meta_steps"],
        "tasks_per_step": config.tasks_per_step,
        "unroll_length": config.unroll_length,
        "inner_steps": provenance["inner_steps"],
        "tasks_drawn": provenance["tasks_drawn"],
        "wall_time_s": wall,
        "inner_steps_per_s": provenance["inner_steps_per_s"],
        "inner_steps_per_s_after_first": sum(n for _, n in later) / sum(t for t, _ in later) if later else None,
        "rule_forward_s": rule_s,
        "rule_forward_calls": len(forwards),
        "rule_forward_share": rule_s / wall,
    }


def markdown(results: dict[str, Any]) -> str:
    """The results as a table."""
    r = results["run"]
    after = "-" if r["inner_steps_per_s_after_first"] is None else f"{r['inner_steps_per_s_after_first']:.1f}"
    return "\n".join([
        "# Meta-training throughput",
        "",
        f"Measured by `{results['command']}` on {machine_line(results['machine'])}; config `{results['config']}`, "
        f"{r['tasks_per_step']} tasks per meta-step, unrolls of {r['unroll_length']}.",
        "",
        "Only meaningful when nothing else runs on the machine. The rule's share is the time in "
        "`LearnedUpdate.forward` over the wall time (its backward is not counted).",
        "",
        "| meta-steps | inner steps | tasks drawn | wall (s) | inner steps/s | after the first meta-step | "
        "rule forward (s) | rule's share |",
        "|---|---|---|---|---|---|---|---|",
        f"| {r['meta_steps']} | {r['inner_steps']} | {r['tasks_drawn']} | {r['wall_time_s']:.1f} | "
        f"{r['inner_steps_per_s']:.1f} | {after} | {r['rule_forward_s']:.1f} | {r['rule_forward_share']:.0%} |",
    ]) + "\n"


def parse_args(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.throughput", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="JSON file of MetaConfig fields")
    ap.add_argument("--meta-steps", type=int, default=20, help="meta-steps to run (default 20)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="override one config field, as python -m meta_train --set does; repeatable")
    ap.add_argument("--device", choices=("cpu", "cuda"), help="override the config's device")
    ap.add_argument("--out", type=Path, default=RESULTS, help="folder for throughput.json and throughput.md")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    overrides = [*args.overrides, *([f"device={args.device}"] if args.device else [])]
    config = MetaConfig.from_dict(json.loads(args.config.read_text())).with_overrides(overrides)
    run_result = measure(config, args.meta_steps)
    config_path = args.config.resolve()
    results = {
        "command": shlex.join(["python", "-m", "benchmarks.throughput", *argv]),
        "config": str(config_path.relative_to(ROOT) if config_path.is_relative_to(ROOT) else config_path),
        "overrides": overrides,
        "machine": machine(torch.device(config.device), config.threads),
        "run": run_result,
    }
    write_measurement(results, markdown(results), args.out, "throughput")
    return results


if __name__ == "__main__":
    main()
