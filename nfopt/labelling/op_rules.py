"""What tensor operations (``call_function`` targets and ``call_method`` names) do to axis variables.

Each rule takes the :class:`~nfopt.labelling.axes.Layout` of a call's operands, ties or pins
their variables, and returns the result's layout; it raises
:class:`~nfopt.labelling.axes.Unsupported` for a call it cannot analyse, which then pins
everything the call touches. The first part says what each operation does, the tables at the
end which rule each function and method follows: supporting a new one is a row in
:data:`FUNCTION_RULES` or :data:`METHOD_RULES` (and a rule, if none fits).
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from functools import reduce
from typing import Any

import torch
import torch.nn.functional as F

from .axes import AxisInference, FunctionRule, Layout, Unsupported, as_layout, axis_index, dim_index, weight_layout
from .trace import NONTENSOR, available, call_arg, leaves

# --------------------------------------------------------------------------------------------------
# What operations do to axis variables
# --------------------------------------------------------------------------------------------------


def pointwise(inf: AxisInference, *values: Any) -> Any:
    """Elementwise over broadcast operands (and any op equivariant along every axis, like softmax):
    each output axis ties the operands' axes that are not broadcast."""
    layouts = [v for v in leaves(values) if isinstance(v, Layout)]
    if not layouts:
        return NONTENSOR
    partial = [x for x in layouts if not x.complete]
    n = min(len(x.vars) for x in partial) if partial else max(len(x.vars) for x in layouts)
    merged = [inf.merge([(x.vars[-p], x.sizes[-p]) for x in layouts if len(x.vars) >= p]) for p in range(n, 0, -1)]
    inf.pin([x.lead(n) for x in layouts])
    return Layout(tuple(v for v, _ in merged), tuple(s for _, s in merged), not partial)


def _matmul(inf: AxisInference, a: Any, b: Any) -> Layout:
    """``a @ b``: the contracted axes are tied, batch axes broadcast."""
    a, b = as_layout(a), as_layout(b)
    if b.complete and 1 <= len(b.vars) <= 2:
        inf.union(inf.dim(a, -1)[0], b.vars[0])
        lead = a.lead(1)
        return Layout(lead.vars + b.vars[1:], lead.sizes + b.sizes[1:], a.complete)
    if not (a.complete and b.complete and a.vars):
        raise Unsupported
    inf.union(a.vars[-1], b.vars[-2])
    if len(a.vars) == 1:
        return Layout(b.vars[:-2] + b.vars[-1:], b.sizes[:-2] + b.sizes[-1:], True)
    batch = pointwise(inf, a.lead(2), b.lead(2))
    return Layout(batch.vars + (a.vars[-2], b.vars[-1]), batch.sizes + (a.sizes[-2], b.sizes[-1]), True)


def linear(inf: AxisInference, x: Any, w: Any, b: Any) -> Any:
    """``x @ w.T + b``: the input features tied to the weight's columns, its rows (and the bias)
    the output features."""
    w = weight_layout(w, 2)
    return pointwise(inf, _matmul(inf, x, Layout(w.vars[::-1], w.sizes[::-1], True)), b)


def conv(inf: AxisInference, x: Any, w: Any, b: Any, d: int, groups: Any, transposed: bool) -> Layout:
    """A ``d``-dimensional (transposed) convolution; grouped ones other than depthwise pin channels."""
    x, w = as_layout(x), weight_layout(w, d + 2)
    if not isinstance(groups, int):
        raise Unsupported
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
        inf.union(out, weight_layout(b, 1).vars[0])
    lead = x.lead(d + 1)
    return Layout(lead.vars + (out,) + inf.fresh(d), lead.sizes + (size,) + (None,) * d, x.complete)


def per_channel(inf: AxisInference, x: Any, dim: int, *vectors: Any) -> Layout:
    """An op acting on each channel along ``dim`` alike, with per-channel vectors (norms, PReLU)."""
    x = as_layout(x)
    c, _ = inf.dim(x, dim)
    for v in vectors:
        if v is not None:
            inf.union(c, weight_layout(v, 1).vars[0])
    return x


def group_norm(inf: AxisInference, x: Any, groups: Any, w: Any, b: Any) -> Layout:
    """GroupNorm is equivariant to channel permutations only with one group or one channel per group."""
    x = as_layout(x)
    c, size = inf.dim(x, 1)
    if size is None and w is not None:
        size = weight_layout(w, 1).sizes[0]
    if groups == 1 or groups == size:
        return per_channel(inf, x, 1, w, b)
    inf.pin_vars((c,))
    inf.pin((w, b))
    return x


def embedding(inf: AxisInference, idx: Any, w: Any) -> Layout:
    """Rows are picked by the input's values, so the row axis is pinned; features are appended."""
    idx, w = as_layout(idx), weight_layout(w, 2)
    inf.pin_vars(w.vars[:1])
    return Layout(idx.vars + w.vars[1:], idx.sizes + w.sizes[1:], idx.complete)


def pool(inf: AxisInference, x: Any, d: int) -> Layout:
    """Pooling over the last ``d`` (spatial) axes: channels and batch carried, positions pinned."""
    x = as_layout(x)
    c, size = inf.dim(x, -(d + 1))
    inf.pin_vars([inf.dim(x, -i)[0] for i in range(1, d + 1)])
    lead = x.lead(d + 1)
    return Layout(lead.vars + (c,) + inf.fresh(d), lead.sizes + (size,) + (None,) * d, x.complete)


def reshape(inf: AxisInference, x: Any) -> Layout:
    """A reshape (view, flatten, squeeze, ...) to the traced output shape.

    Axes of size 1 carry nothing. The other axes fall into blocks of equal products between input
    and output; a block of one input and one output axis carries its variable, any other block
    mixes axes (a flatten of channels with positions) and pins them.
    """
    x, shape = as_layout(x), inf.out_shape()
    if shape is None or not x.complete or None in x.sizes or 0 in x.sizes or 0 in shape:
        raise Unsupported
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
                raise Unsupported
        if len(block_in) == 1 and len(block_out) == 1:
            out_vars[block_out[0]] = block_in[0][0]
        else:
            inf.pin_vars(v for v, _ in block_in)
    if i != len(ins) or j != len(outs):
        raise Unsupported
    return Layout(tuple(out_vars), shape, True)


def _reorder(x: Layout, order: Sequence[int]) -> Layout:
    return Layout(tuple(x.vars[i] for i in order), tuple(x.sizes[i] for i in order), x.complete)


def _transpose(x: Any, d0: Any, d1: Any) -> Layout:
    x = as_layout(x)
    i, j = axis_index(x, d0), axis_index(x, d1)
    order = list(range(len(x.vars)))
    order[i], order[j] = j, i
    return _reorder(x, order)


def _reduce(inf: AxisInference, x: Any, dims: Any, keepdim: Any) -> Layout:
    """Sums, means, maxima over axes: invariant to permuting them, so the reduced axes just go."""
    x = as_layout(x)
    if not isinstance(keepdim, bool):
        raise Unsupported
    if dims is None or dims == () or dims == []:
        if not keepdim:
            return Layout((), (), True)
        if not x.complete:
            raise Unsupported
        reduced = set(range(len(x.vars)))
    else:
        reduced = {axis_index(x, d) for d in (dims if isinstance(dims, (tuple, list)) else (dims,))}
    kept = [(inf.fresh(1)[0], 1) if i in reduced else (v, s) for i, (v, s) in enumerate(zip(x.vars, x.sizes))
            if keepdim or i not in reduced]
    return Layout(tuple(v for v, _ in kept), tuple(s for _, s in kept), x.complete)


def _concat(inf: AxisInference, tensors: Any, dim: Any, new_axis: bool) -> Layout:
    """``cat`` (the joined axis pinned, the others tied) or ``stack`` (all tied, a new pinned axis)."""
    if not isinstance(tensors, (tuple, list)) or not tensors:
        raise Unsupported
    xs = [as_layout(t) for t in tensors]
    n = len(xs[0].vars)
    if any(not x.complete or len(x.vars) != n for x in xs):
        raise Unsupported
    at = dim_index(dim, n + new_axis, True)
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
    return Layout(tuple(out), tuple(sizes), True)


def _index(inf: AxisInference, x: Any, index: Any) -> Any:
    """Basic indexing: full slices keep an axis; ints and other slices (whatever their bounds)
    pick positions, so pin it."""
    if x is NONTENSOR:
        return NONTENSOR
    if isinstance(x, (tuple, list)):
        if isinstance(index, bool) or not isinstance(index, (int, slice)) or any(
            v is not None and not isinstance(v, int) for v in leaves(index)
        ):
            raise Unsupported
        try:
            return x[index]
        except IndexError:
            raise Unsupported from None
    x = as_layout(x)
    items = index if isinstance(index, tuple) else (index,)
    simple = all(
        it is None or it is Ellipsis or isinstance(it, slice) or (isinstance(it, int) and not isinstance(it, bool))
        for it in items
    )
    used = sum(it is not None and it is not Ellipsis for it in items)
    if not (simple and x.complete) or used > len(x.vars) or sum(it is Ellipsis for it in items) > 1:
        raise Unsupported
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
    return Layout(tuple(v for v, _ in out), tuple(s for _, s in out), True)


# --------------------------------------------------------------------------------------------------
# Which rule each call_function target and call_method name follows
# --------------------------------------------------------------------------------------------------


def _pointwise_call(inf: AxisInference, args: tuple, kwargs: dict) -> Any:
    return pointwise(inf, args, kwargs)


def _first_only(inf: AxisInference, args: tuple, kwargs: dict) -> Layout:
    """Casts and copies (``x.to(y)`` takes only y's dtype): the layout of the tensor itself."""
    return as_layout(args[0])


def _reshape_call(inf: AxisInference, args: tuple, kwargs: dict) -> Layout:
    return reshape(inf, args[0])


def _reduce_call(inf: AxisInference, args: tuple, kwargs: dict) -> Layout:
    return _reduce(inf, args[0], call_arg(args, kwargs, 1, "dim"), call_arg(args, kwargs, 2, "keepdim", False))


def _matmul_call(inf: AxisInference, args: tuple, kwargs: dict) -> Layout:
    return _matmul(inf, args[0], call_arg(args, kwargs, 1, "other"))


def _addmm_call(first: str, second: str) -> FunctionRule:
    """``addmm``/``baddbmm``: ``input + first @ second`` (beta and alpha scale, changing no axis)."""
    def rule(inf: AxisInference, args: tuple, kwargs: dict) -> Any:
        product = _matmul(inf, call_arg(args, kwargs, 1, first), call_arg(args, kwargs, 2, second))
        return pointwise(inf, product, call_arg(args, kwargs, 0, "input"))
    return rule


def _transpose_call(inf: AxisInference, args: tuple, kwargs: dict) -> Layout:
    return _transpose(args[0], call_arg(args, kwargs, 1, "dim0"), call_arg(args, kwargs, 2, "dim1"))


def _permute_call(inf: AxisInference, args: tuple, kwargs: dict) -> Layout:
    x = as_layout(args[0])
    dims = args[1] if len(args) == 2 and isinstance(args[1], (tuple, list)) else args[1:] or kwargs.get("dims")
    if not x.complete or not isinstance(dims, (tuple, list)) or len(dims) != len(x.vars):
        raise Unsupported
    order = [axis_index(x, d) for d in dims]
    if sorted(order) != list(range(len(x.vars))):
        raise Unsupported
    return _reorder(x, order)


def _reversed(x: Any) -> Layout:
    """All axes in reverse order (``x.T``, and ``x.t()`` of a matrix)."""
    x = as_layout(x)
    if not x.complete:
        raise Unsupported
    return _reorder(x, range(len(x.vars) - 1, -1, -1))


def _t_call(inf: AxisInference, args: tuple, kwargs: dict) -> Layout:
    if len(as_layout(args[0]).vars) > 2:
        raise Unsupported
    return _reversed(args[0])


def _cat_call(inf: AxisInference, args: tuple, kwargs: dict) -> Layout:
    return _concat(inf, call_arg(args, kwargs, 0, "tensors"), call_arg(args, kwargs, 1, "dim", 0), new_axis=False)


def _stack_call(inf: AxisInference, args: tuple, kwargs: dict) -> Layout:
    return _concat(inf, call_arg(args, kwargs, 0, "tensors"), call_arg(args, kwargs, 1, "dim", 0), new_axis=True)


def _getitem_call(inf: AxisInference, args: tuple, kwargs: dict) -> Any:
    return _index(inf, args[0], args[1])


def _getattr_call(inf: AxisInference, args: tuple, kwargs: dict) -> Any:
    x, name = args[0], args[1]
    if x is NONTENSOR or name in ("shape", "dtype", "device", "ndim", "is_cuda", "layout"):
        return NONTENSOR
    if name == "T":
        return _reversed(x)
    if name == "mT":
        return _transpose(x, -2, -1)
    raise Unsupported


def _static_call(inf: AxisInference, args: tuple, kwargs: dict) -> Any:
    """Sizes and ranks: not tensors, and independent of the order of any axis."""
    return NONTENSOR


def _linear_call(inf: AxisInference, args: tuple, kwargs: dict) -> Any:
    return linear(inf, args[0], call_arg(args, kwargs, 1, "weight"), call_arg(args, kwargs, 2, "bias"))


def _embedding_call(inf: AxisInference, args: tuple, kwargs: dict) -> Layout:
    return embedding(inf, args[0], call_arg(args, kwargs, 1, "weight"))


def _group_norm_call(inf: AxisInference, args: tuple, kwargs: dict) -> Layout:
    w, b = call_arg(args, kwargs, 2, "weight"), call_arg(args, kwargs, 3, "bias")
    return group_norm(inf, args[0], call_arg(args, kwargs, 1, "num_groups"), w, b)


def _batch_norm_call(inf: AxisInference, args: tuple, kwargs: dict) -> Layout:
    """F.batch_norm and F.instance_norm: (input, running_mean, running_var, weight, bias, ...)."""
    names = ("running_mean", "running_var", "weight", "bias")
    return per_channel(inf, args[0], 1, *(call_arg(args, kwargs, i, n) for i, n in enumerate(names, 1)))


def _conv_call(d: int, transposed: bool) -> FunctionRule:
    def rule(inf: AxisInference, args: tuple, kwargs: dict) -> Layout:
        w, b = call_arg(args, kwargs, 1, "weight"), call_arg(args, kwargs, 2, "bias")
        return conv(inf, args[0], w, b, d, call_arg(args, kwargs, 6, "groups", 1), transposed)

    return rule


def _pool_call(d: int, indices_at: int | None) -> FunctionRule:
    def rule(inf: AxisInference, args: tuple, kwargs: dict) -> Layout:
        if indices_at is not None and call_arg(args, kwargs, indices_at, "return_indices", False):
            raise Unsupported
        return pool(inf, args[0], d)

    return rule


POINTWISE_FUNCTIONS = [
    *available(operator, "add sub mul truediv floordiv mod pow neg pos abs gt ge lt le iadd isub imul itruediv"),
    *available(torch, "add sub subtract mul multiply div divide true_divide neg abs exp exp2 expm1 log log1p "
                      "log2 sqrt rsqrt square pow sin cos tanh sigmoid relu erf reciprocal sign clamp clip "
                      "maximum minimum softmax log_softmax layer_norm rms_norm"),
    *available(F, "relu relu6 gelu silu mish elu selu celu leaky_relu softplus softsign hardtanh hardswish "
                  "hardsigmoid logsigmoid tanhshrink softshrink hardshrink threshold tanh sigmoid dropout "
                  "alpha_dropout feature_alpha_dropout dropout1d dropout2d dropout3d softmax log_softmax "
                  "softmin normalize layer_norm rms_norm"),
]
"""Elementwise over broadcast operands, or equivariant along every axis (softmax, normalisations)."""

_POINTWISE_METHODS = (
    "add sub mul div pow neg abs exp log sqrt rsqrt square sigmoid tanh relu clamp clip softmax "
    "log_softmax masked_fill add_ sub_ mul_ div_ relu_ clamp_ sigmoid_ tanh_"
).split()

FUNCTION_RULES: dict[Any, FunctionRule] = {
    **{f: _pointwise_call for f in POINTWISE_FUNCTIONS},
    **{f: _reshape_call for f in available(torch, "flatten reshape squeeze unsqueeze")},
    **{f: _reduce_call for f in available(torch, "sum mean amax amin logsumexp")},
    **{f: _matmul_call for f in (torch.matmul, operator.matmul, torch.mm, torch.bmm)},
    torch.addmm: _addmm_call("mat1", "mat2"),
    torch.baddbmm: _addmm_call("batch1", "batch2"),
    **{f: _transpose_call for f in available(torch, "transpose swapaxes")},
    **{f: _cat_call for f in available(torch, "cat concat concatenate")},
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
    **{f: _pool_call(d, 2) for d in (1, 2, 3) for f in available(F, f"adaptive_max_pool{d}d")},
    **{f: _pool_call(d, None) for name in ("avg_pool", "adaptive_avg_pool", "lp_pool")
       for d in (1, 2, 3) for f in available(F, f"{name}{d}d")},
}

METHOD_RULES: dict[str, FunctionRule] = {
    **{name: _pointwise_call for name in _POINTWISE_METHODS},
    **{name: _first_only for name in "to type_as float double half bfloat16 contiguous clone detach cpu cuda".split()},
    **{name: _static_call for name in "size dim numel ndimension nelement".split()},
    **{name: _reshape_call for name in "view reshape flatten unflatten squeeze unsqueeze view_as reshape_as".split()},
    **{name: _reduce_call for name in "sum mean amax amin logsumexp".split()},
    **{name: _matmul_call for name in "matmul mm bmm __matmul__".split()},
    "addmm": _addmm_call("mat1", "mat2"),
    "baddbmm": _addmm_call("batch1", "batch2"),
    **{name: _transpose_call for name in "transpose swapaxes".split()},
    "permute": _permute_call,
    "t": _t_call,
}

