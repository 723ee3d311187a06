"""Axis variables, tied and pinned while walking a model's traced graphs, and turned into labels.

Every axis of every parameter, buffer and activation is a variable. :class:`AxisInference` walks
the graphs of :class:`~nfopt.labelling.trace.Traces`, carrying for each value its :class:`Layout`
(a variable and a size per axis), and lets the :class:`Rules` of each call tie or pin them (see
:mod:`nfopt.labelling.op_rules` and :mod:`nfopt.labelling.module_rules`). A call no rule covers
pins everything it touches. In the end, each unpinned class of two or more parameter or buffer
axes becomes a coupled set.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import reduce
from typing import Any

import torch
import torch.fx as fx
from torch import nn
from torch.fx.node import map_arg

from ..weight_space import MAX_LABELLED_AXES, TensorSpec
from .trace import (
    NONTENSOR, Traces, exported_graphs, exported_shapes, has_hooks, leaves, monitored_forward, record_shapes,
)


class Unsupported(Exception):
    """A rule cannot analyse this call; the call is treated as opaque."""


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


# --------------------------------------------------------------------------------------------------
# Layouts: what is known of a value's axes
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Layout:
    """What is known of a tensor value: a variable and a size (None: unknown) per trailing axis.

    ``complete`` when these are all its axes; axes left of an incomplete layout's known ones are
    untracked and count as pinned.
    """

    vars: tuple[int, ...]
    sizes: tuple[int | None, ...]
    complete: bool

    def lead(self, k: int) -> Layout:
        """The layout without its last ``k`` axes."""
        n = max(len(self.vars) - k, 0)
        return Layout(self.vars[:n], self.sizes[:n], self.complete)


UNKNOWN = Layout((), (), False)
"""A value nothing is known about (it may even be a tuple); all its axes count as pinned."""


def axis_index(x: Layout, d: Any) -> int:
    """The index into ``x.vars`` of dimension ``d``, if it is tracked."""
    return dim_index(d, len(x.vars), x.complete)


def dim_index(d: Any, n: int, complete: bool) -> int:
    """Dimension ``d`` (negative counts from the end) of ``n`` known trailing axes, as an index."""
    if isinstance(d, bool) or not isinstance(d, int):
        raise Unsupported
    if complete and -n <= d < n:
        return d % n
    if not complete and -n <= d < 0:
        return n + d
    raise Unsupported


def as_layout(value: Any) -> Layout:
    """A tensor operand, which must have a layout."""
    if not isinstance(value, Layout):
        raise Unsupported
    return value


def weight_layout(value: Any, ndim: int) -> Layout:
    """A weight operand, which must be a complete layout of ``ndim`` axes."""
    if not (isinstance(value, Layout) and value.complete and len(value.vars) == ndim):
        raise Unsupported
    return value


# --------------------------------------------------------------------------------------------------
# The inference
# --------------------------------------------------------------------------------------------------

FunctionRule = Callable[["AxisInference", tuple, dict], Any]
"""What a call of a function or method does: from the arguments' values, the result's value."""

ModuleRule = Callable[["AxisInference", nn.Module, tuple, dict], Any]
"""The same for a call of a module."""


@dataclass(frozen=True)
class Rules:
    """The rule of each ``call_function`` target, ``call_method`` name and module type (exact)."""

    functions: Mapping[Any, FunctionRule]
    methods: Mapping[str, FunctionRule]
    modules: Mapping[type, ModuleRule]


class AxisInference:
    """Ties and pins axis variables while walking traced graphs, then turns classes into labels."""

    def __init__(self, tensors: Sequence[torch.Tensor], rules: Rules) -> None:
        self.sets = _Sets()
        self.vars: dict[int, tuple[int, ...]] = {}
        for t in tensors:
            self.vars.setdefault(id(t), tuple(self.sets.new(False) for _ in t.shape))
        self.rules = rules
        self.traces = Traces()
        self._out_meta: Any = None
        self.blocks: dict[int, int] = {}  # tensors whose first axis stacks blocks of one set
        self.not_understood: dict[int, nn.Module] = {}  # modules with parameters read as opaque
        self.split: dict[int, nn.Module] = {}  # untraceable modules with parameters, analysed by submodule

    # ---- variables -------------------------------------------------------------------------------

    def fresh(self, n: int) -> tuple[int, ...]:
        """``n`` new pinned variables (axes that no permutation may move)."""
        return tuple(self.sets.new(True) for _ in range(n))

    def tensor(self, t: torch.Tensor | None) -> Layout | None:
        """The layout of a parameter or buffer; any other tensor is a constant, so pinned."""
        if t is None:
            return None
        shape = tuple(t.shape)
        return Layout(self.vars[id(t)] if id(t) in self.vars else self.fresh(len(shape)), shape, True)

    def block(self, t: torch.Tensor, blocks: int) -> None:
        """Read ``t``'s first axis as ``blocks`` blocks of one set (an LSTM's gates): its variable
        stands for a block's neurons."""
        if blocks > 1:
            self.blocks[id(t)] = blocks

    def pin(self, value: Any) -> None:
        """Pin every variable of every layout in a (nested) value."""
        for leaf in leaves(value):
            if isinstance(leaf, Layout):
                self.pin_vars(leaf.vars)

    def pin_vars(self, variables: Iterable[int]) -> None:
        for v in variables:
            self.sets.pin(v)

    def union(self, a: int, b: int) -> int:
        return self.sets.union(a, b)

    def dim(self, x: Layout, d: int) -> tuple[int, int | None]:
        """The variable and size of dimension ``d``; an untracked one is a fresh pinned variable."""
        if not x.complete and d < -len(x.vars):
            return self.fresh(1)[0], None
        i = axis_index(x, d)
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
            raise Unsupported
        return reduce(self.union, (v for v, _ in wide)), wide[0][1]

    def out_shape(self) -> tuple[int, ...] | None:
        """The recorded shape of the node being analysed, when shapes were recorded."""
        return tuple(self._out_meta) if isinstance(self._out_meta, torch.Size) else None

    # ---- calls -----------------------------------------------------------------------------------

    def opaque(self, args: Any, kwargs: Any, module: nn.Module | None = None) -> Layout:
        """A call that is not understood: everything it touches is pinned."""
        self.pin((args, kwargs))
        if module is not None:
            for t in [*module.parameters(), *module.buffers()]:
                self.pin(self.tensor(t))
            if any(True for _ in module.parameters()):
                self.not_understood[id(module)] = module
        return UNKNOWN

    def call_module(self, m: nn.Module, args: tuple, kwargs: dict) -> Any:
        rule = self.rules.modules.get(type(m))
        if rule is None or has_hooks(m):
            return self.opaque(args, kwargs, m)
        try:
            return rule(self, m, args, kwargs)
        except Unsupported:
            return self.opaque(args, kwargs, m)

    def call_submodule(self, m: nn.Module, args: tuple) -> Any:
        """A module called by a composite module's rule (no traced shape belongs to it)."""
        saved, self._out_meta = self._out_meta, None
        try:
            return self.call_module(m, args, {})
        finally:
            self._out_meta = saved

    def call(self, op: str, target: Any, args: tuple, kwargs: dict) -> Any:
        """A function or method call; an ATen overload without a rule of its own follows its packet's."""
        table = self.rules.methods if op == "call_method" else self.rules.functions
        rule = table.get(target) or table.get(getattr(target, "overloadpacket", None))
        if rule is None:
            return self.opaque(args, kwargs)
        try:
            return rule(self, args, kwargs)
        except Unsupported:
            return self.opaque(args, kwargs)

    # ---- graphs ----------------------------------------------------------------------------------

    def fit(self, value: Any, meta: Any) -> Any:
        """Reconcile an inferred value with what the node really produced (as
        :func:`~nfopt.labelling.trace.record_shapes` records it), which wins where they disagree."""
        if isinstance(meta, torch.Size):
            shape = tuple(meta)
            if isinstance(value, Layout):
                n = len(value.vars)
                fits = n == len(shape) or (not value.complete and n < len(shape))
                if fits and all(s is None or s == t for s, t in zip(value.sizes, shape[len(shape) - n :])):
                    return Layout(self.fresh(len(shape) - n) + value.vars, shape, True)
            self.pin(value)
            return Layout(self.fresh(len(shape)), shape, True)
        if isinstance(meta, (tuple, list, dict)):
            items, values = _entries(meta), _entries(value)
            if values.keys() != items.keys():
                self.pin(value)
                values = dict.fromkeys(items, UNKNOWN)
            fitted = {k: self.fit(values[k], m) for k, m in items.items()}
            return fitted if isinstance(meta, dict) else tuple(fitted.values())
        self.pin(value)
        return NONTENSOR

    def run(self, gm: fx.GraphModule, shapes: dict[fx.Node, Any] | None) -> None:
        """Walk a traced graph, with what each node produced on example inputs if it was run."""
        env: dict[fx.Node, Any] = {}
        for node in gm.graph.nodes:
            meta = shapes.get(node, NONTENSOR) if shapes is not None else None
            self._out_meta = meta
            if node.op == "output":
                self.pin(map_arg(node.args, env.__getitem__))
                continue
            if node.op == "placeholder":
                value = UNKNOWN
            elif node.op == "get_attr":
                attr = reduce(getattr, node.target.split("."), gm)
                value = self.tensor(attr) if isinstance(attr, torch.Tensor) else NONTENSOR
            else:
                args = map_arg(node.args, env.__getitem__)
                kwargs = map_arg(node.kwargs, env.__getitem__)
                if node.op == "call_module":
                    value = self.call_module(gm.get_submodule(node.target), args, kwargs)
                else:
                    value = self.call(node.op, node.target, args, kwargs)
            env[node] = self.fit(value, meta) if shapes is not None else value

    # ---- whole models ----------------------------------------------------------------------------

    def analyse(self, model: nn.Module, inputs: tuple | None) -> None:
        """Analyse the model whole if it traces, else (with inputs) whole as exported, else the
        largest submodules that trace."""
        if self.traces.graphs(model) is not None:
            self._analyse_unit(model, inputs)
            return
        if inputs is None:
            warnings.warn(
                f"{type(model).__name__} cannot be traced by torch.fx and no example_inputs were given: "
                "every parameter gets independent labels",
                stacklevel=3,
            )
            return
        exported = exported_graphs(model, inputs)
        if exported is not None:
            for gm in exported:
                self.run(gm, exported_shapes(gm))
            return
        units = list({id(u): u for u in self._units(model)}.values())
        calls, outside = monitored_forward(model, units, inputs, set(self.vars))
        for key in outside:
            self.pin_vars(self.vars[key])
        for unit in units:
            self._analyse_unit(unit, calls.get(id(unit)))

    def _units(self, module: nn.Module) -> list[nn.Module]:
        """The largest traceable modules under ``module``; containers (which have no forward of
        their own) are never units, their children are."""
        container = isinstance(module, (nn.ModuleList, nn.ModuleDict))
        if not container and self.traces.graphs(module) is not None:
            return [module]
        if not container and next(module.parameters(), None) is not None:
            self.split[id(module)] = module
        return [u for child in module.children() for u in self._units(child)]

    def _analyse_unit(self, module: nn.Module, inputs: tuple | None) -> None:
        graphs = self.traces.graphs(module)
        self.run(graphs[0], None if inputs is None else record_shapes(graphs[0], module, inputs))
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
            out.append(TensorSpec(tuple(t.shape), axes, name, self.blocks.get(id(t), 1) if 0 in coupled else 1))
        return tuple(out)

    def _coupled_classes(self, named: Sequence[tuple[str, torch.Tensor]]) -> dict[int, list[tuple[str, int, int]]]:
        """The unpinned classes that label two or more axes: root -> (tensor name, axis, size) of each."""
        classes: dict[int, list[tuple[str, int, int]]] = {}
        for name, t in named:
            for ax, v in enumerate(self.vars[id(t)]):
                if not self.sets.pinned(v):
                    size = t.shape[ax] // self.blocks.get(id(t), 1) if ax == 0 else t.shape[ax]
                    classes.setdefault(self.sets.find(v), []).append((name, ax, size))
        return {root: axes for root, axes in classes.items() if len(axes) > 1}


def _entries(value: Any) -> dict:
    """A dict's items, a tuple's or list's by position; nothing for anything else."""
    if isinstance(value, dict):
        return dict(value)
    return dict(enumerate(value)) if isinstance(value, (tuple, list)) else {}
