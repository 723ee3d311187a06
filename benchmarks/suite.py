"""The benchmark suite: which tasks, seeds and optimizers run, in what order, and what they give.

For every task and seed, the learned optimizer, untuned, trains to ``long_factor`` times the
horizon in both of its modes: bare (``NFNOptimizer(model.parameters())``, result ``nfn_bare``) and
told the model's structure (``NFNOptimizer.for_model(model)``, result ``nfn``). Adam, AdamW (weight
decay 0.01) and SGD with momentum train to the horizon at every point of their learning-rate grids
(Adam's always holds 1e-3, the untuned baseline; AdamW's is Adam's unless given); the per-element
ablation, when its checkpoint exists, trains to the horizon. The tuned learning rates are then
selected (:func:`benchmarks.metrics.select_lr`) and tuned Adam is run again to ``long_factor``
times the horizon, for the speed-ups and the long-horizon comparison. Finally each optimizer's
step time and state size are measured on every task in this process, with the workers idle.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from meta_train.tasks import HELD_OUT, Task
from nfopt.io import load_rule
from nfopt.optim.optimizer import default_checkpoint_path

from . import metrics
from .costs import state_bytes_per_param, compare
from .extra_tasks import EXTRA_TASKS
from .runs import (
    ADAMW_WEIGHT_DECAY,
    CURVE_POINTS_PER_HORIZON,
    SGD_MOMENTUM,
    SMOOTHING_FRACTION,
    OptimizerSpec,
    RunSpec,
    TaskSpec,
    build_task,
    execute,
    worker_pool,
)

ADAM_DEFAULT_LR = 1e-3
ADAM_GRID = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2)
SGD_GRID = (1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0)
DEFAULT_ABLATION_CKPT = Path(__file__).parent / "checkpoints" / "per_element.nfopt"
ALL_TASKS: dict[str, TaskSpec] = {t.name: t for t in (*HELD_OUT, *EXTRA_TASKS)}
QUICK_TASKS = ("mlp_digits_w40_tanh", "cnn_digits_c12_tanh", "resmlp6_ln_digits", "transformer_chars")

LEARNED = ("nfn_bare", "nfn")
"""The learned optimizer's two modes, as the results name them: bare, and ``for_model``."""
COST_KEY = {
    "nfn_bare": "nfn_bare",
    "nfn": "nfn",
    "adam_1e-3": "adam",
    "adam_tuned": "adam",
    "adamw_tuned": "adamw",
    "sgd_tuned": "sgd",
    "per_element": "per_element",
}
"""Which timed optimizer each compared one costs the same as (Adam's cost does not depend on its rate)."""
TARGET_TRAIN_WINS = (7, 9)
TARGET_TEST_NO_WORSE = (6, 9)
TARGET_MEDIAN_SPEEDUP = 1.5
"""The bare NFN's targets against tuned Adam on the full suite (9 tasks): training-loss wins on at
least 7 of 9 tasks, a test loss no worse on at least 6 of 9 (fractions of the tasks run when there
are not 9), the transformer among the wins, a median speed-up of at least 1.5, no task whose loss
grows by more than ``metrics.LOSS_GROWTH_LIMIT`` from the horizon to the end of the long run (to a
loss above ``metrics.LOSS_GROWTH_FLOOR``), and
no task whose parameter norm there is more than ``metrics.NORM_RATIO_LIMIT`` times tuned Adam's."""


@dataclass(frozen=True)
class SuiteConfig:
    """What the suite runs. ``horizon`` overrides every task's own; ``ckpt`` None is the packaged default;
    ``adamw_grid`` None is the Adam grid.

    ``workers`` processes (one thread each) share the runs; 1 runs them in this process.
    """

    tasks: tuple[TaskSpec, ...] = tuple(ALL_TASKS.values())
    seeds: int = 3
    horizon: int | None = None
    adam_grid: tuple[float, ...] = ADAM_GRID
    adamw_grid: tuple[float, ...] | None = None
    sgd_grid: tuple[float, ...] = SGD_GRID
    long_factor: int = 5
    ckpt: str | None = None
    ablation_ckpt: str = str(DEFAULT_ABLATION_CKPT)
    workers: int = 1
    timing_blocks: int = 5
    timing_per_block: int = 10
    quick: bool = False

    def __post_init__(self) -> None:
        if ADAM_DEFAULT_LR not in self.adam_grid:
            raise ValueError(f"the Adam grid must hold {ADAM_DEFAULT_LR} (the untuned baseline), got {self.adam_grid}")
        if not self.sgd_grid or not self.grids["adamw"] or min(*self.adam_grid, *self.grids["adamw"], *self.sgd_grid) <= 0:
            raise ValueError("learning-rate grids must be non-empty and positive")
        if self.seeds < 1 or self.long_factor < 1 or (self.horizon is not None and self.horizon < 1):
            raise ValueError(f"seeds, long_factor and horizon must be >= 1, got {self}")
        names = [t.name for t in self.tasks]
        if not names or len(set(names)) != len(names):
            raise ValueError(f"tasks must be non-empty with distinct names, got {names}")

    @property
    def grids(self) -> dict[str, tuple[float, ...]]:
        """The learning-rate grid of each algorithm that is tuned per task."""
        return {"adam": self.adam_grid, "adamw": self.adam_grid if self.adamw_grid is None else self.adamw_grid, "sgd": self.sgd_grid}


def quick_config(**overrides: Any) -> SuiteConfig:
    """A smoke-test configuration: 4 tasks, 2 seeds, horizon 80, 3-point grids, short timing."""
    settings: dict[str, Any] = dict(
        tasks=tuple(ALL_TASKS[n] for n in QUICK_TASKS),
        seeds=2,
        horizon=80,
        adam_grid=(3e-4, 1e-3, 3e-3),
        sgd_grid=(1e-2, 1e-1, 1.0),
        timing_blocks=3,
        timing_per_block=5,
        quick=True,
    )
    return SuiteConfig(**(settings | overrides))


def _shown(path: Path) -> str:
    """``path`` relative to the working directory when it lies below it, so reports do not name a machine's folders."""
    resolved = path.resolve()
    return str(resolved.relative_to(Path.cwd())) if resolved.is_relative_to(Path.cwd()) else str(path)


def checkpoint_info(path: Path, *, per_element: bool) -> dict[str, Any]:
    """Where a checkpoint is, its hash and the provenance meta-training stored in it.

    ``per_element`` says what it must be: the ablation (no pooled or neighbour terms) or not.
    A missing ablation checkpoint is reported as ``missing``; anything else wrong raises.
    """
    if per_element and not path.exists():
        return {"path": _shown(path), "missing": True}
    rule = load_rule(path)
    if rule.config.pooled == per_element:
        want = "a per-element rule (pooled=False)" if per_element else "a pooled NFN rule"
        raise ValueError(f"{path}: expected {want}, the checkpoint has pooled={rule.config.pooled}")
    return {
        "path": _shown(path),
        "missing": False,
        "sha256": hashlib.sha256(path.read_bytes()).hexdigest()[:16],
        "provenance": rule.provenance,
        "config": rule.config.to_dict(),
    }


Plan = dict[str, list[RunSpec]]
"""Runs of one task, grouped: one run per seed in each group."""


def _over_seeds(task: TaskSpec, optimizer: OptimizerSpec, steps: int, seeds: int) -> list[RunSpec]:
    return [RunSpec(task, seed, optimizer, steps) for seed in range(seeds)]


def _grid_key(algorithm: str, lr: float) -> str:
    return f"{algorithm}@{lr:g}"


def _first_plan(task: TaskSpec, config: SuiteConfig, ablation: OptimizerSpec | None) -> Plan:
    horizon, seeds = task.horizon, config.seeds
    plan = {
        name: _over_seeds(task, OptimizerSpec("nfn", ckpt=config.ckpt, bare=name == "nfn_bare"), horizon * config.long_factor, seeds)
        for name in LEARNED
    }
    for algorithm, grid in config.grids.items():
        for lr in grid:
            plan[_grid_key(algorithm, lr)] = _over_seeds(task, OptimizerSpec(algorithm, lr), horizon, seeds)
    if ablation is not None:
        plan["per_element"] = _over_seeds(task, ablation, horizon, seeds)
    return plan


def _run_plans(plans: Sequence[Plan], pool: Executor | None, progress: tqdm) -> list[dict[str, list[dict[str, Any]]]]:
    """Every plan's records, grouped as the plan is."""
    flat = [spec for plan in plans for group in plan.values() for spec in group]
    records = iter(execute(flat, pool, progress))
    return [{name: [next(records) for _ in group] for name, group in plan.items()} for plan in plans]


def _tuned_lr(runs: Mapping[str, list[dict[str, Any]]], algorithm: str, grid: Sequence[float]) -> float:
    return metrics.select_lr({lr: [r["at_horizon"]["train_loss"] for r in runs[_grid_key(algorithm, lr)]] for lr in grid})


def _train_step(task: Task, optimizer: torch.optim.Optimizer, module: torch.nn.Module, batch: tuple) -> Callable[[], None]:
    x, y = batch

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        task.criterion(module(x), y).backward()
        optimizer.step()

    return step


def time_optimizers(
    task_spec: TaskSpec, optimizers: Mapping[str, OptimizerSpec], blocks: int, per_block: int
) -> dict[str, dict[str, float]]:
    """Per optimizer on the task's model: ms per ``step()``, ms per training step, state bytes per parameter.

    Times are medians over alternating blocks (``benchmarks.costs.compare``) on one fixed batch, with
    one thread, as the runs have: on models this small, more threads mostly measure contention.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _time_optimizers(task_spec, optimizers, blocks, per_block)
    finally:
        torch.set_num_threads(threads)


def _time_optimizers(
    task_spec: TaskSpec, optimizers: Mapping[str, OptimizerSpec], blocks: int, per_block: int
) -> dict[str, dict[str, float]]:
    task = build_task(task_spec, 0)
    batch = task.sample_batch(task.generator("data"))
    built = {}
    for name, spec in optimizers.items():
        module = task.build_module(task.generator("init"))
        built[name] = (spec.build(module), module)
    cpu = torch.device("cpu")
    train_ms = compare({k: _train_step(task, o, m, batch) for k, (o, m) in built.items()}, cpu, blocks, per_block)
    step_ms = compare({k: o.step for k, (o, _) in built.items()}, cpu, blocks, per_block)  # gradients left by the above
    return {
        k: {"step_ms": step_ms[k], "train_step_ms": train_ms[k], "state_bytes_per_param": state_bytes_per_param(o)}
        for k, (o, _) in built.items()
    }


def check_same_start(runs: Mapping[str, Sequence[Mapping[str, Any]]]) -> None:
    """Raise unless, seed by seed, every run saw the same first loss (so the same initial weights and
    first batch) and, if it reached the horizon, the same batches up to it."""
    first_losses: dict[int, set[float]] = {}
    checksums: dict[int, set[int]] = {}
    for group in runs.values():
        for r in group:
            first_losses.setdefault(r["seed"], set()).add(r["first_loss"])
            if r["batch_checksum"] is not None:
                checksums.setdefault(r["seed"], set()).add(r["batch_checksum"])
    for name, by_seed in (("first loss", first_losses), ("batch checksum", checksums)):
        for seed, values in by_seed.items():
            if len(values) > 1:
                raise RuntimeError(f"seed {seed}: optimizers did not start alike, {name}s differ: {sorted(values)}")


def _task_result(
    task: TaskSpec,
    runs: dict[str, list[dict[str, Any]]],
    config: SuiteConfig,
    costs: Mapping[str, Mapping[str, float]],
    parameters: int,
    ablation: Mapping[str, Any],
) -> dict[str, Any]:
    check_same_start(runs)
    tuned = {algorithm: _tuned_lr(runs, algorithm, grid) for algorithm, grid in config.grids.items()}
    # name: (run group of the metrics at the horizon, run group of the longest curve, learning rate)
    compared = {
        "nfn_bare": ("nfn_bare", "nfn_bare", None),
        "nfn": ("nfn", "nfn", None),
        "adam_1e-3": (_grid_key("adam", ADAM_DEFAULT_LR), _grid_key("adam", ADAM_DEFAULT_LR), ADAM_DEFAULT_LR),
        "adam_tuned": (_grid_key("adam", tuned["adam"]), "adam_tuned_long", tuned["adam"]),
        "adamw_tuned": (_grid_key("adamw", tuned["adamw"]), _grid_key("adamw", tuned["adamw"]), tuned["adamw"]),
        "sgd_tuned": (_grid_key("sgd", tuned["sgd"]), _grid_key("sgd", tuned["sgd"]), tuned["sgd"]),
    }
    if "per_element" in runs:
        compared["per_element"] = ("per_element", "per_element", None)
    optimizers: dict[str, dict[str, Any]] = {
        name: {"lr": lr, "runs": group, "curve_runs": curve, **metrics.summarise(runs[group]), **costs[COST_KEY[name]]}
        for name, (group, curve, lr) in compared.items()
    }
    if "per_element" not in runs:
        optimizers["per_element"] = {"missing": ablation["path"]}
    reference = runs["adam_tuned_long"]
    ref_steps, ref_curve = reference[0]["curve_steps"], metrics.mean_curve([r["curve"] for r in reference])
    speedups = {
        name: dataclasses.asdict(
            metrics.speedup(ref_steps, ref_curve, metrics.mean_loss([r["smoothed_loss_at_horizon"] for r in runs[name]]), task.horizon)
        )
        for name in (*LEARNED, "per_element")
        if name in runs
    }
    return {
        "name": task.name,
        "config": task.to_dict(),
        "horizon": task.horizon,
        "parameters": parameters,
        "tuned_lr": tuned,
        "grid_final_loss_mean": {
            algorithm: {
                f"{lr:g}": metrics.mean_loss([r["at_horizon"]["train_loss"] for r in runs[_grid_key(algorithm, lr)]])
                for lr in grid
            }
            for algorithm, grid in config.grids.items()
        },
        "optimizers": optimizers,
        "speedup_vs_adam_tuned": speedups,
        "long_horizon": {**{name: metrics.long_horizon(runs[name]) for name in LEARNED}, "adam_tuned": metrics.long_horizon(reference)},
        "runs": runs,
    }


def summary(tasks: Sequence[Mapping[str, Any]], with_ablation: bool) -> dict[str, Any]:
    """Win records of each mode of the NFN against each baseline over tasks, the median speed-ups,
    and against tuned Adam: the test-loss records, the tasks whose loss grows in the long run and
    those whose parameter norm outgrows Adam's; and the bare NFN's targets (:func:`targets`)."""

    def finals(name: str, metric: str = "final_loss_mean") -> list[float]:
        return [t["optimizers"][name][metric] for t in tasks]

    def median(name: str) -> dict[str, Any]:
        return dataclasses.asdict(metrics.median_speedup([metrics.Speedup(**t["speedup_vs_adam_tuned"][name]) for t in tasks]))

    def long(name: str, metric: str) -> list[float]:
        return [t["long_horizon"][name][metric] for t in tasks]

    out: dict[str, Any] = {
        f"{nfn}_vs_{other}": metrics.win_record(finals(nfn), finals(other))
        for nfn in LEARNED
        for other in ("adam_1e-3", "adam_tuned", "adamw_tuned", "sgd_tuned")
    }
    out["nfn_bare_vs_nfn"] = metrics.win_record(finals("nfn_bare"), finals("nfn"))
    for nfn in LEARNED:
        out[f"median_speedup_{nfn}"] = median(nfn)
    if with_ablation:
        out["nfn_vs_per_element"] = metrics.win_record(finals("nfn"), finals("per_element"))
        out["per_element_vs_adam_tuned"] = metrics.win_record(finals("per_element"), finals("adam_tuned"))
        out["median_speedup_per_element"] = median("per_element")
    out["test_loss_vs_adam_tuned"] = {
        nfn: metrics.no_worse_record(finals(nfn, "test_loss_mean"), finals("adam_tuned", "test_loss_mean")) for nfn in LEARNED
    }
    out["loss_growth"] = {
        "limit": metrics.LOSS_GROWTH_LIMIT,
        "floor": metrics.LOSS_GROWTH_FLOOR,
        **{name: sum(metrics.grew(t["long_horizon"][name]) for t in tasks) for name in (*LEARNED, "adam_tuned")},
    }
    adam_norms = long("adam_tuned", "param_norm_at_end_mean")
    out["norm_over_adam"] = {
        "limit": metrics.NORM_RATIO_LIMIT,
        **{
            nfn: metrics.count_above(
                [metrics.ratio(a, b) for a, b in zip(long(nfn, "param_norm_at_end_mean"), adam_norms)], metrics.NORM_RATIO_LIMIT
            )
            for nfn in LEARNED
        },
    }
    out["targets"] = targets(tasks, out, "nfn_bare")
    return out


def _required(fraction: tuple[int, int], tasks: int) -> int:
    """``fraction`` of ``tasks``, rounded up: the stated count itself when ``tasks`` is its denominator."""
    return math.ceil(fraction[0] * tasks / fraction[1] - 1e-9)


def targets(tasks: Sequence[Mapping[str, Any]], summ: Mapping[str, Any], nfn: str) -> list[dict[str, Any]]:
    """The targets (``TARGET_*``) for the learned optimizer ``nfn`` against tuned Adam: for each, what
    it asks, what this run measured, and whether it is met (None where this run cannot tell)."""
    n = len(tasks)
    train, test = summ[f"{nfn}_vs_adam_tuned"], summ["test_loss_vs_adam_tuned"][nfn]
    need_train, need_test = _required(TARGET_TRAIN_WINS, n), _required(TARGET_TEST_NO_WORSE, n)
    transformers = [t for t in tasks if t["name"].startswith("transformer")]
    transformer_wins = [
        metrics.win_record([t["optimizers"][nfn]["final_loss_mean"]], [t["optimizers"]["adam_tuned"]["final_loss_mean"]])["wins"] == 1
        for t in transformers
    ]
    speedup = summ[f"median_speedup_{nfn}"]
    growth, norms = summ["loss_growth"], summ["norm_over_adam"]
    return [
        {
            "target": f"training loss below tuned Adam's on at least {need_train} of {n} tasks",
            "measured": f"{train['wins']} of {n}",
            "met": train["wins"] >= need_train,
        },
        {
            "target": f"test loss no worse than tuned Adam's on at least {need_test} of {n} tasks",
            "measured": f"{test['no_worse']} of {n}",
            "met": test["no_worse"] >= need_test,
        },
        {
            "target": "the transformer among the training-loss wins",
            "measured": ", ".join(f"{t['name']}: {'win' if w else 'no win'}" for t, w in zip(transformers, transformer_wins))
            or "no transformer task in this run",
            "met": all(transformer_wins) if transformers else None,
        },
        {
            "target": f"median speed-up over tuned Adam at least {TARGET_MEDIAN_SPEEDUP:g}",
            "measured": "n/a" if speedup["value"] is None else f"{'≥ ' if speedup['lower_bound'] else ''}{speedup['value']:.2f}",
            "met": speedup["value"] is not None and speedup["value"] >= TARGET_MEDIAN_SPEEDUP,
        },
        {
            "target": f"no task whose loss at the end of the long run exceeds {growth['limit']:g}x its loss at the horizon",
            "measured": f"{growth[nfn]} of {n}",
            "met": growth[nfn] == 0,
        },
        {
            "target": f"no task whose parameter norm at the end of the long run exceeds {norms['limit']:g}x tuned Adam's",
            "measured": f"{norms[nfn]} of {n}",
            "met": norms[nfn] == 0,
        },
    ]


def run_suite(config: SuiteConfig, progress: bool = True) -> dict[str, Any]:
    """Run the whole suite and return its results (JSON-ready apart from non-finite floats)."""
    tasks = [dataclasses.replace(t, horizon=config.horizon) if config.horizon else t for t in config.tasks]
    checkpoint = checkpoint_info(Path(config.ckpt) if config.ckpt else default_checkpoint_path(), per_element=False)
    ablation = checkpoint_info(Path(config.ablation_ckpt), per_element=True)
    ablation_spec = None if ablation["missing"] else OptimizerSpec("nfn", ckpt=config.ablation_ckpt)
    plans = [_first_plan(t, config, ablation_spec) for t in tasks]
    long_steps = [t.horizon * config.long_factor * config.seeds for t in tasks]
    total = sum(s.steps for plan in plans for group in plan.values() for s in group) + sum(long_steps)
    with worker_pool(config.workers) as pool, tqdm(total=total, unit="step", desc="training", disable=not progress) as bar:
        runs = _run_plans(plans, pool, bar)
        tuned_adam = [_tuned_lr(r, "adam", config.adam_grid) for r in runs]
        second = [
            {"adam_tuned_long": _over_seeds(t, OptimizerSpec("adam", lr), t.horizon * config.long_factor, config.seeds)}
            for t, lr in zip(tasks, tuned_adam)
        ]
        for r, extra in zip(runs, _run_plans(second, pool, bar)):
            r.update(extra)
    results = []
    for task, task_runs in zip(tqdm(tasks, desc="timing", disable=not progress), runs):
        timed = {
            "nfn_bare": OptimizerSpec("nfn", ckpt=config.ckpt, bare=True),
            "nfn": OptimizerSpec("nfn", ckpt=config.ckpt),
            "adam": OptimizerSpec("adam", ADAM_DEFAULT_LR),
            "adamw": OptimizerSpec("adamw", _tuned_lr(task_runs, "adamw", config.grids["adamw"])),
            "sgd": OptimizerSpec("sgd", _tuned_lr(task_runs, "sgd", config.sgd_grid)),
        }
        if ablation_spec is not None:
            timed["per_element"] = ablation_spec
        costs = time_optimizers(task, timed, config.timing_blocks, config.timing_per_block)
        parameters = sum(p.numel() for p in build_task(task, 0).model.parameters())
        results.append(_task_result(task, task_runs, config, costs, parameters, ablation))
    return {
        "suite": {
            "quick": config.quick,
            "tasks": [t.name for t in tasks],
            "seeds": config.seeds,
            "horizon_override": config.horizon,
            "adam_grid": list(config.adam_grid),
            "adamw_grid": list(config.grids["adamw"]),
            "adamw_weight_decay": ADAMW_WEIGHT_DECAY,
            "sgd_grid": list(config.sgd_grid),
            "sgd_momentum": SGD_MOMENTUM,
            "long_factor": config.long_factor,
            "workers": config.workers,
            "smoothing_fraction": SMOOTHING_FRACTION,
            "curve_points_per_horizon": CURVE_POINTS_PER_HORIZON,
            "tie_rtol": metrics.TIE_RTOL,
            "divergence_ratio": metrics.DIVERGENCE_RATIO,
            "loss_growth_limit": metrics.LOSS_GROWTH_LIMIT,
            "norm_ratio_limit": metrics.NORM_RATIO_LIMIT,
        },
        "checkpoint": checkpoint,
        "ablation": ablation,
        "summary": summary(results, ablation_spec is not None),
        "tasks": results,
    }
