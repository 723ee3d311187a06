"""The suite's outputs: raw JSON, the markdown report and one loss-curve plot per task.

Everything here reads the JSON form of the results (:func:`json_ready`: non-finite numbers are
``None``), so a report can be rebuilt from a saved ``benchmark.json``.
"""

from __future__ import annotations

import json
import math
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402 - the backend must be chosen first
import numpy as np  # noqa: E402

NAMES = {
    "nfn": "NFN",
    "adam_1e-3": "Adam 1e-3",
    "adam_tuned": "Adam tuned",
    "sgd_tuned": "SGD+mom. tuned",
    "per_element": "per-element NFN (ablation)",
}
COSTS = {"nfn": "NFN", "adam_1e-3": "Adam", "sgd_tuned": "SGD+mom.", "per_element": "per-element NFN"}
"""Optimizers whose costs are tabled (tuned Adam costs what Adam at 1e-3 does)."""


def json_ready(value: Any) -> Any:
    """``value`` with non-finite floats as ``None`` and tuples as lists, for strict JSON."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(k): json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_ready(v) for v in value]
    return value


def write_json(results: Mapping[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=1, allow_nan=False) + "\n")


def write_measurement(results: Mapping[str, Any], table: str, folder: Path, stem: str) -> None:
    """A measurement's raw JSON and its markdown table, side by side in ``folder``; the table is printed."""
    write_json(json_ready(results), folder / f"{stem}.json")
    (folder / f"{stem}.md").write_text(table)
    print(table)


def command_line(module: str, argv: Sequence[str] | None) -> str:
    """The command that ran ``module`` with ``argv`` (default: this process's arguments), for reports."""
    return " ".join(["python -m", module, *(sys.argv[1:] if argv is None else argv)])


def save_experiment(
    folder: Path,
    stem: str,
    module: str,
    argv: Sequence[str] | None,
    rows: Any,
    seconds: float,
    render: Callable[[str], str],
) -> None:
    """Report an experiment that ``module`` ran with ``argv``: print its markdown (``render`` of the
    command line) and write it as ``<stem>.md``, and the command, time and rows as ``<stem>.json``."""
    command = command_line(module, argv)
    text = render(command)
    print(text)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{stem}.md").write_text(text)
    write_json(json_ready({"command": command, "seconds": seconds, "rows": rows}), folder / f"{stem}.json")


def _num(x: float | None, digits: int = 4) -> str:
    return "∞ (non-finite)" if x is None else f"{x:.{digits}g}"


def _speedup(s: Mapping[str, Any] | None) -> str:
    if s is None:  # the ablation's checkpoint is missing
        return "missing"
    if s["value"] is None:
        return "n/a (own loss non-finite)"
    return f"{'≥ ' if s['lower_bound'] else ''}{s['value']:.2f}"


def _wins(w: Mapping[str, Any]) -> str:
    return f"{w['wins']} / {w['ties']} / {w['losses']} | {w['win_rate']:.2f}"


def _loss_cells(task: Mapping[str, Any]) -> list[str]:
    present = {k: v for k, v in task["optimizers"].items() if "missing" not in v}
    best = min((v["final_loss_mean"] for v in present.values() if v["final_loss_mean"] is not None), default=None)
    cells = []
    for name in NAMES:
        o = task["optimizers"][name]
        if "missing" in o:
            cells.append("missing")
            continue
        cell = _num(o["final_loss_mean"])
        if o["final_loss_std"] is not None:
            cell += f" ± {o['final_loss_std']:.2g}"
        if o["final_loss_mean"] is not None and o["final_loss_mean"] == best:
            cell = f"**{cell}**"
        if name in ("adam_tuned", "sgd_tuned"):
            cell += f" (lr {o['lr']:g})"
        cells.append(cell)
    return cells


def _test_cells(task: Mapping[str, Any]) -> list[str]:
    cells = []
    for name in NAMES:
        o = task["optimizers"][name]
        if "missing" in o:
            cells.append("missing")
        elif o["test_accuracy_mean"] is not None:
            cells.append(f"{o['test_accuracy_mean']:.3f}")
        else:
            cells.append(f"loss {_num(o['test_loss_mean'])}")
    return cells


def _long_cell(lh: Mapping[str, Any]) -> str:
    diverged = f", **{lh['diverged_seeds']} diverged**" if lh["diverged_seeds"] else ""
    return (
        f"{_num(lh['loss_at_horizon_mean'])} → {_num(lh['loss_at_end_mean'])} "
        f"(max ratio {_num(lh['max_loss_ratio'], 3)}{diverged})"
    )


def _cost_cell(o: Mapping[str, Any]) -> str:
    if "missing" in o:
        return "missing"
    return f"{o['step_ms']:.2f} / {o['train_step_ms']:.2f} ms, {o['state_bytes_per_param']:.1f} B"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header), *("| " + " | ".join(r) + " |" for r in rows)]


def _checkpoint_line(label: str, info: Mapping[str, Any]) -> str:
    if info["missing"]:
        return f"- {label}: `{info['path']}` is **missing**; its columns say so (pass `--ablation-ckpt`)."
    return (
        f"- {label}: `{info['path']}` (sha256 `{info['sha256']}`), provenance "
        f"`{json.dumps(info['provenance'], sort_keys=True)}`"
    )


def markdown(results: Mapping[str, Any], plots: Sequence[Path], markdown_path: Path) -> str:
    """The report: provenance of the run, summary, per-task tables, definitions and plot links."""
    run, suite, tasks, summ = results["run"], results["suite"], results["tasks"], results["summary"]
    lines = ["# Benchmarks: NFNOptimizer against Adam and SGD", ""]
    if suite["quick"]:
        lines += [
            "> **Quick run**: a smoke test with fewer tasks, seeds and grid points and a short horizon; "
            "not the benchmark (`python -m benchmarks` is).",
            "",
        ]
    lines += [
        f"Produced by `{run['command']}` in {run['wall_time_s'] / 60:.1f} min on {run['machine']} "
        f"({run['workers']} worker processes, and the timings, on 1 thread each), torch {run['torch']}, "
        f"Python {run['python']}, {run['date']}.",
        "",
        _checkpoint_line("Checkpoint benchmarked (NFN)", results["checkpoint"]),
        _checkpoint_line("Ablation (per-element NFN)", results["ablation"]),
        "",
        "## Summary",
        "",
        f"Over {len(tasks)} tasks, {suite['seeds']} seeds each; a win is a lower mean final training loss "
        f"(relative difference above {suite['tie_rtol']:g}, else a tie).",
        "",
        *_table(
            ["comparison", "wins / ties / losses", "win rate"],
            [[key.replace("_vs_", " vs ").replace("_", " "), _wins(w)] for key, w in summ.items() if "_vs_" in key],
        ),
        "",
        f"Median speed-up of the NFN over tuned Adam: **{_speedup(summ['median_speedup_nfn'])}**"
        + (f"; of the per-element ablation: {_speedup(summ['median_speedup_per_element'])}." if "median_speedup_per_element" in summ else "."),
        "",
        "## Final training loss at the horizon",
        "",
        f"Full training-split loss in eval mode after `horizon` steps, mean ± std over {suite['seeds']} seeds; "
        "lowest in bold; the tuned learning rate in brackets.",
        "",
        *_table(
            ["task", "params", "horizon", *NAMES.values()],
            [[t["name"], f"{t['parameters']:,}", str(t["horizon"]), *_loss_cells(t)] for t in tasks],
        ),
        "",
        "## Test accuracy at the horizon",
        "",
        "Mean over seeds (the test loss for regression tasks).",
        "",
        *_table(["task", *NAMES.values()], [[t["name"], *_test_cells(t)] for t in tasks]),
        "",
        f"## Speed-up and {suite['long_factor']}x the horizon",
        "",
        f"Speed-up: the steps tuned Adam needs to reach the learned optimizer's loss at the horizon, in horizons "
        f"(> 1: the learned optimizer is faster; ≥: Adam never got there in {suite['long_factor']} horizons). "
        f"Long runs: full training loss at the horizon → at {suite['long_factor']}x the horizon, and the largest "
        "smoothed loss over the first minibatch loss.",
        "",
        *_table(
            ["task", "speed-up NFN", "speed-up per-element", f"NFN to {suite['long_factor']}x", f"tuned Adam to {suite['long_factor']}x"],
            [
                [
                    t["name"],
                    _speedup(t["speedup_vs_adam_tuned"].get("nfn")),
                    _speedup(t["speedup_vs_adam_tuned"].get("per_element")),
                    _long_cell(t["long_horizon"]["nfn"]),
                    _long_cell(t["long_horizon"]["adam_tuned"]),
                ]
                for t in tasks
            ],
        ),
        "",
        "## Cost",
        "",
        "Per optimizer: `step()` time / whole training-step time (forward, backward, step) in ms, and bytes "
        "of optimizer state per parameter. Medians over alternating blocks on one fixed batch.",
        "",
        *_table(["task", *COSTS.values()], [[t["name"], *(_cost_cell(t["optimizers"][k]) for k in COSTS)] for t in tasks]),
        "",
        "## Protocol",
        "",
        f"- Tasks: `meta_train.tasks.HELD_OUT` and out-of-distribution architectures (`benchmarks/extra_tasks.py`): "
        f"{', '.join(suite['tasks'])}. Horizon: each task's own"
        + (f", overridden to {suite['horizon_override']}" if suite["horizon_override"] else "")
        + ".",
        "- Within a seed, every optimizer starts from the same weights and sees the same minibatches "
        "(generators seeded by the task's seed plus the benchmark seed); the suite checks this.",
        "- NFN: `NFNOptimizer.for_model(model)`, untuned. Adam at 1e-3: the untuned baseline. "
        f"Adam tuned over {suite['adam_grid']}; SGD (momentum {suite['sgd_momentum']}) tuned over "
        f"{suite['sgd_grid']}: the grid point with the lowest final training loss averaged over seeds "
        "(a diverged seed counts as infinite; ties go to the smaller rate).",
        "- Final training loss: the full training split, eval mode, after `horizon` steps. "
        f"Smoothed loss: the mean minibatch loss over the last {suite['smoothing_fraction']:g} horizons; "
        "speed-ups and plots use it, seed means.",
        f"- Diverged: a non-finite loss, or a smoothed loss above {suite['divergence_ratio']:g}x the first minibatch loss.",
        "",
        "## Plots",
        "",
        "Smoothed minibatch loss, mean over seeds (band: min to max); dashed line: the horizon.",
        "",
        *(f"- [{p.stem}]({os.path.relpath(p, markdown_path.parent)})" for p in plots),
    ]
    return "\n".join(lines) + "\n"


def _curves(runs: Sequence[Mapping[str, Any]]) -> tuple[np.ndarray, np.ndarray]:
    steps = np.asarray(runs[0]["curve_steps"])
    values = np.asarray([[np.nan if v is None else v for v in r["curve"]] for r in runs], dtype=float)
    return steps, values


def plot_task(task: Mapping[str, Any], path: Path) -> Path:
    """One PNG of the task's loss curves: the NFN and tuned Adam to the long horizon, the rest to the horizon."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, label in NAMES.items():
        o = task["optimizers"][name]
        if "missing" in o:
            continue
        steps, values = _curves(task["runs"][o["curve_runs"]])
        if name.endswith("tuned"):
            label += f" (lr {o['lr']:g})"
        style = "--" if name == "adam_1e-3" else "-"  # visible where it coincides with another curve
        (line,) = ax.plot(steps, np.nanmean(values, axis=0), style, label=label, lw=1.4)
        ax.fill_between(steps, np.nanmin(values, axis=0), np.nanmax(values, axis=0), color=line.get_color(), alpha=0.15)
    ax.axvline(task["horizon"], color="grey", ls="--", lw=1)
    ax.set(xlabel="step", ylabel="smoothed training loss", yscale="log", title=task["name"])
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_outputs(results: Mapping[str, Any], out_dir: Path, markdown_path: Path) -> str:
    """Write ``benchmark.json``, ``plots/<task>.png`` under ``out_dir`` and the markdown; return the markdown."""
    write_json(results, out_dir / "benchmark.json")
    plots = [plot_task(t, out_dir / "plots" / f"{t['name']}.png") for t in results["tasks"]]
    text = markdown(results, plots, markdown_path)
    markdown_path.parent.mkdir(parents=True, exist_ok=True)
    markdown_path.write_text(text)
    return text
