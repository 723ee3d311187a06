"""The suite's outputs: raw JSON, the markdown report and one loss-curve plot per task.

Everything here reads the JSON form of the results (:func:`json_ready`: non-finite numbers are
``None``), so a report can be rebuilt from a saved ``benchmark.json``, also one saved before an
optimizer or a metric was added: columns and sections of what a run did not measure are left out.

    python -m benchmarks.report benchmarks/results/quick/benchmark.json   # rewrites results/quick/RESULTS.md
    python -m benchmarks.report benchmarks/results/benchmark.json --markdown benchmarks/RESULTS.md
"""

from __future__ import annotations

import argparse
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
    "nfn_bare": "NFN bare",
    "nfn": "NFN for_model",
    "adam_1e-3": "Adam 1e-3",
    "adam_tuned": "Adam tuned",
    "adamw_tuned": "AdamW tuned",
    "sgd_tuned": "SGD+mom. tuned",
    "per_element": "per-element NFN (ablation)",
}
COSTS = {
    "nfn_bare": "NFN bare",
    "nfn": "NFN for_model",
    "adam_1e-3": "Adam",
    "adamw_tuned": "AdamW",
    "sgd_tuned": "SGD+mom.",
    "per_element": "per-element NFN",
}
"""Optimizers whose costs are tabled (tuned Adam costs what Adam at 1e-3 does)."""
LEARNED = ("nfn_bare", "nfn")
LONG = (*LEARNED, "adam_tuned")
"""The optimizers run to the long horizon."""


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


def _record(w: Mapping[str, Any]) -> str:
    return f"{w['wins']} / {w['ties']} / {w['losses']}"


def _wins(w: Mapping[str, Any]) -> str:
    return f"{_record(w)} | {w['win_rate']:.2f}"


def _present(tasks: Sequence[Mapping[str, Any]], names: Sequence[str], where: str = "optimizers") -> list[str]:
    """The ``names`` that the run measured (results saved before an optimizer was added lack it)."""
    return [n for n in names if all(n in t[where] for t in tasks)]


def _bold_lowest(values: Sequence[float | None], cells: list[str]) -> list[str]:
    best = min((v for v in values if v is not None), default=None)
    return [f"**{c}**" if v is not None and v == best else c for v, c in zip(values, cells)]


def _loss_cells(task: Mapping[str, Any], names: Sequence[str]) -> list[str]:
    present = [task["optimizers"][n] for n in names if "missing" not in task["optimizers"][n]]
    best = min((o["final_loss_mean"] for o in present if o["final_loss_mean"] is not None), default=None)
    cells = []
    for name in names:
        o = task["optimizers"][name]
        if "missing" in o:
            cells.append("missing")
            continue
        cell = _num(o["final_loss_mean"])
        if o["final_loss_std"] is not None:
            cell += f" ± {o['final_loss_std']:.2g}"
        if o["final_loss_mean"] is not None and o["final_loss_mean"] == best:
            cell = f"**{cell}**"
        if name.endswith("_tuned"):
            cell += f" (lr {o['lr']:g})"
        cells.append(cell)
    return cells


def _test_loss_cells(task: Mapping[str, Any], names: Sequence[str]) -> list[str]:
    present = [n for n in names if "missing" not in task["optimizers"][n]]
    values = [task["optimizers"][n]["test_loss_mean"] for n in present]
    bold = dict(zip(present, _bold_lowest(values, [_num(v) for v in values])))
    return [bold.get(n, "missing") for n in names]


def _accuracy_cells(task: Mapping[str, Any], names: Sequence[str]) -> list[str]:
    cells = []
    for name in names:
        o = task["optimizers"][name]
        if "missing" in o:
            cells.append("missing")
        elif o["test_accuracy_mean"] is not None:
            cells.append(f"{o['test_accuracy_mean']:.3f}")
        else:
            cells.append("—")
    return cells


def _long_cell(lh: Mapping[str, Any], growth_limit: float | None) -> str:
    """Loss at the horizon → at the end, with (when ``growth_limit`` is given) their ratio, in bold above the limit."""
    diverged = f", **{lh['diverged_seeds']} diverged**" if lh["diverged_seeds"] else ""
    growth = ""
    if growth_limit is not None:
        ratio = lh["end_over_horizon"]
        growth = f"x{_num(ratio, 3)}" if ratio is not None else "x∞"
        growth = f"**{growth}**, " if ratio is None or ratio > growth_limit else f"{growth}, "
    return (
        f"{_num(lh['loss_at_horizon_mean'])} → {_num(lh['loss_at_end_mean'])} "
        f"({growth}max ratio {_num(lh['max_loss_ratio'], 3)}{diverged})"
    )


def _norm_cell(lh: Mapping[str, Any]) -> str:
    return f"{_num(lh['param_norm_at_horizon_mean'])} → {_num(lh['param_norm_at_end_mean'])}"


def _norm_ratio_cell(lh: Mapping[str, Any], adam: Mapping[str, Any], limit: float) -> str:
    a, b = lh["param_norm_at_end_mean"], adam["param_norm_at_end_mean"]
    if a is None or b is None or b <= 0:
        return "n/a"
    return f"**{a / b:.2f}**" if a / b > limit else f"{a / b:.2f}"


def _label(key: str) -> str:
    """A summary key ``<ours>_vs_<theirs>`` in the report's names."""
    ours, theirs = key.split("_vs_")
    return f"{NAMES.get(ours, ours)} vs {NAMES.get(theirs, theirs)}"


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


def _summary_section(suite: Mapping[str, Any], tasks: Sequence[Mapping[str, Any]], summ: Mapping[str, Any]) -> list[str]:
    lines = [
        f"Over {len(tasks)} tasks, {suite['seeds']} seeds each; a win is a lower mean final training loss "
        f"(relative difference above {suite['tie_rtol']:g}, else a tie).",
        "",
        *_table(
            ["comparison", "wins / ties / losses", "win rate"],
            [[_label(key), _wins(w)] for key, w in summ.items() if "_vs_" in key and "wins" in w],
        ),
        "",
    ]
    medians = [
        f"of the {NAMES[name]}: **{_speedup(summ[f'median_speedup_{name}'])}**" if name in LEARNED
        else f"of the per-element ablation: {_speedup(summ[f'median_speedup_{name}'])}"
        for name in (*LEARNED, "per_element")
        if f"median_speedup_{name}" in summ
    ]
    lines += ["Median speed-up over tuned Adam " + "; ".join(medians) + ".", ""]
    if "test_loss_vs_adam_tuned" in summ:
        growth, norms = summ["loss_growth"], summ["norm_over_adam"]
        lines += [
            "### Against tuned Adam",
            "",
            "Test loss: *no worse* is a mean test loss at most tuned Adam's or within the same relative "
            f"{suite['tie_rtol']:g} of it. Loss growth: tasks whose mean final training loss at "
            f"{suite['long_factor']}x the horizon is above {growth['limit']:g}x the one at the horizon"
            + (f" and above {growth['floor']:g} (below it a run has converged)" if "floor" in growth else "")
            + ". Norm: tasks whose "
            f"mean parameter norm at {suite['long_factor']}x the horizon is above {norms['limit']:g}x tuned Adam's there.",
            "",
            *_table(
                [
                    "optimizer",
                    "training loss: wins / ties / losses",
                    "test loss: no worse / worse",
                    "median speed-up",
                    f"loss growth > {growth['limit']:g}x",
                    f"norm > {norms['limit']:g}x Adam's",
                ],
                [
                    [
                        NAMES[nfn],
                        _record(summ[f"{nfn}_vs_adam_tuned"]),
                        f"{summ['test_loss_vs_adam_tuned'][nfn]['no_worse']} / {summ['test_loss_vs_adam_tuned'][nfn]['losses']}",
                        _speedup(summ[f"median_speedup_{nfn}"]),
                        f"{growth[nfn]} of {len(tasks)}",
                        f"{norms[nfn]} of {len(tasks)}",
                    ]
                    for nfn in LEARNED
                ],
            ),
            "",
            f"Tuned Adam's own loss growth > {growth['limit']:g}x: {growth['adam_tuned']} of {len(tasks)} tasks.",
            "",
        ]
    if "targets" in summ:
        caveat = (
            ""
            if not suite["quick"] and suite["seeds"] >= 3 and suite["horizon_override"] is None
            else f" **This run ({len(tasks)} tasks, {suite['seeds']} seeds"
            + (f", horizon {suite['horizon_override']}" if suite["horizon_override"] else "")
            + ") is not the setting the targets are set for** (the full suite: 9 tasks, 3 seeds, each task's horizon); "
            "the task counts are scaled to the tasks run."
        )
        met = {True: "yes", False: "**no**", None: "n/a"}
        lines += [
            "### Targets (NFN bare, against tuned Adam)",
            "",
            "The issue's targets for the bare NFN on the held-out and out-of-distribution tasks. A training-loss "
            "win is a win as above (a tie is not one); test loss as in the table above." + caveat,
            "",
            *_table(["target", "measured", "met?"], [[t["target"], t["measured"], met[t["met"]]] for t in summ["targets"]]),
            "",
        ]
    return lines


def markdown(results: Mapping[str, Any], plots: Sequence[Path], markdown_path: Path) -> str:
    """The report: provenance of the run, summary, per-task tables, definitions and plot links.

    Results saved before the bare NFN, AdamW or the parameter norms were measured render without
    their columns and sections.
    """
    run, suite, tasks, summ = results["run"], results["suite"], results["tasks"], results["summary"]
    names = _present(tasks, NAMES)
    long_names = _present(tasks, LONG, "long_horizon")
    speedup_names = [n for n in (*LEARNED, "per_element") if n in names]
    cost_names = _present(tasks, COSTS)
    with_norms = all("param_norm_at_end_mean" in t["long_horizon"][n] for t in tasks for n in long_names)
    growth_limit = suite.get("loss_growth_limit")
    short = {"nfn_bare": "NFN bare", "nfn": "NFN for_model", "adam_tuned": "tuned Adam", "per_element": "per-element"}
    lines = ["# Benchmarks: NFNOptimizer against Adam" + (", AdamW" if "adamw_tuned" in names else "") + " and SGD", ""]
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
        *_summary_section(suite, tasks, summ),
        "## Final training loss at the horizon",
        "",
        f"Full training-split loss in eval mode after `horizon` steps, mean ± std over {suite['seeds']} seeds; "
        "lowest in bold; the tuned learning rate in brackets.",
        "",
        *_table(
            ["task", "params", "horizon", *(NAMES[n] for n in names)],
            [[t["name"], f"{t['parameters']:,}", str(t["horizon"]), *_loss_cells(t, names)] for t in tasks],
        ),
        "",
        "## Test loss at the horizon",
        "",
        "Full test-split loss in eval mode after `horizon` steps (the training criterion: cross-entropy for classification), "
        "mean over seeds; "
        "lowest in bold.",
        "",
        *_table(["task", *(NAMES[n] for n in names)], [[t["name"], *_test_loss_cells(t, names)] for t in tasks]),
        "",
        "## Test accuracy at the horizon",
        "",
        "Mean over seeds; — for regression tasks (their test loss is above).",
        "",
        *_table(["task", *(NAMES[n] for n in names)], [[t["name"], *_accuracy_cells(t, names)] for t in tasks]),
        "",
        f"## Speed-up and {suite['long_factor']}x the horizon",
        "",
        f"Speed-up: the steps tuned Adam needs to reach the learned optimizer's loss at the horizon, in horizons "
        f"(> 1: the learned optimizer is faster; ≥: Adam never got there in {suite['long_factor']} horizons). "
        f"Long runs: full training loss at the horizon → at {suite['long_factor']}x the horizon"
        + (f" (x: their ratio, in bold above {growth_limit:g})" if growth_limit is not None else "")
        + ", and the largest smoothed loss over the first minibatch loss.",
        "",
        *_table(
            ["task", *(f"speed-up {short[n]}" for n in speedup_names), *(f"{short[n]} to {suite['long_factor']}x" for n in long_names)],
            [
                [
                    t["name"],
                    *(_speedup(t["speedup_vs_adam_tuned"].get(n)) for n in speedup_names),
                    *(_long_cell(t["long_horizon"][n], growth_limit) for n in long_names),
                ]
                for t in tasks
            ],
        ),
        "",
    ]
    if with_norms:
        limit = suite["norm_ratio_limit"]
        learned = [n for n in LEARNED if n in long_names]
        lines += [
            "## Parameter norm",
            "",
            f"L2 norm of all parameters together, mean over seeds: at the horizon → at {suite['long_factor']}x the horizon; "
            f"and each learned optimizer's norm at {suite['long_factor']}x over tuned Adam's there (in bold above {limit:g}).",
            "",
            *_table(
                ["task", *(short[n] for n in long_names), *(f"{short[n]} / tuned Adam at {suite['long_factor']}x" for n in learned)],
                [
                    [
                        t["name"],
                        *(_norm_cell(t["long_horizon"][n]) for n in long_names),
                        *(_norm_ratio_cell(t["long_horizon"][n], t["long_horizon"]["adam_tuned"], limit) for n in learned),
                    ]
                    for t in tasks
                ],
            ),
            "",
        ]
    protocol_nfn = (
        "- NFN bare: `NFNOptimizer(model.parameters())`, every tensor its own weight space; NFN for_model: "
        "`NFNOptimizer.for_model(model)`, the model's structure labelled so that connected layers are coupled; both untuned. "
        if "nfn_bare" in names
        else "- NFN for_model: `NFNOptimizer.for_model(model)`, untuned. "
    )
    adamw = (
        f"AdamW (weight decay {suite['adamw_weight_decay']:g}) tuned over {suite['adamw_grid']}; " if "adamw_tuned" in names else ""
    )
    lines += [
        "## Cost",
        "",
        "Per optimizer: `step()` time / whole training-step time (forward, backward, step) in ms, and bytes "
        "of optimizer state per parameter. Medians over alternating blocks on one fixed batch.",
        "",
        *_table(
            ["task", *(COSTS[k] for k in cost_names)],
            [[t["name"], *(_cost_cell(t["optimizers"][k]) for k in cost_names)] for t in tasks],
        ),
        "",
        "## Protocol",
        "",
        f"- Tasks: `meta_train.tasks.HELD_OUT` and out-of-distribution architectures (`benchmarks/extra_tasks.py`): "
        f"{', '.join(suite['tasks'])}. Horizon: each task's own"
        + (f", overridden to {suite['horizon_override']}" if suite["horizon_override"] else "")
        + ".",
        "- Within a seed, every optimizer starts from the same weights and sees the same minibatches "
        "(generators seeded by the task's seed plus the benchmark seed); the suite checks this.",
        protocol_nfn + "Adam at 1e-3: the untuned baseline. "
        f"Adam tuned over {suite['adam_grid']}; {adamw}SGD (momentum {suite['sgd_momentum']}) tuned over "
        f"{suite['sgd_grid']}: the grid point with the lowest final training loss averaged over seeds "
        "(a diverged seed counts as infinite; ties go to the smaller rate).",
        "- Final training loss: the full training split, eval mode, after `horizon` steps. "
        f"Smoothed loss: the mean minibatch loss over the last {suite['smoothing_fraction']:g} horizons; "
        "speed-ups and plots use it, seed means.",
        f"- Diverged: a non-finite loss, or a smoothed loss above {suite['divergence_ratio']:g}x the first minibatch loss.",
        *(
            [
                "- Test loss no worse: a mean test loss below tuned Adam's or within the relative tie tolerance "
                f"({suite['tie_rtol']:g}) of it. Loss growth: the mean final training loss at {suite['long_factor']}x the "
                f"horizon over that at the horizon (1 when both are 0); non-finite counts as above any limit. "
                "Parameter norm: the square root of the sum of squares over all parameters, mean over seeds."
            ]
            if with_norms
            else []
        ),
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
    """One PNG of the task's loss curves: both NFNs and tuned Adam to the long horizon, the rest to the horizon."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, label in NAMES.items():
        o = task["optimizers"].get(name, {"missing": True})  # results saved before an optimizer was added lack it
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


def rebuild_markdown(json_path: Path, markdown_path: Path | None = None) -> str:
    """Rewrite the report of a saved ``benchmark.json`` (default: ``RESULTS.md`` beside it) from the
    JSON alone, linking the plots saved beside it; nothing is rerun and the plots are left as they are."""
    results = json.loads(json_path.read_text())
    markdown_path = markdown_path or json_path.parent / "RESULTS.md"
    plots = [json_path.parent / "plots" / f"{t['name']}.png" for t in results["tasks"]]
    text = markdown(results, plots, markdown_path)
    markdown_path.write_text(text)
    return text


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m benchmarks.report RESULTS.json [--markdown PATH]``: rebuild a report from its saved results."""
    ap = argparse.ArgumentParser(prog="python -m benchmarks.report", description=rebuild_markdown.__doc__)
    ap.add_argument("json", type=Path, help="a benchmark.json that python -m benchmarks wrote")
    ap.add_argument("--markdown", type=Path, help="the report to write (default: RESULTS.md beside the JSON)")
    args = ap.parse_args(argv)
    rebuild_markdown(args.json, args.markdown)
    print(f"wrote {args.markdown or args.json.parent / 'RESULTS.md'}")


if __name__ == "__main__":
    main()
