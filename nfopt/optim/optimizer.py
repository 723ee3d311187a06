"""NFNOptimizer: a torch.optim.Optimizer whose step is computed by an equivariant NFN."""

from __future__ import annotations

import copy
import hashlib
import warnings
from collections.abc import Iterable
from importlib import resources
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn
from torch.optim import Optimizer

from .features import init_state
from .rule import LearnedUpdate
from ..weight_space import MonomialSpec, TensorSpec, WeightSpaceSpec, as_monomial, default_exponents

DEFAULT_CHECKPOINT = "default.nfopt"


def default_checkpoint_path() -> Path:
    """The meta-trained rule that ships inside the package."""
    return Path(str(resources.files("nfopt") / DEFAULT_CHECKPOINT))


def _fingerprint(rule: LearnedUpdate) -> str:
    h = hashlib.sha256()
    for k, v in sorted(rule.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().to(torch.float64).numpy().tobytes())
    return h.hexdigest()[:16]


class NFNOptimizer(Optimizer):
    """A learned optimizer: each step is computed by a permutation-equivariant neural functional.

    Args:
        params: parameters or param groups, as for any ``torch.optim.Optimizer``.
        ckpt: path of a checkpoint written by meta-training, or ``None`` for the packaged default.
        lr: multiplier of the learned step (1.0 = as meta-trained); learning-rate schedulers scale it.
        weight_decay: decoupled weight decay, applied as AdamW does with learning rate ``lr·α``.
        labelling: the weight-space labelling of the parameters (``NFNOptimizer.for_model`` infers
            it from a model). Without one, every tensor's axes are independent neuron sets: still
            equivariant, but the NFN cannot pass information between layers. A
            :class:`~nfopt.weight_space.MonomialSpec` adds sign-flip symmetries, which a
            checkpoint meta-trained with ``sign_flips`` respects (``for_model`` infers them).

    The update of every parameter is computed jointly from all parameters that have a gradient.
    State per parameter: momenta at each decay rate, the second moment and a step count, in
    float32 (``state_bytes_per_parameter``); parameters of any floating dtype are updated in float32
    (float64 stays float64) and written back in their own dtype. A gradient holding inf or NaN
    leaves that tensor and its statistics untouched for the step; ``nonfinite_skips`` counts them.
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        ckpt: str | Path | None = None,
        lr: float = 1.0,
        weight_decay: float = 0.0,
        labelling: WeightSpaceSpec | MonomialSpec | None = None,
        *,
        rule: LearnedUpdate | None = None,
    ) -> None:
        if not 0.0 <= lr:
            raise ValueError(f"Invalid learning rate multiplier: {lr}")
        if not 0.0 <= weight_decay:
            raise ValueError(f"Invalid weight_decay value: {weight_decay}")
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay))
        if rule is None:
            path = default_checkpoint_path() if ckpt is None else Path(ckpt)
            rule = LearnedUpdate.load(path)
        elif ckpt is not None:
            raise ValueError("give either ckpt or rule, not both")
        for p in rule.parameters():
            p.requires_grad_(False)
        self.rule = rule
        self.rule_fingerprint = _fingerprint(rule)
        self._rules: dict[tuple[torch.device, torch.dtype], LearnedUpdate] = {}
        self._labels: dict[int, TensorSpec] = {}
        self._exponents: dict[int, tuple[int, ...]] = {}
        self._symmetries: dict[Any, str] = {}
        self._specs: dict[tuple[int, ...], WeightSpaceSpec | MonomialSpec] = {}
        self._warned_nonfinite = False
        if labelling is not None:
            self._set_labelling(labelling)
        for group in self.param_groups:
            self._check_group(group)

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

        ``params`` (default: ``model.parameters()``) may be param groups of the model's parameters.
        ``example_inputs`` let the structure inference follow shapes (a flatten of a 1x1 map, a
        BatchNorm1d); see :func:`nfopt.labelling.label_model`.
        """
        opt = cls(model.parameters() if params is None else params, ckpt, **kwargs)
        # torch.fx machinery, only needed here
        if opt.rule.config.sign_flips:
            from ..labelling import label_monomial

            spec: WeightSpaceSpec | MonomialSpec = label_monomial(model, example_inputs).params.only("sign")
        else:
            from ..labelling import label_model

            spec = label_model(model, example_inputs).params
        mono = as_monomial(spec)
        by_id = {id(p): i for i, p in enumerate(model.parameters())}
        for p in opt._all_params():
            if id(p) not in by_id:
                raise ValueError(f"a parameter of shape {tuple(p.shape)} given to for_model is not one of the model's")
        opt._label(mono, [by_id[id(p)] for p in opt._all_params()])
        return opt

    def _all_params(self) -> list[torch.Tensor]:
        return [p for g in self.param_groups for p in g["params"]]

    def _set_labelling(self, spec: WeightSpaceSpec | MonomialSpec) -> None:
        params = self._all_params()
        mono = as_monomial(spec)
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
        """The rule's weights on the parameters' device, in their compute dtype (copied once)."""
        rule = self._rules.get((device, dtype))
        if rule is None:
            rule = self._rules[(device, dtype)] = copy.deepcopy(self.rule).to(device=device, dtype=dtype)
        return rule

    def state_dict(self) -> dict[str, Any]:
        """The usual optimizer state, plus a fingerprint of the rule that produced it."""
        sd = super().state_dict()
        sd["rule_fingerprint"] = self.rule_fingerprint
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load state saved by :meth:`state_dict`, keeping every statistic in its saved dtype.

        (The base class would cast statistics to each parameter's dtype, which loses float32 state
        of bf16 parameters.) Warns if the state was made with a different learned rule.
        """
        state_dict = dict(state_dict)
        fingerprint = state_dict.pop("rule_fingerprint", None)
        if fingerprint is not None and fingerprint != self.rule_fingerprint:
            warnings.warn(
                "loading optimizer state made with a different learned rule "
                f"({fingerprint} vs {self.rule_fingerprint}); training goes on with this one",
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

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        """Perform one optimization step; returns the closure's loss if one is given."""
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
        work = [p.to(dtype) for p in params]
        new_params, new_stats, oks = rule(
            spec, work, [g.to(dtype) for g in grads], [{k: s[k] for k in ("step", "momenta", "v")} for s in states], lrs, wds
        )
        for p, new, stats, state, ok in zip(params, new_params, new_stats, states, oks):
            p.copy_(new)
            state.update(stats)
            state["nonfinite_skips"] += (1 - ok).to(torch.int64)
        if params[0].device.type == "cpu" and not self._warned_nonfinite:
            if not bool(torch.stack(oks).all()):
                self._warned_nonfinite = True
                warnings.warn(
                    "NFNOptimizer: a gradient held inf or NaN; that tensor's update was skipped "
                    "(counted in state['nonfinite_skips']). Warned once.",
                    RuntimeWarning,
                    stacklevel=2,
                )
        return loss
