"""NFNOptimizer: a torch.optim.Optimizer whose step is computed by an equivariant NFN."""

from __future__ import annotations

import copy
import hashlib
import math
import json
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn
from torch.optim import Optimizer

from ..io import load_rule
from ..labelling import ModelLabelling, MonomialLabelling, label_model, label_monomial
from .features import STATISTICS, FeatureConfig, init_state
from .rule import LearnedUpdate, reads_at_once
from ..weight_space import MonomialSpec, TensorSpec, WeightSpaceSpec, as_monomial, default_exponents

DEFAULT_CHECKPOINT = "default.nfopt"


def default_checkpoint_path() -> Path:
    """The meta-trained rule that ships inside the package (this copy of it, under whatever name
    it was imported)."""
    return Path(str(resources.files(__name__.partition(".")[0]) / DEFAULT_CHECKPOINT))


def _fingerprint(rule: LearnedUpdate) -> str:
    """A hash of the rule's config and weights (read as float64, so that a rule and its float64
    copy agree). Rules that differ only in config, like fresh rules of two learning rates, differ."""
    h = hashlib.sha256(json.dumps(rule.config.to_dict(), sort_keys=True).encode())
    for k, v in sorted(rule.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().to(torch.float64).numpy().tobytes())
    return h.hexdigest()[:16]


Labelling = WeightSpaceSpec | MonomialSpec | ModelLabelling | MonomialLabelling
"""What ``NFNOptimizer(labelling=...)`` accepts: a labelled weight space, or a labeller's result."""


def _statistics(cfg: FeatureConfig) -> tuple[tuple[float, ...], float]:
    """What the per-parameter state's statistics are: the momenta's decay rates and beta2."""
    return cfg.momentum_decays, cfg.beta2


def unwrapped(model: nn.Module) -> nn.Module:
    """The module inside DistributedDataParallel, DataParallel and ``torch.compile`` wrappers
    (which hold the same parameters and hide the structure from tracing)."""
    while True:
        if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        else:
            return model


def _sharded(p: torch.Tensor) -> bool:
    """Whether ``p`` is a shard of a larger tensor: a DTensor (FSDP2) or FSDP's flat parameter."""
    if getattr(p, "_is_flat_param", False):
        return True
    if not torch.distributed.is_available():
        return False
    from torch.distributed.tensor import DTensor

    return isinstance(p, DTensor)


def _check_lr(lr: float | torch.Tensor) -> None:
    """A learning rate is a non-negative number or a one-element tensor (as torch.optim takes)."""
    if isinstance(lr, torch.Tensor) and lr.numel() != 1:
        raise ValueError("Tensor lr must be 1-element")
    if not 0.0 <= lr:
        raise ValueError(f"Invalid learning rate: {lr}")


def _rule_tensors(rule: LearnedUpdate) -> list[torch.Tensor]:
    return [*rule.parameters(), *rule.buffers()]


@dataclass(frozen=True)
class _RuleCopy:
    """The rule cast to another device or dtype, with what it was made from.

    ``sources`` alias (``detach()``) the source rule's tensors at copy time, which keeps their
    memory alive: a tensor whose data was since replaced (``module.to``, assigning ``.data``, a
    new Parameter) has another address. ``versions`` are their in-place version counters then.
    """

    rule: LearnedUpdate
    source: LearnedUpdate
    sources: tuple[torch.Tensor, ...]
    versions: tuple[int, ...]

    @classmethod
    def make(
        cls, rule: LearnedUpdate, tensors: list[torch.Tensor], device: torch.device, dtype: torch.dtype
    ) -> _RuleCopy:
        """A copy of ``rule`` (whose tensors are ``tensors``) on ``device`` in ``dtype``."""
        return cls(
            copy.deepcopy(rule).to(device=device, dtype=dtype),
            rule,
            tuple(t.detach() for t in tensors),
            tuple(t._version for t in tensors),
        )

    def is_copy_of(self, rule: LearnedUpdate, tensors: list[torch.Tensor]) -> bool:
        """Whether ``rule`` (whose tensors are ``tensors``) is the source, unchanged since the copy."""
        return (
            rule is self.source
            and len(tensors) == len(self.sources)
            and all(
                t.data_ptr() == s.data_ptr() and t._version == v
                for t, s, v in zip(tensors, self.sources, self.versions)
            )
        )


class NFNOptimizer(Optimizer):
    """A learned optimizer: each step is computed by a permutation-equivariant neural functional.

    Args:
        params: parameters or param groups, as for any ``torch.optim.Optimizer``.
        ckpt: path of a checkpoint written by meta-training, or ``None`` for the packaged default.
        lr: the learning rate, in Adam's units (the learned step is Adam's direction plus a bounded
            learned residual, times ``lr`` and a learned per-element scale). Default: the rule's
            meta-trained α (:meth:`LearnedUpdate.scalars`), so ``lr=2 * opt.rule.scalars()[0]``
            doubles the learned step; schedulers scale it as they scale Adam's.
        weight_decay: decoupled weight decay, applied as AdamW does with learning rate ``lr``.
        labelling: the weight-space labelling of the parameters, in order: what
            :func:`~nfopt.labelling.label_model` or :func:`~nfopt.labelling.label_monomial` return
            for a model whose parameters are all given, or its ``.params``
            (``NFNOptimizer.for_model`` infers it). Without one, every tensor's axes are
            independent neuron sets: still equivariant, but the NFN cannot pass information
            between layers. Sign flips (a :class:`~nfopt.weight_space.MonomialSpec`) are used by
            a rule meta-trained with ``sign_flips``; of a ``MonomialLabelling`` only they are
            kept, and only for such a rule, as ``for_model`` does.
        rule: the learned update rule itself, instead of a checkpoint (see :attr:`rule`).

    The update of every parameter is computed jointly from all parameters that have a gradient.
    State per parameter: momenta at each decay rate, the second moment and a step count, in
    float32 (float64 for float64 parameters); parameters of any floating dtype are updated in
    float32 (float64 stays float64) and written back in their own dtype. A gradient holding inf
    or NaN leaves that tensor and its statistics untouched for the step; ``nonfinite_skips``
    counts them, and a warning says so once (on the CPU at that step; on other devices, where
    asking would wait for the device, at the next :meth:`state_dict`).
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        ckpt: str | Path | None = None,
        lr: float | torch.Tensor | None = None,
        weight_decay: float = 0.0,
        labelling: Labelling | None = None,
        *,
        rule: LearnedUpdate | None = None,
    ) -> None:
        if rule is None:
            path = default_checkpoint_path() if ckpt is None else Path(ckpt)
            rule = load_rule(path)
        elif ckpt is not None:
            raise ValueError("give either ckpt or rule, not both")
        if lr is None:
            lr = float(rule.scalars()[0].detach())
        _check_lr(lr)
        if not 0.0 <= weight_decay:
            raise ValueError(f"Invalid weight_decay value: {weight_decay}")
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay))
        self.rule = rule
        self._rules: dict[tuple[torch.device, torch.dtype], _RuleCopy] = {}
        self._alpha: tuple[tuple[int, int, int], float] | None = None
        self._labels: dict[int, TensorSpec] = {}
        self._exponents: dict[int, tuple[int, ...]] = {}
        self._symmetries: dict[Any, str] = {}
        self._specs: dict[tuple[int, ...], WeightSpaceSpec | MonomialSpec] = {}
        self._warned_nonfinite = False
        self._nonfinite_seen: torch.Tensor | None = None  # on devices where asking would wait
        if labelling is not None:
            self._set_labelling(labelling)
        for group in self.param_groups:
            self._check_group(group)

    def __getstate__(self) -> dict[str, Any]:
        """What a copy or pickle keeps: torch's optimizer state, the rule, and the labelling by
        parameter position (parameters are other objects in the copy)."""
        state = super().__getstate__()
        params = self._all_params()
        state.update(
            _rule=self._rule,
            _warned_nonfinite=self._warned_nonfinite,
            _symmetries=self._symmetries,
            _labels=[self._labels.get(id(p)) for p in params] if self._labels else None,
            _exponents=[self._exponents.get(id(p)) for p in params],
        )
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        if "_rule" not in state:  # torch's load_state_dict sets only state and groups this way
            super().__setstate__(state)
            return
        labels, exponents = state.pop("_labels"), state.pop("_exponents")
        super().__setstate__(state)
        params = self._all_params()
        self._labels = {} if labels is None else {id(p): t for p, t in zip(params, labels) if t is not None}
        self._exponents = {id(p): e for p, e in zip(params, exponents) if e is not None}
        self._rules, self._specs, self._alpha = {}, {}, None
        self._nonfinite_seen = None

    @property
    def rule(self) -> LearnedUpdate:
        """The learned update rule that computes every step: this very object, not a copy.

        Assigning another rule, or changing this one's weights in place (``load_state_dict``, an
        in-place op, ``.to()``), takes effect at the next step; only writes through ``.data``
        go unseen, as they do by autograd. The optimizer freezes the rule's weights
        (``requires_grad=False``) and never changes them.
        """
        return self._rule

    @rule.setter
    def rule(self, rule: LearnedUpdate) -> None:
        if not isinstance(rule, LearnedUpdate):
            raise TypeError(f"rule must be a LearnedUpdate, got {type(rule).__name__}")
        if hasattr(self, "_rule") and any(self.state.values()):
            new, old = (_statistics(r.config.features) for r in (rule, self._rule))
            if new != old:
                raise ValueError(
                    f"the new rule keeps other statistics (momentum decays and beta2 {new}) than the "
                    f"optimizer's state holds ({old}); give it to an optimizer that has not stepped yet"
                )
        rule.requires_grad_(False)
        self._rule = rule

    @property
    def rule_fingerprint(self) -> str:
        """A hash of :attr:`rule`'s weights as they are now (16 hex digits); :meth:`state_dict`
        records it, so that loading state made with another rule warns."""
        return _fingerprint(self.rule)

    @classmethod
    def for_model(
        cls,
        model: nn.Module,
        ckpt: str | Path | None = None,
        params: Iterable[Any] | None = None,
        example_inputs: tuple | torch.Tensor | None = None,
        **kwargs: Any,
    ) -> NFNOptimizer:
        """An optimizer that knows the model's structure, so the NFN couples connected layers.

        A model wrapped by DistributedDataParallel, DataParallel or ``torch.compile`` is read
        through the wrapper (:func:`unwrapped`). ``params`` (default: ``model.parameters()``) may
        be param groups of the model's parameters,
        any subset in any order. ``example_inputs`` let the structure inference follow shapes (a
        flatten of a 1x1 map, a BatchNorm1d); see :func:`nfopt.labelling.label_model`. The
        labelling is :func:`~nfopt.labelling.label_monomial`'s for a rule meta-trained with
        ``sign_flips``, :func:`~nfopt.labelling.label_model`'s otherwise.
        """
        if "labelling" in kwargs:
            raise TypeError("for_model infers the labelling; to give one, use NFNOptimizer(params, labelling=...)")
        model = unwrapped(model)
        opt = cls(model.parameters() if params is None else params, ckpt, **kwargs)
        labeller = label_monomial if opt.rule.config.sign_flips else label_model
        mono = as_monomial(opt._params_spec(labeller(model, example_inputs)))
        by_id = {id(p): i for i, p in enumerate(model.parameters())}
        for p in opt._all_params():
            if id(p) not in by_id:
                raise ValueError(f"a parameter of shape {tuple(p.shape)} given to for_model is not one of the model's")
        opt._label(mono, [by_id[id(p)] for p in opt._all_params()])
        return opt

    def _all_params(self) -> list[torch.Tensor]:
        return [p for g in self.param_groups for p in g["params"]]

    def _params_spec(self, labelling: Labelling) -> WeightSpaceSpec | MonomialSpec:
        """The labelled weight space of the parameters that ``labelling`` describes. Of a
        MonomialLabelling's symmetries, the sign flips are kept for a rule meta-trained with
        ``sign_flips`` and dropped otherwise; scalings always (gradient training is not
        equivariant to them). A spec is taken as given."""
        if isinstance(labelling, MonomialLabelling):
            return labelling.params.only("sign") if self.rule.config.sign_flips else labelling.params.space
        if isinstance(labelling, ModelLabelling):
            return labelling.params
        if isinstance(labelling, (WeightSpaceSpec, MonomialSpec)):
            return labelling
        raise TypeError(
            "labelling must be a WeightSpaceSpec, a MonomialSpec, or a ModelLabelling or MonomialLabelling "
            f"(what nfopt.labelling.label_model and label_monomial return), got {type(labelling).__name__}"
        )

    def _set_labelling(self, labelling: Labelling) -> None:
        params = self._all_params()
        mono = as_monomial(self._params_spec(labelling))
        if len(mono.space) != len(params):
            raise ValueError(
                f"the labelling describes {len(mono.space)} tensors but the optimizer holds {len(params)} "
                "parameters; label exactly the parameters given, in order (NFNOptimizer.for_model does)"
            )
        for p, t in zip(params, mono.space.tensors):
            if tuple(p.shape) != t.shape:
                raise ValueError(f"labelling of {t.name or '?'} is for shape {t.shape}, the parameter has {tuple(p.shape)}")
        self._label(mono, range(len(params)))

    def _label(self, mono: MonomialSpec, indices: Iterable[int]) -> None:
        """Give the optimizer's parameters, in order, the labels of these tensors of ``mono``."""
        params = self._all_params()
        indices = list(indices)
        self._labels = {id(p): mono.space.tensors[i] for p, i in zip(params, indices)}
        self._exponents = {id(p): mono.exponents[i] for p, i in zip(params, indices)}
        self._symmetries = dict(mono.symmetries)

    def _check_group(self, group: dict[str, Any]) -> None:
        _check_lr(group["lr"])
        for p in group["params"]:
            if p.is_sparse or p.layout != torch.strided:
                raise ValueError(f"NFNOptimizer does not support sparse parameters (layout {p.layout})")
            if p.is_complex():
                raise ValueError(
                    f"NFNOptimizer does not support complex parameters (dtype {p.dtype}); "
                    "view them as real with torch.view_as_real"
                )
            if not p.is_floating_point():
                raise ValueError(f"NFNOptimizer needs floating-point parameters, got {p.dtype}")
            if _sharded(p):
                raise ValueError(
                    "NFNOptimizer does not support sharded parameters (FSDP, DTensor): its update pools "
                    "statistics over each whole tensor, which a shard does not see, so each rank would "
                    "compute another function; use DistributedDataParallel, or FSDP with "
                    "ShardingStrategy.NO_SHARD"
                )

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group; with a labelling, the new tensors get independent labels."""
        super().add_param_group(param_group)
        if hasattr(self, "rule"):  # not during __init__
            self._check_group(self.param_groups[-1])
            if self._labels:
                for p in self.param_groups[-1]["params"]:
                    self._labels.setdefault(id(p), TensorSpec.independent(p.shape, f"group{len(self.param_groups) - 1}.{id(p)}"))

    def spec_for(self, params: list[torch.Tensor]) -> WeightSpaceSpec | MonomialSpec:
        """The labelled weight space the NFN sees for these parameters (cached per list); a
        monomial spec where the labelling found sign-flip symmetries."""
        key = tuple(id(p) for p in params)
        spec = self._specs.get(key)
        if spec is None:
            if not self._labels:
                spec = WeightSpaceSpec.independent(params)
            else:
                spec = WeightSpaceSpec(tuple(self._labels[id(p)] for p in params))
                present = {label for t in spec.tensors for label in t.axes}
                symmetries = tuple((s, k) for s, k in self._symmetries.items() if s in present)
                if symmetries:
                    exponents = tuple(
                        self._exponents.get(id(p)) or default_exponents(t.axes) for p, t in zip(params, spec.tensors)
                    )
                    spec = MonomialSpec(spec, symmetries, exponents)
            self._specs[key] = spec
        return spec

    def _rule_for(self, device: torch.device, dtype: torch.dtype) -> LearnedUpdate:
        """The rule to compute on ``device`` in ``dtype``: :attr:`rule` itself where its weights
        are there already, else a copy cast there, made again once the rule or its weights changed
        (known from version counters and addresses, so that a step copies nothing otherwise)."""
        rule = self.rule
        tensors = _rule_tensors(rule)
        if all(t.device == device and (t.dtype == dtype or not t.is_floating_point()) for t in tensors):
            return rule
        cast = self._rules.get((device, dtype))
        if cast is None or not cast.is_copy_of(rule, tensors):
            cast = self._rules[(device, dtype)] = _RuleCopy.make(rule, tensors, device, dtype)
        return cast.rule

    def _learned_alpha(self, rule: LearnedUpdate) -> float:
        """The rule's α as a float, read again only when its weight changed (reading a CUDA
        tensor waits for the device)."""
        log_alpha = rule.log_alpha
        key = (id(rule), log_alpha.data_ptr(), log_alpha._version)
        if self._alpha is None or self._alpha[0] != key:
            alpha = float(rule.scalars()[0].detach())
            if not 0 < alpha < math.inf:
                raise ValueError(f"the rule's learned α is {alpha}; it must be a positive number")
            self._alpha = (key, alpha)
        return self._alpha[1]

    def _warn_nonfinite(self, skipped: bool) -> None:
        if skipped and not self._warned_nonfinite:
            self._warned_nonfinite = True
            warnings.warn(
                "NFNOptimizer: a gradient held inf or NaN; that tensor's update was skipped "
                "(counted in state['nonfinite_skips']). Warned once.",
                RuntimeWarning,
                stacklevel=3,
            )

    def state_dict(self) -> dict[str, Any]:
        """The usual optimizer state, plus :attr:`rule_fingerprint`, the current rule's, and a mark
        that the groups' ``lr`` are learning rates (older nfopt saved multipliers of α). Saving
        waits for the device anyway: a skipped non-finite gradient seen there is told here."""
        if self._nonfinite_seen is not None:
            seen, self._nonfinite_seen = self._nonfinite_seen, None
            self._warn_nonfinite(bool(seen))
        sd = super().state_dict()
        sd["rule_fingerprint"] = self.rule_fingerprint
        sd["lr_is_learning_rate"] = True
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load state saved by :meth:`state_dict`, keeping every statistic in its saved dtype.

        (The base class would cast statistics to each parameter's dtype, which loses float32 state
        of bf16 parameters.) Warns if the state was made with a different learned rule.
        """
        state_dict = dict(state_dict)
        for i, saved in state_dict.get("state", {}).items():
            missing = [k for k in STATISTICS if k not in saved]
            if missing:
                raise ValueError(
                    f"the state of parameter {i} has keys {sorted(saved)}, not NFNOptimizer's {list(STATISTICS)}: "
                    "this state_dict was made by another optimizer (its statistics cannot be read as the "
                    "learned rule's); start NFNOptimizer fresh instead"
                )
        fingerprint, ours = state_dict.pop("rule_fingerprint", None), self.rule_fingerprint
        if not state_dict.pop("lr_is_learning_rate", False) and fingerprint is not None:
            alpha = self._learned_alpha(self.rule)
            state_dict["param_groups"] = [
                {**g, **{k: g[k] * alpha for k in ("lr", "initial_lr") if k in g}} for g in state_dict["param_groups"]
            ]
            warnings.warn(
                "this optimizer state is from an nfopt whose lr was a multiplier of the learned α; its "
                f"groups' lr were read as learning rates lr·α (α = {alpha:.3g})",
                UserWarning,
                stacklevel=2,
            )
        if fingerprint is not None and fingerprint != ours:
            warnings.warn(
                "loading optimizer state made with a different learned rule "
                f"({fingerprint} vs {ours}); training goes on with this one",
                UserWarning,
                stacklevel=2,
            )
        super().load_state_dict(state_dict)
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        params = dict(zip(saved_ids, self._all_params()))
        for i, saved in state_dict["state"].items():
            p = params[i]
            self.state[p] = {
                k: v.to(device=p.device, copy=True) if torch.is_tensor(v) else v for k, v in saved.items()
            }

    @torch.compiler.disable
    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        """Perform one optimization step; returns the closure's loss if one is given.

        ``torch.compile`` leaves it as it is (on the CPU its per-element work is a compiled loop
        already; tracing the rest would break the graph on every tensor for no gain)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        params, grads, states, lrs, wds = [], [], [], [], []
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("NFNOptimizer does not support sparse gradients")
                state = self.state[p]
                if not state:
                    state.update(init_state(p, self.rule.config.features))
                    state["nonfinite_skips"] = torch.zeros((), dtype=torch.int64, device=p.device)
                params.append(p)
                grads.append(p.grad)
                states.append(state)
                lrs.append(group["lr"])
                wds.append(group["weight_decay"])
        if not params:
            return loss
        devices = {p.device for p in params}
        if len(devices) > 1:
            raise RuntimeError(f"NFNOptimizer needs all parameters with gradients on one device, got {devices}")
        dtype = torch.float64 if all(p.dtype == torch.float64 for p in params) else torch.float32
        rule = self._rule_for(params[0].device, dtype)
        spec = self.spec_for(params)
        work = [p if p.dtype == dtype else p.to(dtype) for p in params]
        alpha = self._learned_alpha(rule)
        multipliers = [lr / alpha for lr in lrs]  # the rule scales its step by α times these
        # statistics kept in another dtype (a float64 parameter beside float32 ones) step as copies
        work_states = [s if s["v"].dtype == dtype else {k: s[k].to(dtype) for k in STATISTICS} for s in states]
        grads = [g if g.dtype == dtype else g.to(dtype) for g in grads]
        finite = rule.step_(spec, work, grads, work_states, multipliers, wds)
        for s, w in zip(states, work_states):
            if w is not s:
                for k in STATISTICS:
                    s[k].copy_(w[k])
        converted = [(p, w) for p, w in zip(params, work) if w is not p]  # parameters not in the compute dtype
        if converted:
            torch._foreach_copy_([p for p, _ in converted], [w for _, w in converted])
        torch._foreach_add_([s["nonfinite_skips"] for s in states], list((1 - finite).to(torch.int64).unbind()))
        if not self._warned_nonfinite:
            skipped = finite.min() < 1
            if reads_at_once(params[0].device):
                self._warn_nonfinite(bool(skipped))
            else:  # asking would wait for the device: remembered there, told at the next state_dict()
                self._nonfinite_seen = skipped if self._nonfinite_seen is None else self._nonfinite_seen | skipped
        return loss
