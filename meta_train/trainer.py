"""The meta-trainer: several inner runs per meta-step, averaged meta-gradients, meta-Adam.

Each meta-step unrolls one truncation of every task slot, takes each task's meta-gradient
separately (a task whose meta-loss or meta-gradient is non-finite is dropped and counted, so one
diverging task cannot poison the step), averages the rest over every slot of every rank, clips
the average by its norm and applies meta-Adam. A step with no finite task, or a non-finite
average, is skipped and counted; all ranks see the same summed tensor, so they agree on it.

``tasks_per_step`` task slots are shared out over the ranks (rank r holds a contiguous block).
A slot draws a new task when its task reaches its horizon (or diverges); the n-th task of slot s
is a pure function of (seed, s, n). So the ranks train different tasks, and a run over several
processes computes what one process with all the slots computes (the same tasks, the same
average) up to the order of a floating-point sum: bit for bit when two ranks hold one slot each.
The in-flight runs are part of the training state, so a run resumed from a checkpoint replays
exactly what it would have done.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import typing
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from nfopt.optim.rule import LearnedUpdate, UpdateConfig

from . import checkpointing
from .distributed import Group
from .init_rule import init_rule
from .pes import PES
from .tasks.models import ACTIVATIONS
from .tasks import DISTRIBUTIONS, TaskConfig, sample_task_config
from .unroll import LOSS_EPS, InnerRun, unroll_together

OPERATIONAL_FIELDS: frozenset[str] = frozenset(
    {"meta_steps", "device", "threads", "out", "checkpoint", "checkpoint_every", "log_dir", "log_every"}
)
"""Fields a resumed run may change: where it writes, how often, and how long it goes on."""

ESTIMATORS = ("tbptt", "pes")
"""Meta-gradient estimators: truncated backpropagation, persistent evolution strategies."""

CHECKPOINT_FORMAT = 1
"""Version of the training-checkpoint layout (:meth:`MetaTrainer.state_dict`)."""


@dataclass(frozen=True)
class MetaConfig:
    """Every hyper-parameter of a meta-training run.

    ``tasks_per_step``: tasks per meta-step over all processes (a multiple of their number).
    ``horizon_min``/``horizon_max``: inner horizons T are drawn log-uniformly from this range.
    ``first_order``: inner gradients are treated as constants of the rule (cheaper, biased).
    ``loss_eps``: added to the inner loss inside the meta-loss's log. ``val_weight`` w in [0, 1]:
    the weight of the held-out loss in the meta-loss, ``(1 - w)·log(train loss + eps) +
    w·log(held-out loss + eps)`` per inner step; w > 0 holds out a validation split of every
    task's training rows (:mod:`meta_train.unroll`), w = 0 trains on them all with the training
    loss alone. ``estimator``: how the meta-gradient is estimated, ``"tbptt"`` (backpropagation
    through each truncation; ``first_order`` applies) or ``"pes"`` (persistent evolution
    strategies, :mod:`meta_train.pes`: each slot is an antithetic pair of runs of its task at the
    rule's weights ± a Gaussian perturbation of std ``pes_sigma``). ``rule``: the update rule
    meta-trained (its initial weights come from ``seed``). ``activation``: if not empty, every
    task uses this activation (a narrower distribution, for experiments). ``distribution``: the
    task distribution the slots draw from, ``"v1"`` (plain MLPs and CNNs, what every committed
    config trained on) or ``"v2"`` (broader: :mod:`meta_train.tasks.distribution`).
    ``threads``: intra-op threads per process (one per process is fastest for these small tasks;
    use several processes to use several cores). ``checkpoint``: training-checkpoint path, by
    default ``out`` + ``.train.pt``. ``log_dir``: TensorBoard directory, none if empty.
    """

    seed: int = 0
    meta_steps: int = 1000
    tasks_per_step: int = 4
    unroll_length: int = 10
    horizon_min: int = 200
    horizon_max: int = 1000
    meta_lr: float = 1e-3
    clip: float = 1.0
    first_order: bool = False
    loss_eps: float = LOSS_EPS
    val_weight: float = 0.0
    estimator: str = "tbptt"
    pes_sigma: float = 0.01
    activation: str = ""
    distribution: str = "v1"
    rule: UpdateConfig = UpdateConfig()
    device: str = "cpu"
    threads: int = 1
    out: str = "meta_trained.nfopt"
    checkpoint: str = ""
    checkpoint_every: int = 50
    log_dir: str = ""
    log_every: int = 10

    def __post_init__(self) -> None:
        if isinstance(self.rule, dict):
            try:
                object.__setattr__(self, "rule", UpdateConfig(**self.rule))
            except TypeError as e:
                raise ValueError(f"rule: {e}") from e
        for name, field_type in _field_types(MetaConfig).items():
            value = getattr(self, name)
            if field_type is float and isinstance(value, int) and not isinstance(value, bool):
                object.__setattr__(self, name, float(value))
            elif not isinstance(value, field_type) or (field_type is int and isinstance(value, bool)):
                raise ValueError(f"{name} must be a {field_type.__name__}, got {value!r}")
        positive = ("meta_steps", "tasks_per_step", "unroll_length", "horizon_min", "checkpoint_every", "log_every",
                    "threads")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.horizon_max < self.horizon_min:
            raise ValueError(f"horizon_max {self.horizon_max} is below horizon_min {self.horizon_min}")
        if self.meta_lr <= 0 or self.clip <= 0 or self.loss_eps <= 0:
            raise ValueError(
                f"meta_lr, clip and loss_eps must be positive, got {self.meta_lr}, {self.clip}, {self.loss_eps}"
            )
        if not 0.0 <= self.val_weight <= 1.0:
            raise ValueError(f"val_weight must be in [0, 1], got {self.val_weight}")
        if self.estimator not in ESTIMATORS:
            raise ValueError(f"estimator must be one of {ESTIMATORS}, got {self.estimator!r}")
        if self.pes_sigma <= 0:
            raise ValueError(f"pes_sigma must be positive, got {self.pes_sigma}")
        if self.activation and self.activation not in ACTIVATIONS:
            raise ValueError(f"activation must be empty or one of {sorted(ACTIVATIONS)}, got {self.activation!r}")
        if self.distribution not in DISTRIBUTIONS:
            raise ValueError(f"distribution must be one of {DISTRIBUTIONS}, got {self.distribution!r}")
        if self.device not in ("cpu", "cuda"):
            raise ValueError(f"device must be 'cpu' or 'cuda', got {self.device!r}")

    @property
    def checkpoint_path(self) -> str:
        return self.checkpoint or f"{self.out}.train.pt"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> MetaConfig:
        """A config from a dict (a JSON file); unknown keys raise ``ValueError``."""
        unknown = set(d) - set(_field_types(cls))
        if unknown:
            raise ValueError(f"unknown meta-training config fields: {sorted(unknown)}")
        return cls(**d)

    def with_overrides(self, assignments: list[str]) -> MetaConfig:
        """This config with ``key=value`` strings applied, each value parsed as its field's type.

        Dotted keys reach into the rule's config: ``rule.hidden_channels=16``. Values of fields
        that are not int, float, bool or str are read as JSON.
        """
        config = self
        for item in assignments:
            key, sep, text = item.partition("=")
            if not sep:
                raise ValueError(f"an override must look like key=value, got {item!r}")
            config = _assign(config, key.split("."), text, key)
        return config


def _field_types(cls: type) -> dict[str, Any]:
    """Each field of a config dataclass and its type."""
    return {name: field_type for name, field_type in typing.get_type_hints(cls).items() if not name.startswith("_")}


def _assign(obj: Any, path: list[str], text: str, key: str) -> Any:
    """``obj`` (a config dataclass) with the field at ``path`` set from ``text``."""
    types = _field_types(type(obj))
    if path[0] not in types:
        raise ValueError(f"unknown config field {key!r}")
    field_type = types[path[0]]
    if len(path) > 1:
        if not dataclasses.is_dataclass(field_type):
            raise ValueError(f"config field {key!r}: {path[0]} has no fields")
        value = _assign(getattr(obj, path[0]), path[1:], text, key)
    else:
        value = _parse(field_type, text, key)
    return dataclasses.replace(obj, **{path[0]: value})


def _parse(field_type: Any, text: str, key: str) -> Any:
    """``text`` as a value of ``field_type``: int, float and str by their constructors, bool as
    true/false/1/0, anything else as JSON."""
    if field_type is bool:
        if text.lower() not in ("true", "false", "1", "0"):
            raise ValueError(f"{key} takes true or false, got {text!r}")
        return text.lower() in ("true", "1")
    try:
        return field_type(text) if field_type in (int, float, str) else json.loads(text)
    except ValueError as e:
        raise ValueError(f"{key} takes a {getattr(field_type, '__name__', field_type)}, got {text!r}") from e


class MetaTrainer:
    """The rule, its meta-optimizer and this rank's task slots; :meth:`meta_step` is one update.

    All ranks build the same rule from ``config.seed`` and apply the same averaged gradient, so
    their rules stay identical; each rank trains its own block of task slots.
    """

    def __init__(self, config: MetaConfig, group: Group = Group(), device: torch.device | str | None = None) -> None:
        self.config = config
        self.group = group
        self.device = torch.device(config.device if device is None else device)
        self.rule: LearnedUpdate = init_rule(config.rule, config.seed).to(self.device)
        self.params = list(self.rule.parameters())
        self.meta_opt = torch.optim.Adam(self.params, lr=config.meta_lr)
        self.step = 0
        if config.tasks_per_step % group.world_size:
            raise ValueError(f"tasks_per_step {config.tasks_per_step} is not a multiple of the "
                             f"{group.world_size} processes")
        local = config.tasks_per_step // group.world_size
        self.slots = range(group.rank * local, (group.rank + 1) * local)
        self.runs: list[InnerRun | None] = [None] * local
        self.twins: list[InnerRun | None] = [None] * local  # PES: each run's antithetic twin
        self.pes = None
        if config.estimator == "pes":
            self.pes = PES(sum(p.numel() for p in self.params), config.pes_sigma, local, config.seed, self.device)
            self._perturbed = tuple(copy.deepcopy(self.rule).requires_grad_(False) for _ in range(2))
        self.draws = [0] * local
        self.counters = {"inner_steps": 0, "tasks_drawn": 0, "dropped_tasks": 0, "skipped_steps": 0}
        seed = int(np.random.SeedSequence([config.seed, group.rank]).generate_state(1)[0])
        checkpointing.set_global_seeds(seed)

    def task_config(self, slot: int, draw: int) -> TaskConfig:
        """The ``draw``-th task of (global) ``slot``: a pure function of (seed, slot, draw)."""
        rng = np.random.default_rng([self.config.seed, slot, draw])
        horizons = (self.config.horizon_min, self.config.horizon_max)
        return sample_task_config(rng, "train", horizons, self.config.activation or None, self.config.distribution)

    def _run(self, i: int) -> tuple[InnerRun, int]:
        """The run of this rank's ``i``-th slot, a new one if the last is done (with PES, if either
        of the pair is: both start again); and how many tasks were drawn."""
        run, twin = self.runs[i], self.twins[i]
        drawn = 0
        while run is None or run.done or (self.pes is not None and twin.done):
            config = self.task_config(self.slots[i], self.draws[i])
            run = InnerRun.start(config, self.rule.config.features, self.device, holdout=self.config.val_weight > 0)
            if self.pes is not None:  # the same task, initialisation and batches
                twin = InnerRun.start(config, self.rule.config.features, self.device, holdout=self.config.val_weight > 0)
                self.pes.restart(i)
            self.draws[i] += 1
            drawn += 1
        self.runs[i], self.twins[i] = run, twin
        return run, drawn

    def _meta_gradient(self, meta_losses: list[torch.Tensor]) -> tuple[torch.Tensor | None, list[bool]]:
        """The flat meta-gradient summed over the (finite) meta-losses whose gradients are finite,
        and which those are. The runs were unrolled together, so one backward pass of the losses'
        sum serves them all; only where that gradient is not finite is each taken alone, to drop
        the ones at fault."""
        if not meta_losses:
            return None, []

        def flat(loss: torch.Tensor, retain: bool) -> torch.Tensor:
            grads = torch.autograd.grad(loss, self.params, materialize_grads=True, retain_graph=retain)
            return torch.cat([g.reshape(-1) for g in grads])

        several = len(meta_losses) > 1
        total = flat(sum(meta_losses), retain=several)
        if bool(torch.isfinite(total).all()):
            return total, [True] * len(meta_losses)
        if not several:
            return None, [False]
        alone = [flat(m, retain=True) for m in meta_losses]
        kept = [bool(torch.isfinite(g).all()) for g in alone]
        grads = [g for g, k in zip(alone, kept) if k]
        return (torch.stack(grads).sum(0) if grads else None), kept

    def _tbptt(self, runs: list[InnerRun]) -> tuple[torch.Tensor | None, list[tuple[torch.Tensor, dict]], int]:
        """Backpropagation through one truncation of every run: the summed meta-gradient, the kept
        tasks' meta-losses and infos, and the inner steps taken."""
        cfg = self.config
        results = unroll_together(runs, self.rule, cfg.unroll_length, cfg.first_order, cfg.loss_eps, cfg.val_weight)
        finite = [(meta_loss, info) for meta_loss, info in results if torch.isfinite(meta_loss)]
        flat, kept = self._meta_gradient([m for m, _ in finite])
        return flat, [task for task, k in zip(finite, kept) if k], sum(info["steps"] for _, info in results)

    def _pes(self, runs: list[InnerRun]) -> tuple[torch.Tensor | None, list[tuple[torch.Tensor, dict]], int]:
        """PES: each slot's pair unrolled one truncation at the rule's weights ± the slot's
        perturbation; what :meth:`_tbptt` returns, a pair's meta-loss and info being the mean of
        its two runs'."""
        cfg = self.config
        theta = torch.nn.utils.parameters_to_vector(self.params).detach().to(torch.float64)
        plus, minus = self._perturbed
        total, tasks, steps = None, [], 0
        for i, run in enumerate(runs):
            eps = self.pes.perturbation(self.step, self.slots[i])
            self.pes.accumulate(i, eps)
            losses = []
            for rule, member, sign in ((plus, run, 1.0), (minus, self.twins[i], -1.0)):
                torch.nn.utils.vector_to_parameters((theta + sign * eps).to(self.params[0].dtype), rule.parameters())
                (loss, info), = unroll_together([member], rule, cfg.unroll_length, True, cfg.loss_eps, cfg.val_weight)
                losses.append((loss.detach(), info))
                steps += info["steps"]
            (lp, ip), (lm, im) = losses
            estimate = self.pes.estimate(i, lp, lm)
            if not bool(torch.isfinite(estimate).all()):
                continue
            total = estimate if total is None else total + estimate
            tasks.append(((lp + lm) / 2, {
                key: torch.cat([ip[key], im[key]]) if key in ("losses", "val_losses") else (ip[key] + im[key]) / 2
                for key in ip if key != "steps"
            }))
        return total, tasks, steps

    def meta_step(self) -> dict[str, float]:
        """One truncation of every slot and one meta-update; returns this step's statistics (all ranks).

        Statistics: ``meta_loss`` and ``inner_loss`` (means over the finite tasks of all ranks;
        NaN when there were none); with ``val_weight`` > 0 also, so averaged, the meta-loss's
        terms ``log_train_loss`` and ``log_val_loss`` (mean log training and held-out loss) and
        ``val_loss`` (the mean held-out loss); ``grad_norm`` (before clipping), ``inner_steps``,
        ``tasks_drawn``, ``dropped_tasks``, ``skipped`` (1 when the update was skipped), and
        the rule's ``alpha``, ``beta``, ``gamma`` after the update.
        """
        cfg = self.config
        grad_sum = torch.zeros(sum(p.numel() for p in self.params), dtype=torch.float64, device=self.device)
        held_out = cfg.val_weight > 0
        averaged = ("meta_loss", "inner_loss", *(("log_train_loss", "log_val_loss", "val_loss") if held_out else ()))
        keys = ("finite_tasks", *averaged, "inner_steps", "tasks_drawn", "dropped_tasks")
        local = dict.fromkeys(keys, 0.0)
        runs = []
        for i in range(len(self.runs)):
            run, drawn = self._run(i)
            runs.append(run)
            local["tasks_drawn"] += drawn
        flat, tasks, local["inner_steps"] = (self._pes if self.pes is not None else self._tbptt)(runs)
        if flat is not None:
            grad_sum += flat
        for meta_loss, info in tasks:
            local["finite_tasks"] += 1
            local["meta_loss"] += meta_loss.item()
            local["inner_loss"] += info["losses"].mean().item()
            if held_out:
                local["log_train_loss"] += info["log_train_loss"].item()
                local["log_val_loss"] += info["log_val_loss"].item()
                local["val_loss"] += info["val_losses"].mean().item()
        local["dropped_tasks"] += len(runs) - local["finite_tasks"]
        # One all-reduce carries the gradient sum and the statistics of every rank.
        packet = self.group.all_reduce_sum(torch.cat([grad_sum, grad_sum.new_tensor(list(local.values()))]))
        grad_sum = packet[: grad_sum.numel()]
        total = dict(zip(local, packet[grad_sum.numel():].tolist()))
        finite = total.pop("finite_tasks")
        grad_norm = float("nan")
        if finite > 0:
            grad = (grad_sum / finite).to(self.params[0].dtype)
            for p, g in zip(self.params, grad.split([p.numel() for p in self.params])):
                p.grad = g.view_as(p)
            grad_norm = float(torch.nn.utils.clip_grad_norm_(self.params, cfg.clip))
        skipped = not np.isfinite(grad_norm)
        if not skipped:
            self.meta_opt.step()
        self.meta_opt.zero_grad(set_to_none=True)
        self.step += 1
        for key in ("inner_steps", "tasks_drawn", "dropped_tasks"):
            self.counters[key] += int(total[key])
        self.counters["skipped_steps"] += int(skipped)
        with torch.no_grad():
            alpha, beta, gamma = (s.item() for s in self.rule.scalars())
        nan = float("nan")
        return {
            **total,
            **{key: total[key] / finite if finite else nan for key in averaged},
            "grad_norm": grad_norm,
            "skipped": float(skipped),
            "alpha": alpha,
            "beta": beta,
            "gamma": gamma,
        }

    def state_dict(self) -> dict[str, Any] | None:
        """The whole training state on rank 0 (``None`` on other ranks); a collective: every rank calls it.

        Holds the rule, meta-Adam, counters, config, and per rank its in-flight runs, task draw
        counts and global RNG states: enough to continue exactly.
        """
        local = {
            "runs": [None if r is None else r.state_dict() for r in self.runs],
            "twins": [None if r is None else r.state_dict() for r in self.twins],
            "pes": None if self.pes is None else self.pes.state_dict(),
            "draws": list(self.draws),
            "rng": checkpointing.rng_states(),
        }
        ranks = self.group.gather_to_main(local)
        if ranks is None:
            return None
        return {
            "format": CHECKPOINT_FORMAT,
            "config": self.config.to_dict(),
            "world_size": self.group.world_size,
            "step": self.step,
            "counters": dict(self.counters),
            "rule": self.rule.state_dict(),
            "meta_opt": self.meta_opt.state_dict(),
            "ranks": ranks,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from :meth:`state_dict`'s output (every rank loads the same dict)."""
        if state.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(f"training checkpoint format {state.get('format')!r}, expected {CHECKPOINT_FORMAT}")
        if state["world_size"] != self.group.world_size:
            raise ValueError(
                f"the checkpoint was written by {state['world_size']} processes, this run has "
                f"{self.group.world_size}: resume with the same number"
            )
        saved = MetaConfig.from_dict(state["config"])
        changed = sorted(
            f.name for f in dataclasses.fields(saved)
            if f.name not in OPERATIONAL_FIELDS and getattr(saved, f.name) != getattr(self.config, f.name)
        )
        if changed:
            raise ValueError(f"the checkpoint was trained with different values of {changed}; only "
                             f"{sorted(OPERATIONAL_FIELDS)} may change on resume")
        self.rule.load_state_dict(state["rule"])
        self.meta_opt.load_state_dict(state["meta_opt"])
        self.step = state["step"]
        self.counters = dict(state["counters"])
        mine = state["ranks"][self.group.rank]
        self.runs, self.twins = (
            [None if r is None else InnerRun.from_state_dict(r, self.device) for r in mine.get(key) or [None] * len(self.runs)]
            for key in ("runs", "twins")
        )
        if self.pes is not None:
            self.pes.load_state_dict(mine["pes"])
        self.draws = list(mine["draws"])
        checkpointing.set_rng_states(mine["rng"])

