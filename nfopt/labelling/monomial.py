"""Monomial symmetries of a model: which coupled neuron sets also admit sign flips or scalings.

:func:`~nfopt.labelling.label_model` finds the neuron sets a model's function is invariant to
permuting. :func:`label_monomial` goes further for the sets of hidden units between two layers:
flipping the sign of, or scaling by c > 0, a unit's incoming weights and bias and dividing its
outgoing weights by the same factor leaves the function unchanged when everything between the
two layers commutes with that factor per channel (odd activations for signs, positively
homogeneous ones for scalings). A wrong claim would make the optimizer treat different functions
alike, so a set is only claimed after a check of every path through the model's ``torch.fx``
graph from the layers that produce its units to the layers that consume them; whatever the check
does not understand leaves the set with permutations only.
"""

from __future__ import annotations

import operator
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import reduce
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from ..weight_space import Label, MonomialElement, MonomialSpec
from .permutation import ModelLabelling, label_model, output_change, permute_model_
from .trace import Traces, as_tuple, available, call_arg, has_hooks, leaves, record_shapes

# --------------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MonomialLabelling:
    """A model's permutation labelling with the sign flips and scalings its coupled sets admit.

    ``params`` is over ``labelling.params`` (the model's parameters in ``model.parameters()``
    order, named by qualified name). Buffers only ever permute, so a set that labels a buffer
    axis admits permutations only.
    """

    params: MonomialSpec
    labelling: ModelLabelling

    def __post_init__(self) -> None:
        if self.params.space != self.labelling.params:
            raise ValueError("params must be a MonomialSpec over labelling.params")
        on_buffers = _buffer_sets(self.labelling)
        scaled = sorted(str(label) for label, _ in self.params.symmetries if label in on_buffers)
        if scaled:
            raise ValueError(f"neuron set {scaled[0]!r} labels a buffer axis, so it admits permutations only")

    def random_element(self, generator: torch.Generator | None = None, log10_scale: float = 3.0) -> MonomialElement:
        """A random element of the claimed group: a uniform permutation per coupled set (sets of one
        axis stay put), uniform signs or scalings log-uniform in [10**-log10_scale, 10**log10_scale]
        on the sets that admit them, factors of 1 elsewhere."""
        factors = self.params.random_element(generator, log10_scale).factors
        return MonomialElement(self.labelling.random_permutation(generator), factors)


def label_monomial(model: nn.Module, example_inputs: tuple | torch.Tensor | None = None) -> MonomialLabelling:
    """Infer the model's permutation labelling (:func:`~nfopt.labelling.label_model`) and, per
    coupled set, whether it also admits sign flips (``"sign"``) or positive scalings (``"scale"``).

    A set admits one when every axis it labels is a Linear's or conv's (``groups=1``) output axis
    or bias (exponent +1) or a following such layer's input axis (exponent -1), those parameters
    are used nowhere else, and every use of the producing layers' outputs leads, through operations
    that commute with the factor per channel, to the consuming layers' inputs, and nowhere else.
    For signs: tanh, sin, softsign, tanhshrink, soft and hard shrink, Hardtanh with symmetric
    bounds. For scalings: ReLU, LeakyReLU, PReLU with one slope, max pooling. For both: identity,
    dropout, negation and constant factors, average pooling, sums and means over other axes, and
    reshapes that keep the channel axis whole (these need ``example_inputs``). A set that admits
    both is labelled ``"scale"``. The whole model must trace with ``torch.fx`` (else no set admits
    more than permutations); the model is left as it was.
    """
    labelling = label_model(model, example_inputs)
    spec = labelling.params
    exponents = [list(row) for row in MonomialSpec.permutations_only(spec).exponents]
    symmetries: dict[Label, str] = {}
    graphs = Traces().graphs(model)
    if graphs is not None:
        inputs = as_tuple(example_inputs)
        shapes = None
        if inputs is not None:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # label_model has warned already if the model fails
                shapes = record_shapes(graphs[0], model, inputs)
        params = [p for _, p in model.named_parameters()]
        labels = {(id(p), ax): label for p, t in zip(params, spec.tensors) for ax, label in enumerate(t.axes)}
        analyses = [_Graph(gm, labels, shapes if i == 0 else None) for i, gm in enumerate(graphs)]
        on_buffers = _buffer_sets(labelling)
        for label in labelling.coupled_sets:
            members = spec.set_members.get(label, ())
            if not members or label in on_buffers:
                continue
            keys = [(id(params[ti]), ax) for ti, ax in members]
            for symmetry in ("scale", "sign"):
                roles = [g.roles(label, symmetry) for g in analyses]
                if all(r is not None and all(k in r for k in keys) for r in roles):
                    symmetries[label] = symmetry
                    for (ti, ax), k in zip(members, keys):
                        exponents[ti][ax] = roles[0][k]
                    break
    monomial = MonomialSpec(spec, tuple(symmetries.items()), tuple(map(tuple, exponents)))
    return MonomialLabelling(monomial, labelling)


def act_model_(model: nn.Module, labelling: MonomialLabelling, g: MonomialElement) -> None:
    """Apply a group element to the model in place: parameters are permuted and multiplied by their
    factors, buffers only permuted. With ``labelling.random_element()`` the model's function is
    unchanged when the labelling is correct."""
    _check_factors(labelling.params, g.factors)
    permute_model_(model, labelling.labelling, g.perm)
    named = dict(model.named_parameters())
    tensors = [named[t.name] for t in labelling.params.space.tensors]
    with torch.no_grad():
        for t, new in zip(tensors, labelling.params.act(tensors, MonomialElement({}, g.factors))):
            t.copy_(new)


def monomial_invariance_error(
    model: nn.Module,
    labelling: MonomialLabelling,
    example_inputs: tuple | torch.Tensor,
    trials: int = 3,
    generator: torch.Generator | None = None,
    log10_scale: float = 3.0,
) -> float:
    """How far the labelling is from true: the largest relative change of any output of the model
    (in eval mode) over ``trials`` random elements of its claimed group (scalings within
    ``log10_scale`` orders of magnitude either way). Zero up to rounding for a correct labelling;
    the model itself is not modified."""
    return output_change(
        model, example_inputs, lambda m: act_model_(m, labelling, labelling.random_element(generator, log10_scale)),
        trials,
    )


def _buffer_sets(labelling: ModelLabelling) -> set[Label]:
    """The sets that label a buffer axis: buffers only permute, so these admit nothing more."""
    return {label for t in labelling.buffers.tensors for label in t.axes if label is not None}


def _check_factors(spec: MonomialSpec, factors: Mapping[Label, torch.Tensor]) -> None:
    """Each set admitting signs or scalings needs a vector of ±1s or of positive finite numbers."""
    for label, symmetry in spec.symmetries:
        n = spec.space.set_sizes[label]
        f = factors.get(label)
        if not isinstance(f, torch.Tensor) or f.shape != (n,) or not f.is_floating_point():
            raise ValueError(f"set {label!r} needs a floating-point factor vector of shape ({n},)")
        valid = f.abs() == 1 if symmetry == "sign" else (f > 0) & f.isfinite()
        if not bool(valid.all()):
            must = "±1" if symmetry == "sign" else "positive and finite"
            raise ValueError(f"the factors of set {label!r} must be {must}")


# --------------------------------------------------------------------------------------------------
# The graph check
# --------------------------------------------------------------------------------------------------

_SIGN, _SCALE, _BOTH = frozenset({"sign"}), frozenset({"scale"}), frozenset({"sign", "scale"})


@dataclass(frozen=True)
class _Layer:
    """A Linear or conv call (``groups=1``) on parameters: its input, weight and bias, and where the
    channel axis of its input and output is (counted from the end: -1, or -(d+1) for a d-d conv)."""

    input: Any
    weight: torch.Tensor
    bias: torch.Tensor | None
    channel: int


_LAYER_MODULES = {nn.Linear: 0, nn.modules.linear.NonDynamicallyQuantizableLinear: 0,
                  nn.Conv1d: 1, nn.Conv2d: 2, nn.Conv3d: 3}
_LAYER_FUNCTIONS = {F.linear: 0, F.conv1d: 1, F.conv2d: 2, F.conv3d: 3}


def _layer(gm: fx.GraphModule, node: fx.Node) -> _Layer | None:
    """The layer a node calls, if it is one (exact module types: a subclass may compute otherwise)."""
    if node.op == "call_module":
        m = gm.get_submodule(node.target)
        d = _LAYER_MODULES.get(type(m))
        if d is None or has_hooks(m) or getattr(m, "groups", 1) != 1:
            return None
        return _Layer(call_arg(node.args, node.kwargs, 0, "input"), m.weight, m.bias, -(d + 1))
    d = _LAYER_FUNCTIONS.get(node.target) if node.op == "call_function" else None
    if d is None or (d and call_arg(node.args, node.kwargs, 6, "groups", 1) != 1):
        return None
    w, b = _param_node(gm, call_arg(node.args, node.kwargs, 1, "weight")), call_arg(node.args, node.kwargs, 2, "bias")
    if w is None or (b is not None and _param_node(gm, b) is None):
        return None
    return _Layer(call_arg(node.args, node.kwargs, 0, "input"), w, None if b is None else _param_node(gm, b), -(d + 1))


def _param_node(gm: fx.GraphModule, node: Any) -> torch.Tensor | None:
    """The parameter a ``get_attr`` node fetches, if it fetches one."""
    if not (isinstance(node, fx.Node) and node.op == "get_attr"):
        return None
    attr = reduce(getattr, node.target.split("."), gm)
    return attr if isinstance(attr, nn.Parameter) else None


def _nodes(node: fx.Node) -> list[fx.Node]:
    return [a for a in leaves((node.args, node.kwargs)) if isinstance(a, fx.Node)]


class _Graph:
    """One traced graph of the model: its layer calls, the parameters it uses in any other way, and
    (with example inputs) the shape of every node."""

    def __init__(self, gm: fx.GraphModule, labels: Mapping[tuple[int, int], Label], shapes: dict | None) -> None:
        self.gm, self.labels, self.shapes = gm, labels, shapes or {}
        self.layers = {n: layer for n in gm.graph.nodes if (layer := _layer(gm, n)) is not None}
        self.misused: set[int] = set()
        for n in gm.graph.nodes:
            if n.op == "call_module" and n not in self.layers:
                self.misused.update(id(p) for p in gm.get_submodule(n.target).parameters())
            param = _param_node(gm, n)
            if param is not None and not all(
                u in self.layers and self.layers[u].input is not n and _nodes(u).count(n) == 1 for u in n.users
            ):
                self.misused.add(id(param))

    def roles(self, label: Label, symmetry: str) -> dict[tuple[int, int], int] | None:
        """The exponent of each parameter axis in the set's layers, if ``symmetry`` (``"sign"`` or
        ``"scale"``) is one of this graph for the set; else None."""
        starts = {n: l for n, l in self.layers.items() if self.labels.get((id(l.weight), 0)) == label}
        ends = {n: l for n, l in self.layers.items() if self.labels.get((id(l.weight), 1)) == label}
        if any(l.bias is not None and self.labels.get((id(l.bias), 0)) != label for l in starts.values()):
            return None
        channel = {n: l.channel for n, l in starts.items()}  # every node carrying the set's channels
        queue = list(starts)
        while queue:
            n = queue.pop()
            for u in n.users:
                end = ends.get(u)
                if end is not None and end.input is n and _nodes(u).count(n) == 1 and end.channel == channel[n]:
                    continue
                step = self._step(u, n, channel[n])
                if step is None or symmetry not in step[0]:
                    return None
                if step[1] is not None:
                    channel[u] = step[1]
                    queue.append(u)
        if any(channel.get(l.input) != l.channel for l in ends.values()):
            return None
        roles = {(id(l.weight), 1): -1 for l in ends.values()}
        for l in starts.values():
            roles.update({(id(t), 0): 1 for t in (l.weight, l.bias) if t is not None})
        return {key: e for key, e in roles.items() if key[0] not in self.misused}

    def _step(self, u: fx.Node, n: fx.Node, c: int) -> tuple[frozenset[str], int | None] | None:
        """What node ``u`` does to its input ``n``, whose channel axis is ``c``: the factors it
        commutes with and where the channel axis of its output is (None: not a tensor). None if
        not understood."""
        if u.op == "call_method" and u.target in ("size", "dim") or (
            u.target is getattr and u.args[1] in ("shape", "ndim", "dtype", "device")
        ):
            return _BOTH, None
        nodes = _nodes(u)
        if call_arg(u.args, u.kwargs, 0, "input") is not n or nodes.count(n) != 1:
            return None
        if len(nodes) > 1 and (u.op == "call_module" or u.target not in _RESHAPES):
            return None  # only a reshape may take other nodes (sizes)
        if u.op == "call_module":
            m = self.gm.get_submodule(u.target)
            return None if has_hooks(m) else _module_step(self, u, m, c)
        table = _METHOD_STEPS if u.op == "call_method" else _FUNCTION_STEPS if u.op == "call_function" else {}
        step = table.get(u.target)
        return None if step is None else step(self, u, c)

    def reshaped(self, u: fx.Node, c: int) -> int | None:
        """Where a reshape puts the channel axis ``c`` of its input, if it keeps it whole: the same
        size with the same product of sizes before it (row-major order then keeps every index).
        Arguments must be sizes (ints or nodes): ``view(dtype)`` reinterprets bits."""
        before, after = self.shapes.get(call_arg(u.args, u.kwargs, 0, "input")), self.shapes.get(u)
        if not (isinstance(before, torch.Size) and isinstance(after, torch.Size)) or 0 in before:
            return None
        if not all(isinstance(a, (int, fx.Node)) for a in leaves((u.args[1:], u.kwargs))):
            return None
        at = len(before) + c
        prefix = before[:at].numel()
        for j in range(len(after)):
            if after[:j].numel() == prefix and after[j] == before[at]:
                return j - len(after)
        return None

    def reduced(self, u: fx.Node, c: int) -> int | None:
        """Where a reduction over other axes than the channel axis ``c`` puts it."""
        dims, keepdim = call_arg(u.args, u.kwargs, 1, "dim"), call_arg(u.args, u.kwargs, 2, "keepdim", False)
        dims = dims if isinstance(dims, (tuple, list)) else (dims,)
        shape = self.shapes.get(call_arg(u.args, u.kwargs, 0, "input"))
        ints = all(isinstance(d, int) and not isinstance(d, bool) for d in dims)
        if not (dims and ints and isinstance(keepdim, bool)):
            return None  # no dims (or an empty tuple) reduce every axis
        if any(d >= 0 for d in dims) and not isinstance(shape, torch.Size):
            return None
        dims = {d - len(shape) if d >= 0 else d for d in dims}
        if c in dims:
            return None
        return c if keepdim else c + sum(d > c for d in dims)


_Step = Callable[[_Graph, fx.Node, int], "tuple[frozenset[str], int | None] | None"]
"""What a node does to its input, whose channel axis is ``c``: the symmetries it commutes with and
where its output's channel axis is (None: not a tensor); None if not understood."""


def _elementwise_step(symmetries: frozenset[str]) -> _Step:
    """An elementwise operation: the channel axis stays where it is."""
    return lambda graph, u, c: (symmetries, c)


def _reshape_step(graph: _Graph, u: fx.Node, c: int) -> tuple[frozenset[str], int] | None:
    """A reshape that keeps the channel axis whole: it commutes with any factor."""
    out = graph.reshaped(u, c)
    return None if out is None else (_BOTH, out)


def _reduction_step(symmetries: frozenset[str]) -> _Step:
    """A sum, mean or maximum over other axes than the channel axis."""

    def step(graph: _Graph, u: fx.Node, c: int) -> tuple[frozenset[str], int | None] | None:
        out = graph.reduced(u, c)
        return None if out is None else (symmetries, out)

    return step


def _pool_step(d: int, symmetries: frozenset[str], indices_at: int | None) -> _Step:
    """Pooling over the last ``d`` axes, so the channel axis must be just before them."""

    def step(graph: _Graph, u: fx.Node, c: int) -> tuple[frozenset[str], int | None] | None:
        if indices_at is not None and call_arg(u.args, u.kwargs, indices_at, "return_indices", False) is not False:
            return None
        return (symmetries, c) if c == -(d + 1) else None

    return step


def _hardtanh_step(graph: _Graph, u: fx.Node, c: int) -> tuple[frozenset[str], int] | None:
    """Hardtanh is odd, so commutes with signs, when its bounds are symmetric."""
    low, high = call_arg(u.args, u.kwargs, 1, "min_val", -1.0), call_arg(u.args, u.kwargs, 2, "max_val", 1.0)
    return (_SIGN, c) if low == -high else None


def _constant_factor_step(graph: _Graph, u: fx.Node, c: int) -> tuple[frozenset[str], int] | None:
    """``x * a`` and ``x / a`` for a number ``a``: linear, so it commutes with any factor."""
    a = u.args[1] if len(u.args) == 2 and not u.kwargs else None
    return (_BOTH, c) if isinstance(a, (int, float)) and not isinstance(a, bool) else None


def _pool_steps(prefix: str, symmetries: frozenset[str], indices_at: int | None) -> dict[Any, _Step]:
    """The steps of the 1-, 2- and 3-d pooling functions ``F.<prefix><d>d``."""
    return {f: _pool_step(d, symmetries, indices_at) for d in (1, 2, 3) for f in available(F, f"{prefix}{d}d")}


_RESHAPE_FUNCTIONS = (torch.flatten, torch.reshape, torch.squeeze, torch.unsqueeze)
_RESHAPE_METHODS = ("view", "reshape", "flatten", "squeeze", "unsqueeze")
_RESHAPES = (*_RESHAPE_FUNCTIONS, *_RESHAPE_METHODS)

_FUNCTION_STEPS: dict[Any, _Step] = {
    **dict.fromkeys(available(torch, "tanh sin"), _elementwise_step(_SIGN)),
    **dict.fromkeys(available(F, "softsign tanhshrink softshrink hardshrink"), _elementwise_step(_SIGN)),
    **dict.fromkeys((torch.relu, F.relu, F.leaky_relu), _elementwise_step(_SCALE)),
    **dict.fromkeys(
        (operator.neg, torch.neg, *available(F, "dropout dropout1d dropout2d dropout3d")), _elementwise_step(_BOTH)
    ),
    F.hardtanh: _hardtanh_step,
    operator.mul: _constant_factor_step,
    operator.truediv: _constant_factor_step,
    **dict.fromkeys((torch.sum, torch.mean), _reduction_step(_BOTH)),
    torch.amax: _reduction_step(_SCALE),
    **dict.fromkeys(_RESHAPE_FUNCTIONS, _reshape_step),
    **_pool_steps("avg_pool", _BOTH, None),
    **_pool_steps("adaptive_avg_pool", _BOTH, None),
    **_pool_steps("max_pool", _SCALE, 6),
    **_pool_steps("adaptive_max_pool", _SCALE, 2),
}
"""What each ``call_function`` target commutes with, and where it moves the channel axis."""

_METHOD_STEPS: dict[str, _Step] = {
    **dict.fromkeys(("tanh", "tanh_", "sin"), _elementwise_step(_SIGN)),
    **dict.fromkeys(("relu", "relu_"), _elementwise_step(_SCALE)),
    **dict.fromkeys(("neg", "contiguous", "clone"), _elementwise_step(_BOTH)),
    **dict.fromkeys(("sum", "mean"), _reduction_step(_BOTH)),
    "amax": _reduction_step(_SCALE),
    **dict.fromkeys(_RESHAPE_METHODS, _reshape_step),
}
"""The same for ``call_method`` targets (``x.relu()``)."""

_ELEMENTWISE_MODULE_SYMMETRIES: dict[type, frozenset[str]] = {
    **dict.fromkeys(available(nn, "Tanh Softsign Tanhshrink Softshrink Hardshrink"), _SIGN),
    **dict.fromkeys((nn.ReLU, nn.LeakyReLU), _SCALE),
    **dict.fromkeys(available(nn, "Identity Dropout Dropout1d Dropout2d Dropout3d"), _BOTH),
}
"""Elementwise modules (by exact type) and the factors they commute with."""

_MODULE_POOLS: dict[type, tuple[int, frozenset[str]]] = {
    **{cls: (d, _BOTH) for d in (1, 2, 3) for cls in available(nn, f"AvgPool{d}d AdaptiveAvgPool{d}d")},
    **{cls: (d, _SCALE) for d in (1, 2, 3) for cls in available(nn, f"MaxPool{d}d AdaptiveMaxPool{d}d")},
}
"""Pooling modules: the number of pooled axes and the factors they commute with."""


def _module_step(graph: _Graph, u: fx.Node, m: nn.Module, c: int) -> tuple[frozenset[str], int | None] | None:
    """What a module call does to the channel axis ``c`` (by exact type), as :meth:`_Graph._step` says."""
    cls = type(m)
    if cls in _ELEMENTWISE_MODULE_SYMMETRIES:
        return _ELEMENTWISE_MODULE_SYMMETRIES[cls], c
    if cls is nn.Hardtanh:
        return (_SIGN, c) if m.min_val == -m.max_val else None
    if cls is nn.PReLU:
        return (_SCALE, c) if m.num_parameters == 1 else None
    if cls in _MODULE_POOLS:
        d, symmetries = _MODULE_POOLS[cls]
        return (symmetries, c) if c == -(d + 1) and not getattr(m, "return_indices", False) else None
    return _reshape_step(graph, u, c) if cls in (nn.Flatten, nn.Unflatten) else None
