"""Two runs of ``python -m benchmarks`` side by side: the learned optimizer of each, task by task.

    python -m benchmarks.side_by_side benchmarks/results/a/benchmark.json benchmarks/results/b/benchmark.json
    python -m benchmarks.side_by_side A.json B.json --names three-pass two-pass --out comparison.md
    python -m benchmarks.side_by_side A.json B.json --optimizer nfn_bare   # the bare NFN of each run

For comparing two checkpoints benchmarked on the same tasks, seeds and batches (each run also
measures the baselines, so each NFN is judged against its own run's tuned Adam): per task the
final training loss at the horizon, the test accuracy (test loss for regression), the loss at 5x
the horizon and the speed-up over tuned Adam, then how many tasks each wins against Adam at
1e-3 and against tuned Adam. The learned optimizer compared is the ``for_model`` one (``nfn``, the
only one of runs saved before the bare mode was benchmarked) unless ``--optimizer nfn_bare``.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .metrics import win_record
from .report import _num, _speedup, _table


def _test(o: Mapping[str, Any]) -> str:
    return f"{o['test_accuracy_mean']:.3f}" if o["test_accuracy_mean"] is not None else f"loss {_num(o['test_loss_mean'])}"


def _record(tasks: Sequence[Mapping[str, Any]], rival: str, nfn: str = "nfn") -> str:
    """The NFN's (``nfn``'s) wins / ties / losses against ``rival`` by the suite's own rule."""
    w = win_record(*([t["optimizers"][name]["final_loss_mean"] for t in tasks] for name in (nfn, rival)))
    return f"{w['wins']} / {w['ties']} / {w['losses']}"


def side_by_side(runs: Sequence[Mapping[str, Any]], names: Sequence[str], nfn: str = "nfn") -> str:
    """A markdown report of the NFN (``nfn``: ``"nfn"``, for_model, or ``"nfn_bare"``) of each run on
    the tasks the runs share, in the first run's order."""
    tasks = [{t["name"]: t for t in run["tasks"]} for run in runs]
    for name, run in zip(names, runs):
        if any(nfn not in t["optimizers"] for t in run["tasks"]):
            raise ValueError(f"run {name} has no {nfn!r} results (saved before that optimizer was benchmarked?)")
    shared = [t["name"] for t in runs[0]["tasks"] if all(t["name"] in by_name for by_name in tasks)]
    header = ["task"] + [f"{column}, {name}" for column in ("final loss", "test", "at 5x", "speed-up") for name in names]
    rows = []
    for task in shared:
        per_run = [by_name[task] for by_name in tasks]
        learned = [t["optimizers"][nfn] for t in per_run]
        rows.append(
            [task]
            + [_num(o["final_loss_mean"]) for o in learned]
            + [_test(o) for o in learned]
            + [_num(t["long_horizon"][nfn]["loss_at_end_mean"]) for t in per_run]
            + [_speedup(t["speedup_vs_adam_tuned"][nfn]) for t in per_run]
        )
    wins = [
        f"- {name}, wins / ties / losses in final training loss over {len(shared)} tasks (against its own run's "
        f"baselines): vs Adam 1e-3 {_record([by_name[t] for t in shared], 'adam_1e-3', nfn)}, "
        f"vs tuned Adam {_record([by_name[t] for t in shared], 'adam_tuned', nfn)}"
        for name, by_name in zip(names, tasks)
    ]
    checkpoints = [f"- {name}: `{run['checkpoint']['path']}`" + (" (bare NFN)" if nfn == "nfn_bare" else "") for name, run in zip(names, runs)]
    return "\n".join([*checkpoints, "", *_table(header, rows), "", *wins, ""])


def main(argv: list[str] | None = None) -> str:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.side_by_side", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", type=Path, nargs=2, help="two benchmark.json files")
    ap.add_argument("--names", nargs=2, help="what to call the two runs (default: their folders)")
    ap.add_argument("--out", type=Path, help="write the report here too")
    ap.add_argument("--optimizer", choices=("nfn", "nfn_bare"), default="nfn",
                    help="the learned optimizer to compare: for_model (nfn, default) or bare (nfn_bare)")
    args = ap.parse_args(argv)
    names = args.names or [p.parent.name for p in args.runs]
    text = side_by_side([json.loads(p.read_text()) for p in args.runs], names, args.optimizer)
    if args.out:
        args.out.write_text(text)
    print(text)
    return text


if __name__ == "__main__":
    main()
