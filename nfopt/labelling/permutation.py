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
buffer axes becomes a coupled set.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import operator
import warnings
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property, reduce
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn
from torch.fx.node import map_aggregate, map_arg
from torch.overrides import TorchFunctionMode

from ..weight_space import MAX_LABELLED_AXES, Label, Permutation, TensorSpec, WeightSpaceSpec

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
    shaped like the examples, and a model whose own forward cannot be traced is analysed
    submodule by submodule. The model is run once in eval mode under ``no_grad``, and its state is
    left as it was.

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
    inference = _Inference([t for _, t in params] + [b for _, b in buffers])
    for _, b in buffers:
        if not _permutable(b):
            inference.pin(inference.tensor(b))
    inference.analyse(model, _as_tuple(example_inputs))
    specs = inference.specs(params + kept)
    return ModelLabelling(WeightSpaceSpec(specs[: len(params)]), WeightSpaceSpec(specs[len(params) :]))


def param_spec(model: nn.Module, example_inputs: tuple | torch.Tensor | None = None) -> WeightSpaceSpec:
    """The inferred labelling of the model's parameters alone (what the optimizer needs)."""
    return label_model(model, example_inputs).params


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
    inputs = _as_tuple(example_inputs)
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
            kind = "complex" if p.is_complex() else "sparse"
            raise ValueError(
                f"parameter {name} is {kind} ({p.dtype}, {p.layout}); only dense real parameters can be labelled"
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


def _as_tuple(inputs: tuple | list | torch.Tensor | None) -> tuple | None:
    if inputs is None or isinstance(inputs, tuple):
        return inputs
    return tuple(inputs) if isinstance(inputs, list) else (inputs,)


def _leaves(value: Any) -> Iterator[Any]:
    """The leaves of nested tuples, lists, dicts and slices."""
    if isinstance(value, (tuple, list)):
        for v in value:
            yield from _leaves(v)
    elif isinstance(value, dict):
        for v in value.values():
            yield from _leaves(v)
    elif isinstance(value, slice):
        yield from _leaves((value.start, value.stop, value.step))
    else:
        yield value


def _entries(value: Any) -> dict:
    """A dict's items, a tuple's or list's by position; nothing for anything else."""
    if isinstance(value, dict):
        return dict(value)
    return dict(enumerate(value)) if isinstance(value, (tuple, list)) else {}


def _output_tensors(out: Any) -> list[torch.Tensor]:
    """The tensors of a model's (nested) output, integer ones as float64."""
    tensors = [t for t in _leaves(out) if isinstance(t, torch.Tensor)]
    return [t if t.is_floating_point() or t.is_complex() else t.double() for t in tensors]


@contextlib.contextmanager
def _training(module: nn.Module, flag: bool) -> Iterator[None]:
    """Set every submodule's training flag (without calling ``train()``), restoring them after."""
    saved = [(m, m.training) for m in module.modules()]
    for m, _ in saved:
        m.training = flag
    try:
        yield
    finally:
        for m, was in saved:
            m.training = was


def _has_hooks(m: nn.Module) -> bool:
    """Forward hooks may change what a module computes, so a hooked module is not understood."""
    return bool(m._forward_hooks or m._forward_pre_hooks)


# --------------------------------------------------------------------------------------------------
# Inference: variables, layouts and the graph walk
# --------------------------------------------------------------------------------------------------


class _Unsupported(Exception):
    """A handler cannot analyse this call; the call is treated as opaque."""


class _Sets:
    """Union-find over axis variables; a pinned class may never be permuted."""

    def __init__(self) -> None:
        self._parent: list[int] = []
        self._pinned: list[bool] = []

    def new(self, pinned: bool) -> int:
        self._parent.append(len(self._parent))
        self._pinned.append(pinned)
        return len(self._parent) - 1

    def find(self, v: int) -> int:
        while self._parent[v] != v:
            self._parent[v] = self._parent[self._parent[v]]
            v = self._parent[v]
        return v

    def union(self, a: int, b: int) -> int:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self._parent[rb] = ra
            self._pinned[ra] = self._pinned[ra] or self._pinned[rb]
        return ra

    def pin(self, v: int) -> None:
        self._pinned[self.find(v)] = True

    def pinned(self, v: int) -> bool:
        return self._pinned[self.find(v)]


@dataclass(frozen=True)
class _Layout:
    """What is known of a tensor value: a variable and a size (None: unknown) per trailing axis.

    ``complete`` when these are all its axes; axes left of an incomplete layout's known ones are
    untracked and count as pinned.
    """

    vars: tuple[int, ...]
    sizes: tuple[int | None, ...]
    complete: bool

    def lead(self, k: int) -> _Layout:
        """The layout without its last ``k`` axes."""
        n = max(len(self.vars) - k, 0)
        return _Layout(self.vars[:n], self.sizes[:n], self.complete)


_UNKNOWN = _Layout((), (), False)
"""A value nothing is known about (it may even be a tuple); all its axes count as pinned."""

_NONTENSOR = object()
"""The value of a node that is not a tensor (a shape, a size, a dtype)."""


def _axis(x: _Layout, d: Any) -> int:
    """The index into ``x.vars`` of dimension ``d``, if it is tracked."""
    return _dim_index(d, len(x.vars), x.complete)


def _dim_index(d: Any, n: int, complete: bool) -> int:
    """Dimension ``d`` (negative counts from the end) of ``n`` known trailing axes, as an index."""
    if isinstance(d, bool) or not isinstance(d, int):
        raise _Unsupported
    if complete and -n <= d < n:
        return d % n
    if not complete and -n <= d < 0:
        return n + d
    raise _Unsupported


def _layout(value: Any) -> _Layout:
    if not isinstance(value, _Layout):
        raise _Unsupported
    return value


def _weight(value: Any, ndim: int) -> _Layout:
    """A weight operand, which must be a complete layout of ``ndim`` axes."""
    if not (isinstance(value, _Layout) and value.complete and len(value.vars) == ndim):
        raise _Unsupported
    return value


class _Inference:
    """Ties and pins axis variables while walking traced graphs, then turns classes into labels."""

    def __init__(self, tensors: Sequence[torch.Tensor]) -> None:
        self.sets = _Sets()
        self.vars: dict[int, tuple[int, ...]] = {}
        for t in tensors:
            self.vars.setdefault(id(t), tuple(self.sets.new(False) for _ in t.shape))
        self._traces: dict[int, list[fx.GraphModule] | None] = {}
        self._out_meta: Any = None

    # ---- variables -------------------------------------------------------------------------------

    def fresh(self, n: int) -> tuple[int, ...]:
        """``n`` new pinned variables (axes that no permutation may move)."""
        return tuple(self.sets.new(True) for _ in range(n))

    def tensor(self, t: torch.Tensor | None) -> _Layout | None:
        """The layout of a parameter or buffer; any other tensor is a constant, so pinned."""
        if t is None:
            return None
        shape = tuple(t.shape)
        return _Layout(self.vars[id(t)] if id(t) in self.vars else self.fresh(len(shape)), shape, True)

    def pin(self, value: Any) -> None:
        """Pin every variable of every layout in a (nested) value."""
        for leaf in _leaves(value):
            if isinstance(leaf, _Layout):
                self.pin_vars(leaf.vars)

    def pin_vars(self, variables: Iterable[int]) -> None:
        for v in variables:
            self.sets.pin(v)

    def union(self, a: int, b: int) -> int:
        return self.sets.union(a, b)

    def dim(self, x: _Layout, d: int) -> tuple[int, int | None]:
        """The variable and size of dimension ``d``; an untracked one is a fresh pinned variable."""
        if not x.complete and d < -len(x.vars):
            return self.fresh(1)[0], None
        i = _axis(x, d)
        return x.vars[i], x.sizes[i]

    def merge(self, present: list[tuple[int, int | None]]) -> tuple[int, int | None]:
        """Broadcast one dimension of several operands: tie the ones that are not broadcast."""
        if len(present) == 1:
            return present[0]
        if any(s is None for _, s in present):
            self.pin_vars(v for v, _ in present)
            return self.fresh(1)[0], None
        wide = [(v, s) for v, s in present if s != 1] or present
        if len({s for _, s in wide}) > 1:
            raise _Unsupported
        return reduce(self.union, (v for v, _ in wide)), wide[0][1]

    def out_shape(self) -> tuple[int, ...] | None:
        """The recorded shape of the node being analysed, when shapes were recorded."""
        return tuple(self._out_meta) if isinstance(self._out_meta, torch.Size) else None

    # ---- calls -----------------------------------------------------------------------------------

    def opaque(self, args: Any, kwargs: Any, module: nn.Module | None = None) -> _Layout:
        """A call that is not understood: everything it touches is pinned."""
        self.pin((args, kwargs))
        if module is not None:
            for t in [*module.parameters(), *module.buffers()]:
                self.pin(self.tensor(t))
        return _UNKNOWN

    def call_module(self, m: nn.Module, args: tuple, kwargs: dict) -> Any:
        handler = _MODULE_HANDLERS.get(type(m))
        if handler is None or _has_hooks(m):
            return self.opaque(args, kwargs, m)
        try:
            return handler(self, m, args, kwargs)
        except _Unsupported:
            return self.opaque(args, kwargs, m)

    def call_submodule(self, m: nn.Module, args: tuple) -> Any:
        """A module called by a composite module's handler (no traced shape belongs to it)."""
        saved, self._out_meta = self._out_meta, None
        try:
            return self.call_module(m, args, {})
        finally:
            self._out_meta = saved

    def call(self, op: str, target: Any, args: tuple, kwargs: dict) -> Any:
        handler = (_METHOD_HANDLERS if op == "call_method" else _FUNCTION_HANDLERS).get(target)
        if handler is None:
            return self.opaque(args, kwargs)
        try:
            return handler(self, args, kwargs)
        except _Unsupported:
            return self.opaque(args, kwargs)

    # ---- graphs ----------------------------------------------------------------------------------

    def fit(self, value: Any, meta: Any) -> Any:
        """Reconcile an inferred value with what the node really produced (see :func:`_shapes`),
        which wins where they disagree."""
        if isinstance(meta, torch.Size):
            shape = tuple(meta)
            if isinstance(value, _Layout):
                n = len(value.vars)
                fits = n == len(shape) or (not value.complete and n < len(shape))
                if fits and all(s is None or s == t for s, t in zip(value.sizes, shape[len(shape) - n :])):
                    return _Layout(self.fresh(len(shape) - n) + value.vars, shape, True)
            self.pin(value)
            return _Layout(self.fresh(len(shape)), shape, True)
        if isinstance(meta, (tuple, list, dict)):
            items, values = _entries(meta), _entries(value)
            if values.keys() != items.keys():
                self.pin(value)
                values = dict.fromkeys(items, _UNKNOWN)
            fitted = {k: self.fit(values[k], m) for k, m in items.items()}
            return fitted if isinstance(meta, dict) else tuple(fitted.values())
        self.pin(value)
        return _NONTENSOR

    def run(self, gm: fx.GraphModule, shapes: dict[fx.Node, Any] | None) -> None:
        """Walk a traced graph, with what each node produced on example inputs if it was run."""
        env: dict[fx.Node, Any] = {}
        for node in gm.graph.nodes:
            meta = shapes.get(node, _NONTENSOR) if shapes is not None else None
            self._out_meta = meta
            if node.op == "output":
                self.pin(map_arg(node.args, env.__getitem__))
                continue
            if node.op == "placeholder":
                value = _UNKNOWN
            elif node.op == "get_attr":
                attr = reduce(getattr, node.target.split("."), gm)
                value = self.tensor(attr) if isinstance(attr, torch.Tensor) else _NONTENSOR
            else:
                args = map_arg(node.args, env.__getitem__)
                kwargs = map_arg(node.kwargs, env.__getitem__)
                if node.op == "call_module":
                    value = self.call_module(gm.get_submodule(node.target), args, kwargs)
                else:
                    value = self.call(node.op, node.target, args, kwargs)
            env[node] = self.fit(value, meta) if shapes is not None else value

    def trace(self, module: nn.Module) -> list[fx.GraphModule] | None:
        """The module's graphs in eval and (if different) train mode; None if it cannot be traced."""
        key = id(module)
        if key not in self._traces:
            self._traces[key] = None
            try:
                graphs = [self._trace_in_mode(module, training) for training in (False, True)]
            except Exception:  # tracing fails in many ways (control flow, proxies misused, ...)
                return None
            self._traces[key] = graphs[:1] if _signature(graphs[0]) == _signature(graphs[1]) else graphs
        return self._traces[key]

    def _trace_in_mode(self, module: nn.Module, training: bool) -> fx.GraphModule:
        with _training(module, training):
            if fx.Tracer().is_leaf_module(module, ""):
                return _leaf_graph(module)
            if _has_hooks(module):
                raise _Unsupported  # a traced root's own hooks would be missed
            try:
                return fx.GraphModule(module, fx.Tracer().trace(module))
            except Exception:
                return fx.GraphModule(module, _IsolatingTracer(self).trace(module))

    # ---- whole models ----------------------------------------------------------------------------

    def analyse(self, model: nn.Module, inputs: tuple | None) -> None:
        """Analyse the model whole if it traces, else the largest submodules that do."""
        if self.trace(model) is not None:
            self._analyse_unit(model, inputs)
            return
        if inputs is None:
            warnings.warn(
                f"{type(model).__name__} cannot be traced by torch.fx and no example_inputs were given: "
                "every parameter gets independent labels",
                stacklevel=3,
            )
            return
        units = list({id(u): u for u in self._units(model)}.values())
        calls, outside = _monitored_forward(model, units, inputs, set(self.vars))
        for key in outside:
            self.pin_vars(self.vars[key])
        for unit in units:
            self._analyse_unit(unit, calls.get(id(unit)))

    def _units(self, module: nn.Module) -> list[nn.Module]:
        if self.trace(module) is not None:
            return [module]
        return [u for child in module.children() for u in self._units(child)]

    def _analyse_unit(self, module: nn.Module, inputs: tuple | None) -> None:
        graphs = self.trace(module)
        self.run(graphs[0], None if inputs is None else _record_shapes(graphs[0], module, inputs))
        for gm in graphs[1:]:
            self.run(gm, None)

    # ---- labels ----------------------------------------------------------------------------------

    def specs(self, named: Sequence[tuple[str, torch.Tensor]]) -> tuple[TensorSpec, ...]:
        """Labels from the classes: a coupled class is a set named after its first axis
        (``"<tensor>:<axis>"``); every other axis is a set of its own, named the same way."""
        find = self.sets.find
        while True:
            classes = self._coupled_classes(named)
            # Neither can be a symmetry: a class whose axes differ in size (an operation misread),
            # and more coupled axes on one tensor than a TensorSpec holds (rare; some give way).
            dropped = [root for root, axes in classes.items() if len({size for _, _, size in axes}) > 1]
            for _, t in named:
                dropped += [v for v in self.vars[id(t)] if find(v) in classes][MAX_LABELLED_AXES:]
            if not dropped:
                break
            self.pin_vars(dropped)
        out = []
        for name, t in named:
            coupled = {ax: "{}:{}".format(*classes[find(v)][0][:2])
                       for ax, v in enumerate(self.vars[id(t)]) if find(v) in classes}
            single = [ax for ax in range(t.dim()) if ax not in coupled][: MAX_LABELLED_AXES - len(coupled)]
            axes = tuple(coupled.get(ax, f"{name}:{ax}" if ax in single else None) for ax in range(t.dim()))
            out.append(TensorSpec(tuple(t.shape), axes, name))
        return tuple(out)

    def _coupled_classes(self, named: Sequence[tuple[str, torch.Tensor]]) -> dict[int, list[tuple[str, int, int]]]:
        """The unpinned classes that label two or more axes: root -> (tensor name, axis, size) of each."""
        classes: dict[int, list[tuple[str, int, int]]] = {}
        for name, t in named:
            for ax, v in enumerate(self.vars[id(t)]):
                if not self.sets.pinned(v):
                    classes.setdefault(self.sets.find(v), []).append((name, ax, t.shape[ax]))
        return {root: axes for root, axes in classes.items() if len(axes) > 1}


class _IsolatingTracer(fx.Tracer):
    """A tracer that keeps as opaque leaves the submodules that cannot be traced on their own."""

    def __init__(self, inference: _Inference) -> None:
        super().__init__()
        self._inference = inference

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return super().is_leaf_module(m, module_qualified_name) or self._inference.trace(m) is None


def _leaf_graph(module: nn.Module) -> fx.GraphModule:
    """A graph that calls a leaf module (one fx would not trace into) on its positional inputs."""
    graph = fx.Graph()
    args = []
    for p in inspect.signature(module.forward).parameters.values():
        if p.kind not in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD):
            break
        args.append(graph.placeholder(p.name, default_value=p.default))
    graph.output(graph.call_module("leaf", tuple(args)))
    root = nn.Module()
    root.add_module("leaf", module)
    return fx.GraphModule(root, graph)


_MODE_FLAG_TARGETS = frozenset(
    [F.dropout, F.alpha_dropout, F.feature_alpha_dropout, F.dropout1d, F.dropout2d, F.dropout3d,
     F.batch_norm, F.instance_norm]
)
"""Functions whose boolean argument is the training flag, which the analysis does not depend on."""


def _signature(gm: fx.GraphModule) -> str:
    """A graph's text, with the training flags of :data:`_MODE_FLAG_TARGETS` calls erased."""
    def erase(a: Any) -> Any:
        return "<flag>" if isinstance(a, bool) else a

    return repr([
        (n.op, n.target, n.name, *((map_aggregate(n.args, erase), map_aggregate(n.kwargs, erase))
                                   if n.target in _MODE_FLAG_TARGETS else (n.args, n.kwargs)))
        for n in gm.graph.nodes
    ])


class _ShapeRecorder(fx.Interpreter):
    """Runs a graph, recording what every node produces (see :func:`_shapes`)."""

    def __init__(self, gm: fx.GraphModule) -> None:
        super().__init__(gm)
        self.extra_traceback = False  # the caller reports errors in a warning of its own
        self.shapes: dict[fx.Node, Any] = {}

    def run_node(self, n: fx.Node) -> Any:
        result = super().run_node(n)
        self.shapes[n] = _shapes(result)
        return result


def _shapes(value: Any) -> Any:
    """A tensor's shape; for a tuple, list or dict holding tensors, the same structure of these;
    otherwise (sizes, dtypes, None) :data:`_NONTENSOR`."""
    if isinstance(value, torch.Tensor):
        return value.shape
    if isinstance(value, torch.Size) or not any(isinstance(v, torch.Tensor) for v in _leaves(value)):
        return _NONTENSOR
    if isinstance(value, dict):
        return {k: _shapes(v) for k, v in value.items()}
    return tuple(_shapes(v) for v in value)


def _record_shapes(gm: fx.GraphModule, module: nn.Module, inputs: tuple) -> dict[fx.Node, Any] | None:
    """Run the graph on the inputs (eval mode, no_grad): each node's output shapes, or None (and a
    warning) if the model fails on them."""
    recorder = _ShapeRecorder(gm)
    try:
        with torch.no_grad(), _training(module, False):
            recorder.run(*inputs)
    except Exception as e:  # any error of the model's own code on these inputs
        warnings.warn(
            f"could not run {type(module).__name__} on the example inputs ({type(e).__name__}: {e}); "
            "labels that depend on shapes stay uncoupled",
            stacklevel=5,
        )
        return None
    return recorder.shapes


def _monitored_forward(
    model: nn.Module, units: Sequence[nn.Module], inputs: tuple, watched: set[int]
) -> tuple[dict[int, tuple], set[int]]:
    """Run the model once (eval mode, no_grad), recording each unit's first positional inputs and
    the watched tensors (by id) that a torch function receives outside every unit's forward."""
    calls: dict[int, tuple] = {}
    outside: set[int] = set()
    depth = 0

    def enter(m: nn.Module, args: tuple) -> None:
        nonlocal depth
        depth += 1
        calls.setdefault(id(m), args)

    def leave(m: nn.Module, args: tuple, out: Any) -> None:
        nonlocal depth
        depth -= 1

    class Watch(TorchFunctionMode):
        def __torch_function__(self, func: Callable, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
            kwargs = kwargs or {}
            if depth == 0:
                outside.update(id(t) for t in _leaves((args, kwargs)) if isinstance(t, torch.Tensor))
            return func(*args, **kwargs)

    handles = [h for u in units for h in (u.register_forward_pre_hook(enter), u.register_forward_hook(leave))]
    try:
        with torch.no_grad(), _training(model, False), Watch():
            model(*inputs)
    except Exception as e:
        raise ValueError(f"the model failed on example_inputs ({type(e).__name__}: {e})") from e
    finally:
        for h in handles:
            h.remove()
    return calls, outside & watched


# --------------------------------------------------------------------------------------------------
# What operations do to axis variables
# --------------------------------------------------------------------------------------------------


def _pointwise(inf: _Inference, *values: Any) -> Any:
    """Elementwise over broadcast operands (and any op equivariant along every axis, like softmax):
    each output axis ties the operands' axes that are not broadcast."""
    layouts = [v for v in _leaves(values) if isinstance(v, _Layout)]
    if not layouts:
        return _NONTENSOR
    partial = [x for x in layouts if not x.complete]
    n = min(len(x.vars) for x in partial) if partial else max(len(x.vars) for x in layouts)
    merged = [inf.merge([(x.vars[-p], x.sizes[-p]) for x in layouts if len(x.vars) >= p]) for p in range(n, 0, -1)]
    inf.pin([x.lead(n) for x in layouts])
    return _Layout(tuple(v for v, _ in merged), tuple(s for _, s in merged), not partial)


def _matmul(inf: _Inference, a: Any, b: Any) -> _Layout:
    """``a @ b``: the contracted axes are tied, batch axes broadcast."""
    a, b = _layout(a), _layout(b)
    if b.complete and 1 <= len(b.vars) <= 2:
        inf.union(inf.dim(a, -1)[0], b.vars[0])
        lead = a.lead(1)
        return _Layout(lead.vars + b.vars[1:], lead.sizes + b.sizes[1:], a.complete)
    if not (a.complete and b.complete and a.vars):
        raise _Unsupported
    inf.union(a.vars[-1], b.vars[-2])
    if len(a.vars) == 1:
        return _Layout(b.vars[:-2] + b.vars[-1:], b.sizes[:-2] + b.sizes[-1:], True)
    batch = _pointwise(inf, a.lead(2), b.lead(2))
    return _Layout(batch.vars + (a.vars[-2], b.vars[-1]), batch.sizes + (a.sizes[-2], b.sizes[-1]), True)


def _linear(inf: _Inference, x: Any, w: Any, b: Any) -> Any:
    w = _weight(w, 2)
    return _pointwise(inf, _matmul(inf, x, _Layout(w.vars[::-1], w.sizes[::-1], True)), b)


def _conv(inf: _Inference, x: Any, w: Any, b: Any, d: int, groups: Any, transposed: bool) -> _Layout:
    """A ``d``-dimensional (transposed) convolution; grouped ones other than depthwise pin channels."""
    x, w = _layout(x), _weight(w, d + 2)
    if not isinstance(groups, int):
        raise _Unsupported
    c_in, _ = inf.dim(x, -(d + 1))
    inf.pin_vars([inf.dim(x, -i)[0] for i in range(1, d + 1)] + list(w.vars[2:]))
    a_in, a_out = (0, 1) if transposed else (1, 0)
    if groups == 1:
        inf.union(c_in, w.vars[a_in])
        out, size = w.vars[a_out], w.sizes[a_out]
    elif not transposed and w.sizes[1] == 1 and w.sizes[0] == groups:  # depthwise: channel c to c
        inf.union(c_in, w.vars[0])
        out, size = w.vars[0], w.sizes[0]
    else:
        inf.pin_vars((c_in, *w.vars[:2]))
        (out,), size = inf.fresh(1), None
    if b is not None:
        inf.union(out, _weight(b, 1).vars[0])
    lead = x.lead(d + 1)
    return _Layout(lead.vars + (out,) + inf.fresh(d), lead.sizes + (size,) + (None,) * d, x.complete)


def _per_channel(inf: _Inference, x: Any, dim: int, *vectors: Any) -> _Layout:
    """An op acting on each channel along ``dim`` alike, with per-channel vectors (norms, PReLU)."""
    x = _layout(x)
    c, _ = inf.dim(x, dim)
    for v in vectors:
        if v is not None:
            inf.union(c, _weight(v, 1).vars[0])
    return x


def _group_norm(inf: _Inference, x: Any, groups: Any, w: Any, b: Any) -> _Layout:
    """GroupNorm is equivariant to channel permutations only with one group or one channel per group."""
    x = _layout(x)
    c, size = inf.dim(x, 1)
    if size is None and w is not None:
        size = _weight(w, 1).sizes[0]
    if groups == 1 or groups == size:
        return _per_channel(inf, x, 1, w, b)
    inf.pin_vars((c,))
    inf.pin((w, b))
    return x


def _embedding(inf: _Inference, idx: Any, w: Any) -> _Layout:
    """Rows are picked by the input's values, so the row axis is pinned; features are appended."""
    idx, w = _layout(idx), _weight(w, 2)
    inf.pin_vars(w.vars[:1])
    return _Layout(idx.vars + w.vars[1:], idx.sizes + w.sizes[1:], idx.complete)


def _spatial(inf: _Inference, x: Any, d: int) -> _Layout:
    """Pooling over the last ``d`` (spatial) axes: channels and batch carried, positions pinned."""
    x = _layout(x)
    c, size = inf.dim(x, -(d + 1))
    inf.pin_vars([inf.dim(x, -i)[0] for i in range(1, d + 1)])
    lead = x.lead(d + 1)
    return _Layout(lead.vars + (c,) + inf.fresh(d), lead.sizes + (size,) + (None,) * d, x.complete)


def _reshape(inf: _Inference, x: Any) -> _Layout:
    """A reshape (view, flatten, squeeze, ...) to the traced output shape.

    Axes of size 1 carry nothing. The other axes fall into blocks of equal products between input
    and output; a block of one input and one output axis carries its variable, any other block
    mixes axes (a flatten of channels with positions) and pins them.
    """
    x, shape = _layout(x), inf.out_shape()
    if shape is None or not x.complete or None in x.sizes or 0 in x.sizes or 0 in shape:
        raise _Unsupported
    ins = [(v, s) for v, s in zip(x.vars, x.sizes) if s != 1]
    outs = [j for j, s in enumerate(shape) if s != 1]
    out_vars = list(inf.fresh(len(shape)))
    i = j = 0
    while i < len(ins) and j < len(outs):
        block_in, block_out = [ins[i]], [outs[j]]
        p_in, p_out = ins[i][1], shape[outs[j]]
        i, j = i + 1, j + 1
        while p_in != p_out:
            if p_in < p_out and i < len(ins):
                block_in.append(ins[i])
                p_in, i = p_in * ins[i][1], i + 1
            elif p_out < p_in and j < len(outs):
                block_out.append(outs[j])
                p_out, j = p_out * shape[outs[j]], j + 1
            else:
                raise _Unsupported
        if len(block_in) == 1 and len(block_out) == 1:
            out_vars[block_out[0]] = block_in[0][0]
        else:
            inf.pin_vars(v for v, _ in block_in)
    if i != len(ins) or j != len(outs):
        raise _Unsupported
    return _Layout(tuple(out_vars), shape, True)


def _reorder(x: _Layout, order: Sequence[int]) -> _Layout:
    return _Layout(tuple(x.vars[i] for i in order), tuple(x.sizes[i] for i in order), x.complete)


def _transpose(x: Any, d0: Any, d1: Any) -> _Layout:
    x = _layout(x)
    i, j = _axis(x, d0), _axis(x, d1)
    order = list(range(len(x.vars)))
    order[i], order[j] = j, i
    return _reorder(x, order)


def _reduce(inf: _Inference, x: Any, dims: Any, keepdim: Any) -> _Layout:
    """Sums, means, maxima over axes: invariant to permuting them, so the reduced axes just go."""
    x = _layout(x)
    if not isinstance(keepdim, bool):
        raise _Unsupported
    if dims is None or dims == () or dims == []:
        if not keepdim:
            return _Layout((), (), True)
        if not x.complete:
            raise _Unsupported
        reduced = set(range(len(x.vars)))
    else:
        reduced = {_axis(x, d) for d in (dims if isinstance(dims, (tuple, list)) else (dims,))}
    kept = [(inf.fresh(1)[0], 1) if i in reduced else (v, s) for i, (v, s) in enumerate(zip(x.vars, x.sizes))
            if keepdim or i not in reduced]
    return _Layout(tuple(v for v, _ in kept), tuple(s for _, s in kept), x.complete)


def _concat(inf: _Inference, tensors: Any, dim: Any, new_axis: bool) -> _Layout:
    """``cat`` (the joined axis pinned, the others tied) or ``stack`` (all tied, a new pinned axis)."""
    if not isinstance(tensors, (tuple, list)) or not tensors:
        raise _Unsupported
    xs = [_layout(t) for t in tensors]
    n = len(xs[0].vars)
    if any(not x.complete or len(x.vars) != n for x in xs):
        raise _Unsupported
    at = _dim_index(dim, n + new_axis, True)
    sizes = list(xs[0].sizes)
    out = []
    for i in range(n):
        column = [x.vars[i] for x in xs]
        if i == at and not new_axis:
            inf.pin_vars(column)
            out.append(inf.fresh(1)[0])
            sizes[i] = None
        else:
            out.append(reduce(inf.union, column))
    if new_axis:
        out.insert(at, inf.fresh(1)[0])
        sizes.insert(at, len(xs))
    return _Layout(tuple(out), tuple(sizes), True)


def _index(inf: _Inference, x: Any, index: Any) -> Any:
    """Basic indexing: full slices keep an axis; ints and other slices (whatever their bounds)
    pick positions, so pin it."""
    if x is _NONTENSOR:
        return _NONTENSOR
    if isinstance(x, (tuple, list)):
        if isinstance(index, bool) or not isinstance(index, (int, slice)) or any(
            v is not None and not isinstance(v, int) for v in _leaves(index)
        ):
            raise _Unsupported
        try:
            return x[index]
        except IndexError:
            raise _Unsupported from None
    x = _layout(x)
    items = index if isinstance(index, tuple) else (index,)
    simple = all(
        it is None or it is Ellipsis or isinstance(it, slice) or (isinstance(it, int) and not isinstance(it, bool))
        for it in items
    )
    used = sum(it is not None and it is not Ellipsis for it in items)
    if not (simple and x.complete) or used > len(x.vars) or sum(it is Ellipsis for it in items) > 1:
        raise _Unsupported
    rest = [slice(None)] * (len(x.vars) - used)
    expanded = [e for it in items for e in (rest if it is Ellipsis else [it])]
    expanded += rest if Ellipsis not in items else []
    out: list[tuple[int, int | None]] = []
    pos = 0
    for it in expanded:
        if it is None:
            out.append((inf.fresh(1)[0], 1))
            continue
        v, s = x.vars[pos], x.sizes[pos]
        pos += 1
        if it == slice(None):
            out.append((v, s))
            continue
        inf.pin_vars((v,))
        if isinstance(it, slice):
            out.append((inf.fresh(1)[0], None))
    return _Layout(tuple(v for v, _ in out), tuple(s for _, s in out), True)


def _attention(inf: _Inference, m: nn.MultiheadAttention, args: tuple, kwargs: dict) -> tuple:
    """nn.MultiheadAttention: input features tied to the projections' columns and the output
    features to out_proj's rows. The packed q/k/v rows and the head axis stay pinned (permuting
    them across heads or between q, k and v is no symmetry)."""
    names = ("query", "key", "value")
    qkv = [_layout(_arg(args, kwargs, i, name)) for i, name in enumerate(names)]
    inf.pin((args[3:], {k: v for k, v in kwargs.items() if k not in names}))
    packed = m.in_proj_weight is not None
    projections = [m.in_proj_weight] * 3 if packed else [m.q_proj_weight, m.k_proj_weight, m.v_proj_weight]
    for x, w in zip(qkv, projections):
        w = inf.tensor(w)
        inf.union(inf.dim(x, -1)[0], w.vars[1])
        inf.pin(x.lead(1))
        inf.pin_vars(w.vars[:1])
    inf.pin((inf.tensor(m.in_proj_bias), inf.tensor(m.bias_k), inf.tensor(m.bias_v)))
    out_w = inf.tensor(m.out_proj.weight)
    inf.pin_vars(out_w.vars[1:])
    if m.out_proj.bias is not None:
        inf.union(out_w.vars[0], inf.tensor(m.out_proj.bias).vars[0])
    n_lead = len(qkv[0].lead(1).vars)
    out = _Layout(inf.fresh(n_lead) + out_w.vars[:1], (None,) * n_lead + out_w.sizes[:1], qkv[0].complete)
    return out, _UNKNOWN


def _encoder_layer(inf: _Inference, m: nn.TransformerEncoderLayer, args: tuple, kwargs: dict) -> Any:
    """nn.TransformerEncoderLayer, following its forward: the residual stream's features tie
    attention's input and output, the norms and the feed-forward block's ends; the feed-forward
    hidden neurons are a set of their own when the activation is elementwise."""
    x = _layout(_arg(args, kwargs, 0, "src"))
    inf.pin((args[1:], {k: v for k, v in kwargs.items() if k != "src"}))

    def attend(y: Any) -> Any:
        out = inf.call_submodule(m.self_attn, (y, y, y))
        if isinstance(out, tuple):
            return out[0]
        inf.pin(out)
        return _UNKNOWN

    def feed_forward(y: Any) -> Any:
        h = inf.call_submodule(m.linear1, (y,))
        if not _is_elementwise(m.activation):
            h = inf.opaque((h,), {})
        return inf.call_submodule(m.linear2, (h,))

    if m.norm_first:
        x = _pointwise(inf, x, attend(inf.call_submodule(m.norm1, (x,))))
        return _pointwise(inf, x, feed_forward(inf.call_submodule(m.norm2, (x,))))
    x = inf.call_submodule(m.norm1, (_pointwise(inf, x, attend(x)),))
    return inf.call_submodule(m.norm2, (_pointwise(inf, x, feed_forward(x)),))


def _encoder(inf: _Inference, m: nn.TransformerEncoder, args: tuple, kwargs: dict) -> Any:
    """nn.TransformerEncoder: its layers in turn, then its final norm."""
    x = _arg(args, kwargs, 0, "src")
    inf.pin((args[1:], {k: v for k, v in kwargs.items() if k != "src"}))
    for layer in m.layers:
        x = inf.call_submodule(layer, (x,))
    return x if m.norm is None else inf.call_submodule(m.norm, (x,))


# --------------------------------------------------------------------------------------------------
# Dispatch tables: what each call_function / call_method / call_module target does
# --------------------------------------------------------------------------------------------------


def _arg(args: tuple, kwargs: dict, i: int, name: str, default: Any = None) -> Any:
    return args[i] if len(args) > i else kwargs.get(name, default)


def _input(args: tuple, kwargs: dict) -> Any:
    return _arg(args, kwargs, 0, "input")


def _pointwise_call(inf: _Inference, args: tuple, kwargs: dict) -> Any:
    return _pointwise(inf, args, kwargs)


def _first_only(inf: _Inference, args: tuple, kwargs: dict) -> _Layout:
    """Casts and copies (``x.to(y)`` takes only y's dtype): the layout of the tensor itself."""
    return _layout(args[0])


def _reshape_call(inf: _Inference, args: tuple, kwargs: dict) -> _Layout:
    return _reshape(inf, args[0])


def _reduce_call(inf: _Inference, args: tuple, kwargs: dict) -> _Layout:
    return _reduce(inf, args[0], _arg(args, kwargs, 1, "dim"), _arg(args, kwargs, 2, "keepdim", False))


def _matmul_call(inf: _Inference, args: tuple, kwargs: dict) -> _Layout:
    return _matmul(inf, args[0], _arg(args, kwargs, 1, "other"))


def _transpose_call(inf: _Inference, args: tuple, kwargs: dict) -> _Layout:
    return _transpose(args[0], _arg(args, kwargs, 1, "dim0"), _arg(args, kwargs, 2, "dim1"))


def _permute_call(inf: _Inference, args: tuple, kwargs: dict) -> _Layout:
    x = _layout(args[0])
    dims = args[1] if len(args) == 2 and isinstance(args[1], (tuple, list)) else args[1:] or kwargs.get("dims")
    if not x.complete or not isinstance(dims, (tuple, list)) or len(dims) != len(x.vars):
        raise _Unsupported
    order = [_axis(x, d) for d in dims]
    if sorted(order) != list(range(len(x.vars))):
        raise _Unsupported
    return _reorder(x, order)


def _reversed(x: Any) -> _Layout:
    """All axes in reverse order (``x.T``, and ``x.t()`` of a matrix)."""
    x = _layout(x)
    if not x.complete:
        raise _Unsupported
    return _reorder(x, range(len(x.vars) - 1, -1, -1))


def _t_call(inf: _Inference, args: tuple, kwargs: dict) -> _Layout:
    if len(_layout(args[0]).vars) > 2:
        raise _Unsupported
    return _reversed(args[0])


def _cat_call(inf: _Inference, args: tuple, kwargs: dict) -> _Layout:
    return _concat(inf, _arg(args, kwargs, 0, "tensors"), _arg(args, kwargs, 1, "dim", 0), new_axis=False)


def _stack_call(inf: _Inference, args: tuple, kwargs: dict) -> _Layout:
    return _concat(inf, _arg(args, kwargs, 0, "tensors"), _arg(args, kwargs, 1, "dim", 0), new_axis=True)


def _getitem_call(inf: _Inference, args: tuple, kwargs: dict) -> Any:
    return _index(inf, args[0], args[1])


def _getattr_call(inf: _Inference, args: tuple, kwargs: dict) -> Any:
    x, name = args[0], args[1]
    if x is _NONTENSOR or name in ("shape", "dtype", "device", "ndim", "is_cuda", "layout"):
        return _NONTENSOR
    if name == "T":
        return _reversed(x)
    if name == "mT":
        return _transpose(x, -2, -1)
    raise _Unsupported


def _static_call(inf: _Inference, args: tuple, kwargs: dict) -> Any:
    """Sizes and ranks: not tensors, and independent of the order of any axis."""
    return _NONTENSOR


def _linear_call(inf: _Inference, args: tuple, kwargs: dict) -> Any:
    return _linear(inf, args[0], _arg(args, kwargs, 1, "weight"), _arg(args, kwargs, 2, "bias"))


def _embedding_call(inf: _Inference, args: tuple, kwargs: dict) -> _Layout:
    return _embedding(inf, args[0], _arg(args, kwargs, 1, "weight"))


def _group_norm_call(inf: _Inference, args: tuple, kwargs: dict) -> _Layout:
    w, b = _arg(args, kwargs, 2, "weight"), _arg(args, kwargs, 3, "bias")
    return _group_norm(inf, args[0], _arg(args, kwargs, 1, "num_groups"), w, b)


def _batch_norm_call(inf: _Inference, args: tuple, kwargs: dict) -> _Layout:
    """F.batch_norm and F.instance_norm: (input, running_mean, running_var, weight, bias, ...)."""
    names = ("running_mean", "running_var", "weight", "bias")
    return _per_channel(inf, args[0], 1, *(_arg(args, kwargs, i, n) for i, n in enumerate(names, 1)))


def _conv_call(d: int, transposed: bool) -> Callable:
    def handler(inf: _Inference, args: tuple, kwargs: dict) -> _Layout:
        w, b = _arg(args, kwargs, 1, "weight"), _arg(args, kwargs, 2, "bias")
        return _conv(inf, args[0], w, b, d, _arg(args, kwargs, 6, "groups", 1), transposed)

    return handler


def _pool_call(d: int, indices_at: int | None) -> Callable:
    def handler(inf: _Inference, args: tuple, kwargs: dict) -> _Layout:
        if indices_at is not None and _arg(args, kwargs, indices_at, "return_indices", False):
            raise _Unsupported
        return _spatial(inf, args[0], d)

    return handler


def _named(namespace: Any, names: str) -> list[Any]:
    """The attributes of ``namespace`` with these names that this torch version has."""
    return [getattr(namespace, n) for n in names.split() if hasattr(namespace, n)]


_POINTWISE_FUNCTIONS = [
    *_named(operator, "add sub mul truediv floordiv mod pow neg pos abs gt ge lt le iadd isub imul itruediv"),
    *_named(torch, "add sub subtract mul multiply div divide true_divide neg abs exp exp2 expm1 log log1p "
                   "log2 sqrt rsqrt square pow sin cos tanh sigmoid relu erf reciprocal sign clamp clip "
                   "maximum minimum softmax log_softmax layer_norm rms_norm"),
    *_named(F, "relu relu6 gelu silu mish elu selu celu leaky_relu softplus softsign hardtanh hardswish "
               "hardsigmoid logsigmoid tanhshrink softshrink hardshrink threshold tanh sigmoid dropout "
               "alpha_dropout feature_alpha_dropout dropout1d dropout2d dropout3d softmax log_softmax "
               "softmin normalize layer_norm rms_norm"),
]
"""Elementwise over broadcast operands, or equivariant along every axis (softmax, normalisations)."""

_POINTWISE_METHODS = (
    "add sub mul div pow neg abs exp log sqrt rsqrt square sigmoid tanh relu clamp clip softmax "
    "log_softmax masked_fill add_ sub_ mul_ div_ relu_ clamp_ sigmoid_ tanh_"
).split()

_FUNCTION_HANDLERS: dict[Any, Callable] = {
    **{f: _pointwise_call for f in _POINTWISE_FUNCTIONS},
    **{f: _reshape_call for f in _named(torch, "flatten reshape squeeze unsqueeze")},
    **{f: _reduce_call for f in _named(torch, "sum mean amax amin logsumexp")},
    **{f: _matmul_call for f in (torch.matmul, operator.matmul, torch.mm, torch.bmm)},
    **{f: _transpose_call for f in _named(torch, "transpose swapaxes")},
    **{f: _cat_call for f in _named(torch, "cat concat concatenate")},
    torch.stack: _stack_call,
    torch.permute: _permute_call,
    torch.t: _t_call,
    operator.getitem: _getitem_call,
    getattr: _getattr_call,
    F.linear: _linear_call,
    F.embedding: _embedding_call,
    F.group_norm: _group_norm_call,
    F.batch_norm: _batch_norm_call,
    F.instance_norm: _batch_norm_call,
    **{f: _conv_call(d, False) for d, f in enumerate((F.conv1d, F.conv2d, F.conv3d), 1)},
    **{f: _conv_call(d, True) for d, f in enumerate((F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d), 1)},
    **{f: _pool_call(d, 6) for d, f in enumerate((F.max_pool1d, F.max_pool2d, F.max_pool3d), 1)},
    **{f: _pool_call(d, 2) for d in (1, 2, 3) for f in _named(F, f"adaptive_max_pool{d}d")},
    **{f: _pool_call(d, None) for name in ("avg_pool", "adaptive_avg_pool", "lp_pool")
       for d in (1, 2, 3) for f in _named(F, f"{name}{d}d")},
}

_METHOD_HANDLERS: dict[str, Callable] = {
    **{name: _pointwise_call for name in _POINTWISE_METHODS},
    **{name: _first_only for name in "to type_as float double half bfloat16 contiguous clone detach cpu cuda".split()},
    **{name: _static_call for name in "size dim numel ndimension nelement".split()},
    **{name: _reshape_call for name in "view reshape flatten unflatten squeeze unsqueeze view_as reshape_as".split()},
    **{name: _reduce_call for name in "sum mean amax amin logsumexp".split()},
    **{name: _matmul_call for name in "matmul mm bmm __matmul__".split()},
    **{name: _transpose_call for name in "transpose swapaxes".split()},
    "permute": _permute_call,
    "t": _t_call,
}


_ELEMENTWISE_MODULES = _named(
    nn,
    "Identity ReLU ReLU6 GELU Tanh Sigmoid SiLU Mish LeakyReLU ELU SELU CELU Softplus Softsign Hardtanh "
    "Hardswish Hardsigmoid Tanhshrink Softshrink Hardshrink LogSigmoid Threshold Dropout Dropout1d "
    "Dropout2d Dropout3d AlphaDropout FeatureAlphaDropout Softmax LogSoftmax Softmin Softmax2d",
)


def _is_elementwise(fn: Any) -> bool:
    """Whether a callable (a TransformerEncoderLayer's activation) acts elementwise."""
    return type(fn) in _ELEMENTWISE_MODULES or any(fn is f for f in _POINTWISE_FUNCTIONS)


def _elementwise_module(inf: _Inference, m: nn.Module, args: tuple, kwargs: dict) -> Any:
    return _pointwise(inf, _input(args, kwargs))


def _linear_module(inf: _Inference, m: nn.Module, args: tuple, kwargs: dict) -> Any:
    return _linear(inf, _input(args, kwargs), inf.tensor(m.weight), inf.tensor(m.bias))


def _layer_norm_module(inf: _Inference, m: nn.Module, args: tuple, kwargs: dict) -> Any:
    """LayerNorm and RMSNorm: equivariant along every axis, affine weights broadcast on the last."""
    return _pointwise(inf, _input(args, kwargs), inf.tensor(m.weight), inf.tensor(getattr(m, "bias", None)))


def _group_norm_module(inf: _Inference, m: nn.Module, args: tuple, kwargs: dict) -> _Layout:
    return _group_norm(inf, _input(args, kwargs), m.num_groups, inf.tensor(m.weight), inf.tensor(m.bias))


def _prelu_module(inf: _Inference, m: nn.Module, args: tuple, kwargs: dict) -> Any:
    """PReLU: one slope per channel (axis 1), or one for all."""
    if m.num_parameters == 1:
        return _pointwise(inf, _input(args, kwargs))
    return _per_channel(inf, _input(args, kwargs), 1, inf.tensor(m.weight))


def _embedding_module(inf: _Inference, m: nn.Module, args: tuple, kwargs: dict) -> _Layout:
    return _embedding(inf, _input(args, kwargs), inf.tensor(m.weight))


def _reshape_module(inf: _Inference, m: nn.Module, args: tuple, kwargs: dict) -> _Layout:
    return _reshape(inf, _input(args, kwargs))


def _channel_dim_module(dim: int) -> Callable:
    """Batch and instance norms: per-channel weights and running statistics along ``dim``."""

    def handler(inf: _Inference, m: nn.Module, args: tuple, kwargs: dict) -> _Layout:
        tensors = (m.weight, m.bias, getattr(m, "running_mean", None), getattr(m, "running_var", None))
        return _per_channel(inf, _input(args, kwargs), dim, *map(inf.tensor, tensors))

    return handler


def _conv_module(d: int, transposed: bool) -> Callable:
    def handler(inf: _Inference, m: nn.Module, args: tuple, kwargs: dict) -> _Layout:
        return _conv(inf, _input(args, kwargs), inf.tensor(m.weight), inf.tensor(m.bias), d, m.groups, transposed)

    return handler


def _pool_module(d: int) -> Callable:
    def handler(inf: _Inference, m: nn.Module, args: tuple, kwargs: dict) -> _Layout:
        if getattr(m, "return_indices", False):
            raise _Unsupported
        return _spatial(inf, _input(args, kwargs), d)

    return handler


_MODULE_HANDLERS: dict[type, Callable] = {
    **{cls: _elementwise_module for cls in _ELEMENTWISE_MODULES},
    nn.Linear: _linear_module,
    nn.modules.linear.NonDynamicallyQuantizableLinear: _linear_module,
    **{cls: _conv_module(d, False) for d, cls in enumerate((nn.Conv1d, nn.Conv2d, nn.Conv3d), 1)},
    **{cls: _conv_module(d, True) for d in (1, 2, 3) for cls in _named(nn, f"ConvTranspose{d}d")},
    nn.BatchNorm1d: _channel_dim_module(1),
    nn.SyncBatchNorm: _channel_dim_module(1),
    nn.BatchNorm2d: _channel_dim_module(-3),
    nn.BatchNorm3d: _channel_dim_module(-4),
    **{cls: _channel_dim_module(-(d + 1)) for d in (1, 2, 3) for cls in _named(nn, f"InstanceNorm{d}d")},
    **{cls: _layer_norm_module for cls in _named(nn, "LayerNorm RMSNorm")},
    nn.GroupNorm: _group_norm_module,
    nn.PReLU: _prelu_module,
    nn.Embedding: _embedding_module,
    nn.Flatten: _reshape_module,
    nn.Unflatten: _reshape_module,
    **{cls: _pool_module(d) for name in ("MaxPool", "AvgPool", "AdaptiveAvgPool", "AdaptiveMaxPool", "LPPool")
       for d in (1, 2, 3) for cls in _named(nn, f"{name}{d}d")},
    nn.MultiheadAttention: _attention,
    nn.TransformerEncoderLayer: _encoder_layer,
    nn.TransformerEncoder: _encoder,
}
"""What each torch.nn leaf module (by exact type: a subclass may compute something else) does."""
