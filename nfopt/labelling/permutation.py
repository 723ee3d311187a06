"""Neuron-set labels for a model's parameters and buffers: inferred, given by hand, and applied.

The NFN that computes updates is equivariant to the permutations a labelling allows (see
:mod:`nfopt.weight_space`). A *coupled* neuron set, one set shared by every tensor axis that a
hidden layer's neurons index, lets the NFN pass information between layers. A coupled set claims
a symmetry of the model: permuting it (on every axis it labels) must leave the model's function
unchanged. A wrong claim would make the optimizer treat different functions alike, so inference
couples only what it can prove; every other axis gets a set of its own, which is always safe (the
NFN is then equivariant to a larger group than the model's symmetries).

:func:`label_model` infers labels from a ``torch.fx`` trace. Every axis of every parameter,
buffer and activation is a variable. An operation either *ties* variables (both sides of an add;
a Linear's input features and its weight's columns) or *pins* them (the model's inputs and
outputs; a flatten that mixes channels with positions; any operation the inference does not
understand). A class of tied variables that is not pinned and labels two or more parameter or
buffer axes becomes a coupled set. The inference is :mod:`~nfopt.labelling.axes`; what each
operation and module does, :mod:`~nfopt.labelling.op_rules` and :mod:`~nfopt.labelling.module_rules`.
"""

from __future__ import annotations

import copy
import warnings
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import torch
from torch import nn

from ..weight_space import Label, Permutation, TensorSpec, WeightSpaceSpec
from .axes import AxisInference, Rules
from .module_rules import MODULE_RULES
from .op_rules import ATEN_RULES, FUNCTION_RULES, METHOD_RULES
from .trace import as_tuple, leaves

_RULES = Rules({**FUNCTION_RULES, **ATEN_RULES}, METHOD_RULES, MODULE_RULES)
"""What every function, method and module the inference understands does to axis variables."""

# --------------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelLabelling:
    """The labelled weight space of a model: its parameters and the buffers that move with them.

    ``params`` has one TensorSpec per parameter, in the order of ``model.parameters()``, each named
    by its qualified name; ``buffers`` the same for the model's buffers. A label shared by two or
    more axes (of parameters or buffers) is a coupled set, claimed to be a symmetry of the model's
    function; every other label names a single axis.
    """

    params: WeightSpaceSpec
    buffers: WeightSpaceSpec = field(default_factory=lambda: WeightSpaceSpec(()))

    def __post_init__(self) -> None:
        for what, space in (("parameter", self.params), ("buffer", self.buffers)):
            repeated = [n for n, k in Counter(t.name for t in space.tensors).items() if k > 1]
            if repeated:
                raise ValueError(f"{what} {repeated[0]!r} is labelled more than once")
        _ = self._space  # builds the joint space, which checks that a shared set has one size

    @cached_property
    def _space(self) -> WeightSpaceSpec:
        return WeightSpaceSpec(self.params.tensors + self.buffers.tensors)

    @cached_property
    def coupled_sets(self) -> dict[Label, int]:
        """The coupled sets with their sizes: the permutation symmetries the labelling claims."""
        space = self._space
        return {label: space.set_sizes[label] for label, axes in space.set_members.items() if len(axes) > 1}

    def random_permutation(self, generator: torch.Generator | None = None) -> dict[Label, torch.Tensor]:
        """A uniformly random element of the claimed symmetry group: a permutation per coupled set.

        Sets of a single axis are left alone: they are not symmetries of the model, only of the NFN.
        """
        return {label: torch.randperm(n, generator=generator) for label, n in self.coupled_sets.items()}


def label_model(model: nn.Module, example_inputs: tuple | torch.Tensor | None = None) -> ModelLabelling:
    """Infer coupled neuron sets from the model's structure (see the module docstring).

    ``example_inputs`` (what ``model(*example_inputs)`` accepts) lets the inference propagate
    shapes; without them, whatever depends on a shape or on an axis counted from the front (a
    flatten, BatchNorm1d, GroupNorm) stays uncoupled. With them, the labels are those of inputs
    shaped like the examples, and a model whose own forward cannot be traced is exported with
    ``torch.export`` and analysed whole from its ATen graph, or, if export fails too, submodule by
    submodule. The model is run once in eval mode under ``no_grad`` (exported in eval and train
    mode, which runs nothing), and its state is left as it was.

    Coupled: a Linear's or conv's output channels with its bias and whatever consumes them
    (kernel offsets fixed); BatchNorm, InstanceNorm, LayerNorm, RMSNorm, PReLU and GroupNorm with
    one group or one channel per group (a GroupNorm with other group counts pins its channels);
    an Embedding's feature axis (its rows are indexed by the input, so pinned); depthwise convs;
    both sides of elementwise operations (broadcasting understood); matmuls, transposes,
    reductions, concatenations and reshapes that keep an axis whole; pooling; attention's input
    and output features, and in ``nn.TransformerEncoderLayer`` the residual stream and the
    feed-forward hidden neurons (attention's packed q/k/v rows and heads stay uncoupled). A
    model's input and output axes are never coupled. Parameters that are unused, frozen or tied
    are all listed; a tied one once.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"label_model needs an nn.Module, got {type(model).__name__}")
    params = _named_params(model)
    buffers = list(model.named_buffers())
    kept = [(n, b) for n, b in buffers if _permutable(b)]
    inference = AxisInference([t for _, t in params] + [b for _, b in buffers], _RULES)
    for _, b in buffers:
        if not _permutable(b):
            inference.pin(inference.tensor(b))
    inference.analyse(model, as_tuple(example_inputs))
    specs = inference.specs(params + kept)
    _warn_not_understood(model, inference, specs[: len(params)], example_inputs is None)
    return ModelLabelling(WeightSpaceSpec(specs[: len(params)]), WeightSpaceSpec(specs[len(params) :]))


def _warn_not_understood(model: nn.Module, inference: AxisInference, specs: Sequence[TensorSpec], no_inputs: bool) -> None:
    """One warning naming the modules whose parameters were left uncoupled because the
    inference did not understand them, or whose submodules it analysed apart (an untraceable
    module: nothing couples across its submodules), and how many tensors that leaves coupled to
    nothing."""
    if not inference.not_understood and not inference.split:
        return

    def named(found: dict[int, nn.Module]) -> str:
        names = [f"{name or '<model>'} ({type(m).__name__})" for name, m in model.named_modules() if id(m) in found]
        return f"{len(names)} module(s) with parameters: {', '.join(names[:8])}{' ...' if len(names) > 8 else ''}"

    parts = []
    if inference.not_understood:
        parts.append(f"label_model does not understand {named(inference.not_understood)}; their tensors get "
                     "independent labels")
    if inference.split:
        parts.append(f"label_model cannot trace {named(inference.split)} with torch.fx (nor export the model whole "
                     "with torch.export) and labels their submodules apart, so nothing couples across those")
    shared = Counter(label for t in specs for label in t.axes if label is not None)
    alone = sum(1 for t in specs if all(label is None or shared[label] == 1 for label in t.axes))
    hint = " Passing example_inputs lets it follow shapes." if no_inputs else ""
    warnings.warn(
        f"{'; '.join(parts)}. {alone} of {len(specs)} parameter tensors are coupled to nothing (the optimizer works "
        f"on them, without the structure).{hint}",
        stacklevel=3,
    )


def label_explicit(model: nn.Module, axes: Mapping[str, Sequence[Label]]) -> ModelLabelling:
    """A labelling given by hand: ``axes`` maps parameter or buffer names to one label per axis.

    Tensors not named get independent labels (``"<name>:<axis>"``, which user labels may not
    reuse). Every set shared by two or more axes is claimed to be a symmetry of the model: couple
    a norm layer's running statistics along with its weight, or :func:`invariance_error` will
    show the claim false.
    """
    params = _named_params(model)
    buffers = [(n, b) for n, b in model.named_buffers() if _permutable(b)]
    known = {n for n, _ in params + buffers}
    unknown = sorted(set(axes) - known)
    if unknown:
        raise ValueError(
            f"the model has no parameter or buffer named {unknown[0]!r}; it has {', '.join(sorted(known)) or 'none'}"
        )

    for name, labels in axes.items():
        if isinstance(labels, (str, bytes)) or not isinstance(labels, Sequence):
            raise ValueError(f"labels of {name} must be a sequence of labels, one per axis, got {labels!r}")

    def spec(name: str, t: torch.Tensor) -> TensorSpec:
        return TensorSpec(t.shape, tuple(axes[name]), name) if name in axes else TensorSpec.independent(t.shape, name)

    param_specs = [spec(n, t) for n, t in params]
    buffer_specs = [spec(n, t) for n, t in buffers]
    user = {label for name in axes for label in axes[name]}
    auto = {label for t in param_specs + buffer_specs if t.name not in axes for label in t.axes}
    clash = sorted(map(str, (user & auto) - {None}))
    if clash:
        raise ValueError(f"label {clash[0]!r} is reserved for the independent axis of that name; pick another")
    return ModelLabelling(WeightSpaceSpec(tuple(param_specs)), WeightSpaceSpec(tuple(buffer_specs)))


def permute_model_(model: nn.Module, labelling: ModelLabelling, perm: Permutation) -> None:
    """Apply a group element (a permutation per neuron set) to the parameters and buffers in place.

    Sets missing from ``perm`` are left alone. With ``labelling.random_permutation()`` the model's
    function is unchanged when the labelling is correct.
    """
    _check_permutation(labelling, perm)
    params = dict(model.named_parameters())
    buffers = dict(model.named_buffers())
    names = [t.name for t in labelling.params.tensors]
    if sorted(names) != sorted(params):
        missing = sorted(set(params).symmetric_difference(names))
        raise ValueError(f"the labelling does not fit the model's parameters (first difference: {missing[0]!r})")
    absent = [t.name for t in labelling.buffers.tensors if t.name not in buffers]
    if absent:
        raise ValueError(f"the labelling names buffer {absent[0]!r}, which the model does not have")
    with torch.no_grad():
        for what, space, named in (("parameter", labelling.params, params), ("buffer", labelling.buffers, buffers)):
            tensors = [named[t.name] for t in space.tensors]
            space.check_tensors(tensors, what=what)
            for t, new in zip(tensors, space.permute(tensors, perm)):
                t.copy_(new)


def invariance_error(
    model: nn.Module,
    labelling: ModelLabelling,
    example_inputs: tuple | torch.Tensor,
    trials: int = 3,
    generator: torch.Generator | None = None,
) -> float:
    """How far the labelling is from true: the largest relative change of any output of the model
    (in eval mode) over ``trials`` random elements of its claimed symmetry group.

    Zero up to rounding for a correct labelling; the model itself is not modified.
    """
    return output_change(
        model, example_inputs, lambda m: permute_model_(m, labelling, labelling.random_permutation(generator)), trials
    )


def output_change(
    model: nn.Module, example_inputs: tuple | torch.Tensor, transform: Callable[[nn.Module], None], trials: int
) -> float:
    """The largest relative change of any output of the model (in eval mode) after ``transform``
    (applied in place to a copy, once per trial); the model itself is not modified."""
    inputs = as_tuple(example_inputs)
    reference = copy.deepcopy(model).eval()
    worst = 0.0
    with torch.no_grad():
        expected = _output_tensors(reference(*inputs))
        for _ in range(trials):
            moved = copy.deepcopy(reference)
            transform(moved)
            for y, y_moved in zip(expected, _output_tensors(moved(*inputs)), strict=True):
                if y.numel():
                    scale = y.abs().max().clamp_min(torch.finfo(y.dtype).tiny)
                    worst = max(worst, float((y_moved - y).abs().max() / scale))
    return worst


# --------------------------------------------------------------------------------------------------
# Checks and small helpers
# --------------------------------------------------------------------------------------------------


def _named_params(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    params = list(model.named_parameters())
    for name, p in params:
        if not _permutable(p):
            problem = "complex" if p.is_complex() else "sparse"
            raise ValueError(
                f"parameter {name} is {problem} ({p.dtype}, {p.layout}); only dense real parameters can be labelled"
            )
    return params


def _permutable(t: torch.Tensor) -> bool:
    return t.layout == torch.strided and not t.is_complex()


def _check_permutation(labelling: ModelLabelling, perm: Permutation) -> None:
    sizes = labelling._space.set_sizes
    for label, p in perm.items():
        if label not in sizes:
            raise ValueError(f"the labelling has no neuron set {label!r}")
        n = sizes[label]
        if not isinstance(p, torch.Tensor) or p.dtype != torch.long or p.shape != (n,):
            got = f"{p.dtype} tensor of shape {tuple(p.shape)}" if isinstance(p, torch.Tensor) else type(p).__name__
            raise ValueError(f"the permutation of set {label!r} must be a LongTensor of shape ({n},), got {got}")
        if not torch.equal(p.sort().values.cpu(), torch.arange(n)):
            raise ValueError(f"the indices given for set {label!r} are not a permutation of 0..{n - 1}")


def _output_tensors(out: Any) -> list[torch.Tensor]:
    """The tensors of a model's (nested) output, integer ones as float64."""
    tensors = [t for t in leaves(out) if isinstance(t, torch.Tensor)]
    return [t if t.is_floating_point() or t.is_complex() else t.double() for t in tensors]

