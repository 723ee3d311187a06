"""The torch.fx core both labellers stand on: tracing a model, running its graph, watching its forward.

Both labellers read a model's structure from ``torch.fx`` graphs. :class:`Traces` turns a module
into the graphs its eval and train modes compute (or says it cannot be traced);
:func:`exported_graphs` captures them with ``torch.export`` instead, for a model fx cannot trace
(an ATen graph, with the shapes that :func:`exported_shapes` reads); :func:`record_shapes` runs
a graph on example inputs to learn what each node produces;
:func:`monitored_forward` runs a model whose own forward cannot be traced, to see which inputs
its traceable parts receive and which parameters it touches outside them. The small helpers at
the end read the calls and values these graphs hold.
"""

from __future__ import annotations

import contextlib
import inspect
import io
import logging
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn
from torch.fx.node import map_aggregate
from torch.overrides import TorchFunctionMode

NONTENSOR = object()
"""The value of a node that is not a tensor (a shape, a size, a dtype)."""

# --------------------------------------------------------------------------------------------------
# Tracing
# --------------------------------------------------------------------------------------------------


class _Untraceable(Exception):
    """A module that fx would trace, but whose trace would not be what it computes."""


class Traces:
    """The traced graphs of modules, each traced once (a failure included)."""

    def __init__(self) -> None:
        self._graphs: dict[int, list[fx.GraphModule] | None] = {}

    def graphs(self, module: nn.Module) -> list[fx.GraphModule] | None:
        """The module's graphs in eval and (if different) train mode; None if it cannot be traced."""
        key = id(module)
        if key not in self._graphs:
            self._graphs[key] = None
            try:
                graphs = [self._trace_in_mode(module, training) for training in (False, True)]
            except Exception:  # tracing fails in many ways (control flow, proxies misused, ...)
                return None
            self._graphs[key] = graphs[:1] if _signature(graphs[0]) == _signature(graphs[1]) else graphs
        return self._graphs[key]

    def _trace_in_mode(self, module: nn.Module, training: bool) -> fx.GraphModule:
        with _training(module, training):
            if fx.Tracer().is_leaf_module(module, ""):
                return _leaf_graph(module)
            if has_hooks(module):
                raise _Untraceable  # a traced root's own hooks would be missed
            try:
                return fx.GraphModule(module, fx.Tracer().trace(module))
            except Exception:
                return fx.GraphModule(module, _IsolatingTracer(self).trace(module))


class _IsolatingTracer(fx.Tracer):
    """A tracer that keeps as opaque leaves the submodules that cannot be traced on their own."""

    def __init__(self, traces: Traces) -> None:
        super().__init__()
        self._traces = traces

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return super().is_leaf_module(m, module_qualified_name) or self._traces.graphs(m) is None


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


def exported_graphs(model: nn.Module, inputs: tuple) -> list[fx.GraphModule] | None:
    """The model's ATen graphs in eval and train mode as ``torch.export`` (non-strict) captures
    them on the example inputs; None if export fails, or if a module has hooks (which the graph
    may not show). Export reads what fx cannot (keyword arguments, loops over shapes), fixing the
    inputs' shapes; its graphs read parameters and buffers by ``get_attr`` of the model's own
    tensors. What export warns, logs and prints is silenced: a failure has a fallback, which says so."""
    if any(has_hooks(m) for m in model.modules()):
        return None
    graphs = []
    for training in (False, True):
        try:
            with _quiet(), _training(model, training):
                graphs.append(torch.export.export(model, inputs, strict=False).module())
        except Exception:  # export fails in many ways (data-dependent control flow, unsupported ops, ...)
            return None
    return graphs


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence warnings, logging and standard error (where export prints the partial graph of a
    failure), restoring them after."""
    previous = logging.root.manager.disable
    logging.disable(logging.CRITICAL)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        logging.disable(previous)


def exported_shapes(gm: fx.GraphModule) -> dict[fx.Node, Any]:
    """What each node of an exported graph produces, as :func:`record_shapes` records it, read
    from the values export leaves in the nodes' metadata (no run needed)."""
    return {n: _shapes(n.meta.get("val")) for n in gm.graph.nodes}


# --------------------------------------------------------------------------------------------------
# Running models and graphs
# --------------------------------------------------------------------------------------------------


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
    otherwise (sizes, dtypes, None) :data:`NONTENSOR`."""
    if isinstance(value, torch.Tensor):
        return value.shape
    if isinstance(value, torch.Size) or not any(isinstance(v, torch.Tensor) for v in leaves(value)):
        return NONTENSOR
    if isinstance(value, dict):
        return {k: _shapes(v) for k, v in value.items()}
    return tuple(_shapes(v) for v in value)


def record_shapes(gm: fx.GraphModule, module: nn.Module, inputs: tuple) -> dict[fx.Node, Any] | None:
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


def monitored_forward(
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
                outside.update(id(t) for t in leaves((args, kwargs)) if isinstance(t, torch.Tensor))
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


# --------------------------------------------------------------------------------------------------
# Reading calls and values
# --------------------------------------------------------------------------------------------------


def has_hooks(m: nn.Module) -> bool:
    """Forward hooks may change what a module computes, so a hooked module is not understood."""
    return bool(m._forward_hooks or m._forward_pre_hooks)


def call_arg(args: tuple, kwargs: dict, i: int, name: str, default: Any = None) -> Any:
    """Argument ``name`` of a call, given at position ``i`` or by name."""
    return args[i] if len(args) > i else kwargs.get(name, default)


def as_tuple(inputs: tuple | list | torch.Tensor | None) -> tuple | None:
    """Example inputs as the tuple of positional arguments they stand for."""
    if inputs is None or isinstance(inputs, tuple):
        return inputs
    return tuple(inputs) if isinstance(inputs, list) else (inputs,)


def leaves(value: Any) -> Iterator[Any]:
    """The leaves of nested tuples, lists, dicts and slices."""
    if isinstance(value, (tuple, list)):
        for v in value:
            yield from leaves(v)
    elif isinstance(value, dict):
        for v in value.values():
            yield from leaves(v)
    elif isinstance(value, slice):
        yield from leaves((value.start, value.stop, value.step))
    else:
        yield value


def available(namespace: Any, names: str) -> list[Any]:
    """The attributes of ``namespace`` with these names that this torch version has."""
    return [getattr(namespace, n) for n in names.split() if hasattr(namespace, n)]
