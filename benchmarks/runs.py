"""One benchmark run: an optimizer training a task from a seeded start for a number of steps.

A :class:`RunSpec` names the task, the benchmark seed, the optimizer and the number of steps; it
is plain frozen data, so runs can go to worker processes. Within a seed every optimizer starts
from the same initial weights and sees the same minibatches: both come from the task's
generators, seeded by the task's seed plus the benchmark seed. A run records what the suite
measures (:func:`train`): the minibatch loss smoothed over a trailing window, full-split losses,
test metrics and the parameter norm at the horizon and at the end, and fingerprints that let the suite check that
the optimizers really started alike (the first minibatch loss, a checksum of the batches).
"""

from __future__ import annotations

import dataclasses
import math
import multiprocessing
import zlib
from collections.abc import Iterator, Sequence
from concurrent.futures import Executor, ProcessPoolExecutor, as_completed
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from meta_train.tasks import Task, TaskConfig
from nfopt import NFNOptimizer

from .extra_tasks import ExtraTask, ExtraTaskConfig

TaskSpec = TaskConfig | ExtraTaskConfig
"""Any task the suite runs: a meta-training-style task or an out-of-distribution one."""

SGD_MOMENTUM = 0.9
ADAMW_WEIGHT_DECAY = 0.01
"""AdamW's (decoupled) weight decay; its learning rate is tuned like Adam's."""
ALGORITHMS = ("nfn", "adam", "adamw", "sgd")
CURVE_POINTS_PER_HORIZON = 100
"""Points of the recorded loss curve per horizon (the curve keeps this density past the horizon)."""
SMOOTHING_FRACTION = 0.05
"""The smoothed loss at step s is the mean minibatch loss over the last ``horizon·SMOOTHING_FRACTION`` steps."""


@dataclass(frozen=True)
class OptimizerSpec:
    """An optimizer to build for a model: ``algorithm`` is ``"nfn"``, ``"adam"``, ``"adamw"`` (weight
    decay ``ADAMW_WEIGHT_DECAY``) or ``"sgd"`` (momentum ``SGD_MOMENTUM``).

    ``lr`` is the learning rate of Adam, AdamW and SGD (unused by the NFN, which steps as
    meta-trained); ``ckpt`` is the NFN's checkpoint, ``None`` for the one shipped in the package.
    ``bare`` builds the NFN from the parameters alone (``NFNOptimizer(model.parameters())``: every
    tensor its own, unlabelled weight space) instead of ``NFNOptimizer.for_model(model)``, which
    labels the model's structure so that connected layers are coupled.
    """

    algorithm: str
    lr: float | None = None
    ckpt: str | None = None
    bare: bool = False

    def __post_init__(self) -> None:
        if self.algorithm not in ALGORITHMS:
            raise ValueError(f"unknown optimizer algorithm {self.algorithm!r}; expected one of {ALGORITHMS}")
        if (self.algorithm == "nfn") != (self.lr is None):
            raise ValueError(f"adam, adamw and sgd need a learning rate and the NFN takes none, got {self}")
        if self.bare and self.algorithm != "nfn":
            raise ValueError(f"only the NFN has a bare mode, got {self}")

    def build(self, model: nn.Module) -> torch.optim.Optimizer:
        """The optimizer for ``model``'s parameters; the NFN is told the model's structure unless ``bare``."""
        if self.algorithm == "nfn":
            if self.bare:
                return NFNOptimizer(model.parameters(), ckpt=self.ckpt)
            return NFNOptimizer.for_model(model, ckpt=self.ckpt)
        if self.algorithm == "adam":
            return torch.optim.Adam(model.parameters(), lr=self.lr)
        if self.algorithm == "adamw":
            return torch.optim.AdamW(model.parameters(), lr=self.lr, weight_decay=ADAMW_WEIGHT_DECAY)
        return torch.optim.SGD(model.parameters(), lr=self.lr, momentum=SGD_MOMENTUM)


@dataclass(frozen=True)
class RunSpec:
    """Train ``task`` with ``optimizer`` for ``steps`` steps from benchmark seed ``seed``."""

    task: TaskSpec
    seed: int
    optimizer: OptimizerSpec
    steps: int


def build_task(config: TaskSpec, seed: int) -> Task:
    """The task for benchmark seed ``seed``: its generators are seeded by ``config.seed + seed``."""
    config = dataclasses.replace(config, seed=config.seed + seed)
    return ExtraTask(config) if isinstance(config, ExtraTaskConfig) else Task(config)


def curve_stride(horizon: int) -> int:
    """Steps between recorded points of a loss curve."""
    return max(1, horizon // CURVE_POINTS_PER_HORIZON)


def smoothing_window(horizon: int) -> int:
    """Minibatch losses averaged into one smoothed loss."""
    return max(1, round(horizon * SMOOTHING_FRACTION))


def smoothed_curve(losses: Sequence[float], horizon: int) -> tuple[list[int], list[float]]:
    """Steps ``stride, 2·stride, ..`` up to ``len(losses)`` (and ``horizon``) and the trailing-window mean loss at each.

    ``losses[t]`` is the minibatch loss seen by step ``t + 1``; the value at step ``s`` averages
    ``losses[s - w : s]`` (fewer at the start). Once a loss is non-finite, every later value is inf.
    """
    values = np.asarray(losses, dtype=np.float64)
    bad = np.flatnonzero(~np.isfinite(values))
    first_bad = int(bad[0]) if len(bad) else len(values)
    cumulative = np.concatenate([[0.0], np.cumsum(np.where(np.isfinite(values), values, 0.0))])
    stride, window = curve_stride(horizon), smoothing_window(horizon)
    steps = sorted({*range(stride, len(values) + 1, stride), *([horizon] if horizon <= len(values) else [])})
    curve = [
        float((cumulative[s] - cumulative[max(0, s - window)]) / (s - max(0, s - window))) if s <= first_bad else math.inf
        for s in steps
    ]
    return steps, curve


def param_norm(module: nn.Module) -> float:
    """The L2 norm of all of ``module``'s parameters together: the square root of their summed squares."""
    return math.sqrt(sum(p.detach().double().square().sum().item() for p in module.parameters()))


@torch.no_grad()
def evaluate(task: Task, module: nn.Module) -> dict[str, float | None]:
    """Full training-split loss, test metrics (in eval mode; ``test_accuracy`` is None for regression)
    and the parameter norm (:func:`param_norm`)."""
    params, buffers = dict(module.named_parameters()), dict(module.named_buffers())
    test = task.test_metrics(params, buffers)
    return {
        "train_loss": task.full_train_loss(params, buffers).item(),
        "test_loss": test["loss"],
        "test_accuracy": test.get("accuracy"),
        "param_norm": param_norm(module),
    }


def _batch_checksum(x: torch.Tensor, y: torch.Tensor, checksum: int) -> int:
    for t in (x, y):
        checksum = zlib.crc32(t.detach().cpu().contiguous().numpy().tobytes(), checksum)
    return checksum


def train(spec: RunSpec) -> dict[str, Any]:
    """Run ``spec`` and return its record (JSON-ready, apart from non-finite floats).

    The run stops early at the first non-finite minibatch loss. ``at_horizon`` and ``at_end`` are
    :func:`evaluate` after ``horizon`` and after all steps (``at_end`` is None when they coincide);
    ``batch_checksum`` covers the batches of the first ``horizon`` steps (None if the run stopped before).
    """
    horizon = spec.task.horizon
    if spec.steps < horizon:
        raise ValueError(f"a run must reach the horizon ({horizon} steps), got {spec.steps} steps")
    task = build_task(spec.task, spec.seed)
    module = task.build_module(task.generator("init"))
    optimizer = spec.optimizer.build(module)
    data = task.generator("data")
    losses: list[float] = []
    checksum = 0
    at_horizon = None
    for step in range(spec.steps):
        if step == horizon:
            at_horizon = evaluate(task, module)
        x, y = task.sample_batch(data)
        if step < horizon:
            checksum = _batch_checksum(x, y, checksum)
        optimizer.zero_grad(set_to_none=True)
        loss = task.criterion(module(x), y)
        losses.append(loss.item())
        if not math.isfinite(losses[-1]):
            break
        loss.backward()
        optimizer.step()
    losses += [math.inf] * (spec.steps - len(losses))
    at_end = evaluate(task, module)
    steps, curve = smoothed_curve(losses, horizon)
    max_ratio = max(curve) / losses[0] if math.isfinite(losses[0]) and losses[0] > 0 else math.inf
    return {
        "seed": spec.seed,
        "optimizer": dataclasses.asdict(spec.optimizer),
        "steps": spec.steps,
        "first_loss": losses[0],
        "batch_checksum": checksum if all(map(math.isfinite, losses[:horizon])) else None,
        "curve_steps": steps,
        "curve": curve,
        "smoothed_loss_at_horizon": curve[steps.index(horizon)],
        "at_horizon": at_end if at_horizon is None else at_horizon,
        "at_end": None if at_horizon is None else at_end,
        "max_loss_ratio": max_ratio,
        "stopped_nonfinite": not math.isfinite(losses[-1]),
    }


def _init_worker() -> None:
    """Workers run one run each at a time: one thread apiece shares the cores without contention."""
    torch.set_num_threads(1)


@contextmanager
def worker_pool(workers: int) -> Iterator[Executor | None]:
    """A pool of ``workers`` processes, or ``None`` (run in this process) for ``workers <= 1``."""
    if workers <= 1:
        yield None
        return
    context = multiprocessing.get_context("spawn")  # forking a process that has run torch can deadlock
    with ProcessPoolExecutor(workers, mp_context=context, initializer=_init_worker) as pool:
        yield pool


def execute(specs: Sequence[RunSpec], pool: Executor | None, progress: tqdm) -> list[dict[str, Any]]:
    """Every run's record, in the order of ``specs``; ``progress`` advances by each run's steps."""
    if pool is None:
        records = []
        for spec in specs:
            records.append(train(spec))
            progress.update(spec.steps)
        return records
    order = sorted(range(len(specs)), key=lambda i: -specs[i].steps)  # long runs first: less idle tail
    futures = {pool.submit(train, specs[i]): i for i in order}
    out: list[dict[str, Any] | None] = [None] * len(specs)
    for future in as_completed(futures):
        i = futures[future]
        out[i] = future.result()
        progress.update(specs[i].steps)
    return out  # type: ignore[return-value]
