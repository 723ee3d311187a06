"""Truncated unrolled training of one task by a learned update rule.

An :class:`InnerRun` is one task being trained from its initialisation to its horizon T, a
truncation of K steps at a time. Each truncation unrolls K steps of the rule on the task's
functional loss and returns the meta-loss, the mean over the unroll of log(inner loss + eps):
log makes it scale-free across tasks, and eps keeps an exactly-zero float32 loss finite. Its
graph reaches the rule's parameters (NFN weights and log-scalars) through every step. Between
truncations the parameters, buffers, optimizer statistics and the last gradient are carried
over detached, so memory does not grow with T and no graph reaches back into an earlier
truncation.

Each inner step evaluates the loss once: the forward pass at the new parameters is both a term of
the meta-loss and the gradient of the next step (the last one is carried to the next truncation,
so a truncation of K steps costs K forward/backward passes of the task, plus one at the start of
a task).

With a validation weight w > 0 the meta-loss rewards generalisation: each step's term is
``(1 - w)·log(train loss + eps) + w·log(held-out loss + eps)``, the held-out loss being the
task's loss in eval mode on a batch of its validation split (as large as a training batch, from
a generator stream of its own) at the parameters after the step. The runs must then be started
with ``holdout=True``, so that their training batches never draw those rows. It costs one
forward pass of the task per inner step (and its backward in the meta-gradient); at w = 0 none
is computed and the meta-loss is the training term alone, as before.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import torch

from nfopt.optim.features import FeatureConfig, init_state
from nfopt.labelling import label_model
from nfopt.optim.rule import LearnedUpdate
from nfopt.labelling.monomial import label_monomial
from nfopt.weight_space import MonomialSpec, WeightSpaceSpec, batch

from .tasks import Task, TaskConfig

LOSS_EPS = 1e-8
"""Added to the inner loss inside the meta-loss's log."""

_SPECS: dict[tuple[str, tuple[int, ...], bool, str], WeightSpaceSpec | MonomialSpec] = {}


def task_spec(task: Task, sign_flips: bool = False) -> WeightSpaceSpec | MonomialSpec:
    """The labelled weight space of a task's model, inferred once per architecture and input shape.

    The model's repr names every layer and its shape. Example inputs let the labelling couple
    across shape-dependent operations (a CNN's flatten before its head). Reusing one spec object
    also lets the NF-layers' per-spec plan cache hit at once. ``sign_flips``: the monomial spec
    with the sets that admit sign flips (for a rule equivariant to them). A task whose config's
    ``labelling`` is ``"bare"`` gets :meth:`WeightSpaceSpec.independent` of its parameters (named
    like them): no set is shared between tensors, as when a rule is handed parameters without
    their model (and, with ``sign_flips``, no set admits them).
    """
    labelling = getattr(task.config, "labelling", "coupled")
    key = (repr(task.model), task.dataset.input_shape, sign_flips, labelling)
    spec = _SPECS.get(key)
    if spec is None:
        example = (task.dataset.x_train[:2],)
        if labelling == "bare":
            named = list(task.model.named_parameters())
            spec = WeightSpaceSpec.independent([p.shape for _, p in named], [n for n, _ in named])
            if sign_flips:
                spec = MonomialSpec.permutations_only(spec)
        elif sign_flips:
            spec = label_monomial(task.model, example).params.only("sign")
        else:
            spec = label_model(task.model, example).params
        _SPECS[key] = spec
    return spec


class InnerRun:
    """One task in training: its parameters, buffers, optimizer statistics, step and batch generator.

    Everything it holds is detached. ``grads`` and ``loss`` are the gradient and loss at
    ``params`` on the last batch drawn: the input of the next step. ``val_generator`` draws the
    validation batches of a task built with ``holdout`` (``None`` otherwise).
    """

    def __init__(
        self,
        task: Task,
        params: list[torch.Tensor],
        buffers: dict[str, torch.Tensor],
        states: list[dict[str, torch.Tensor]],
        grads: list[torch.Tensor],
        loss: torch.Tensor,
        step: int,
        data_generator: torch.Generator,
        diverged: bool = False,
        val_generator: torch.Generator | None = None,
    ) -> None:
        self.task = task
        self.names = tuple(name for name, _ in task.model.named_parameters())
        self.params, self.buffers, self.states = params, buffers, states
        self.grads, self.loss = grads, loss
        self.step = step
        self.data_generator = data_generator
        self.diverged = diverged
        self.val_generator = val_generator

    @classmethod
    def start(
        cls, config: TaskConfig, features: FeatureConfig, device: torch.device | str = "cpu", holdout: bool = False
    ) -> InnerRun:
        """A task at its seeded initialisation, with the gradient of its first batch; ``holdout``
        keeps its validation split out of training (:class:`Task`) for a held-out meta-loss."""
        task = Task(config, device, holdout=holdout)
        names = [name for name, _ in task.model.named_parameters()]
        init = task.init_params(task.generator("init"))
        leaves = [init[name].detach().requires_grad_() for name in names]
        data_generator = task.generator("data")
        loss, buffers = task.loss(dict(zip(names, leaves)), task.buffers(), *task.sample_batch(data_generator))
        grads = list(torch.autograd.grad(loss, leaves))
        params = [p.detach() for p in leaves]
        states = [init_state(p, features) for p in params]
        loss = loss.detach()
        val_generator = task.generator("val") if holdout else None
        return cls(task, params, buffers, states, grads, loss, 0, data_generator, not bool(torch.isfinite(loss)),
                   val_generator)

    @property
    def horizon(self) -> int:
        return self.task.config.horizon

    @property
    def done(self) -> bool:
        """The horizon is reached, or the task diverged (a non-finite loss): time for a new task."""
        return self.diverged or self.step >= self.horizon

    def unroll(
        self, rule: LearnedUpdate, length: int, first_order: bool, eps: float = LOSS_EPS, val_weight: float = 0.0
    ) -> tuple[torch.Tensor, dict[str, Any]]:
        """Train ``length`` steps (fewer if the horizon comes first); return the meta-loss and info.

        ``first_order`` computes inner gradients without a graph (the meta-gradient ignores how
        the rule's steps change later gradients: cheaper, biased); otherwise the graph of each
        inner gradient is kept (``create_graph``) and the meta-gradient is exact for the
        truncation. ``val_weight`` w weighs in the held-out loss (see the module's doc; the run
        must have been started with ``holdout``). ``info`` holds ``losses`` (the detached inner
        losses of the unroll, a 1-d tensor) and ``steps``; with w > 0 also ``val_losses`` (the
        held-out losses) and ``log_train_loss`` and ``log_val_loss``, the two terms of the
        meta-loss (detached). :func:`unroll_together` does this for several runs at once.
        """
        return unroll_together([self], rule, length, first_order, eps, val_weight)[0]

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue this run exactly, as tensors and plain values (CPU)."""
        return {
            "task": self.task.config.to_dict(),
            "params": [p.cpu() for p in self.params],
            "buffers": {k: b.cpu() for k, b in self.buffers.items()},
            "states": [{k: v.cpu() for k, v in s.items()} for s in self.states],
            "grads": [g.cpu() for g in self.grads],
            "loss": self.loss.cpu(),
            "step": self.step,
            "data_generator": self.data_generator.get_state(),
            "diverged": self.diverged,
            "holdout": self.task.holdout,
            "val_generator": None if self.val_generator is None else self.val_generator.get_state(),
        }

    @classmethod
    def from_state_dict(cls, state: dict[str, Any], device: torch.device | str = "cpu") -> InnerRun:
        """The run that :meth:`state_dict` saved, on ``device``."""
        generator = torch.Generator()
        generator.set_state(state["data_generator"])
        val_generator = None
        if state.get("val_generator") is not None:
            val_generator = torch.Generator()
            val_generator.set_state(state["val_generator"])
        return cls(
            Task(TaskConfig.from_dict(state["task"]), device, holdout=state.get("holdout", False)),
            [p.to(device) for p in state["params"]],
            {k: b.to(device) for k, b in state["buffers"].items()},
            [{k: v.to(device) for k, v in s.items()} for s in state["states"]],
            [g.to(device) for g in state["grads"]],
            state["loss"].to(device),
            state["step"],
            generator,
            state["diverged"],
            val_generator,
        )


def unroll_together(
    runs: list[InnerRun],
    rule: LearnedUpdate,
    length: int,
    first_order: bool,
    eps: float = LOSS_EPS,
    val_weight: float = 0.0,
) -> list[tuple[torch.Tensor, dict[str, Any]]]:
    """:meth:`InnerRun.unroll` of every run, their steps taken by one rule call per inner step on
    the batch of their weight spaces (:func:`nfopt.weight_space.batch`: what the rule computes
    for each is what it computes for it alone, so the runs stay independent; a run that reaches
    its horizon drops out of the later calls). One call's fixed cost serves them all. A rule whose
    weights need no gradient (a perturbed copy, for PES) steps without building a graph through
    itself."""
    if not 0.0 <= val_weight <= 1.0:
        raise ValueError(f"val_weight must be in [0, 1], got {val_weight}")
    for run in runs:
        if run.done:
            raise RuntimeError(f"this run is done (step {run.step} of {run.horizon}, diverged={run.diverged})")
        if val_weight > 0 and run.val_generator is None:
            raise ValueError("a held-out meta-loss (val_weight > 0) needs runs started with holdout=True")
    steps = [min(length, run.horizon - run.step) for run in runs]
    specs = [task_spec(run.task, rule.config.sign_flips) for run in runs]
    params, states = [run.params for run in runs], [run.states for run in runs]
    grads, buffers = [run.grads for run in runs], [run.buffers for run in runs]
    losses: list[list[torch.Tensor]] = [[] for _ in runs]
    val_losses: list[list[torch.Tensor]] = [[] for _ in runs]
    tracked = any(w.requires_grad for w in rule.parameters())  # PES's perturbed copies are not
    for t in range(max(steps)):
        active = [k for k, n in enumerate(steps) if t < n]
        spec = specs[active[0]] if len(active) == 1 else _batched(tuple(specs[k] for k in active))
        with torch.set_grad_enabled(tracked):
            new_params, new_states, _ = rule(
                spec, [p for k in active for p in params[k]], [g for k in active for g in grads[k]],
                [s for k in active for s in states[k]],
            )
        if not tracked:  # no graph reaches the rule: the new parameters are leaves of the task's loss
            new_params = [p.requires_grad_() for p in new_params]
        start = 0
        for k in active:
            n = len(params[k])
            params[k], states[k] = new_params[start : start + n], new_states[start : start + n]
            start += n
            run = runs[k]
            x, y = run.task.sample_batch(run.data_generator)
            loss, buffers[k] = run.task.loss(dict(zip(run.names, params[k])), buffers[k], x, y)
            grads[k] = torch.autograd.grad(loss, params[k], retain_graph=True, create_graph=not first_order)
            losses[k].append(loss)
            if val_weight > 0:
                x, y = run.task.sample_val_batch(run.val_generator)
                val_losses[k].append(run.task.eval_loss(dict(zip(run.names, params[k])), buffers[k], x, y))
    out = []
    for k, run in enumerate(runs):
        inner = torch.stack(losses[k])
        meta_loss = torch.log(inner + eps).mean()
        info: dict[str, Any] = {}
        if val_weight > 0:
            held_out = torch.stack(val_losses[k])
            log_val = torch.log(held_out + eps).mean()
            info = {"val_losses": held_out.detach(), "log_train_loss": meta_loss.detach(),
                    "log_val_loss": log_val.detach()}
            meta_loss = log_val if val_weight == 1 else (1 - val_weight) * meta_loss + val_weight * log_val
        run.params = [p.detach() for p in params[k]]
        run.states = [{key: v.detach() for key, v in s.items()} for s in states[k]]
        run.grads = [g.detach() for g in grads[k]]
        run.buffers = {key: b.detach() for key, b in buffers[k].items()}
        inner = inner.detach()
        run.loss = inner[-1]
        run.step += steps[k]
        run.diverged = not bool(torch.isfinite(run.loss))
        out.append((meta_loss, {"losses": inner, "steps": steps[k], **info}))
    return out


@lru_cache(maxsize=1024)
def _batched(specs: tuple[WeightSpaceSpec | MonomialSpec, ...]) -> WeightSpaceSpec | MonomialSpec:
    """One batch spec object per combination of task specs, so that the rule's per-spec plans
    are found at once."""
    return batch(specs)
