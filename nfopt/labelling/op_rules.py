"""What tensor operations (``call_function`` targets and ``call_method`` names) do to axis variables.

Each rule takes the :class:`~nfopt.labelling.axes.Layout` of a call's operands, ties or pins
their variables, and returns the result's layout; it raises
:class:`~nfopt.labelling.axes.Unsupported` for a call it cannot analyse, which then pins
everything the call touches. The first part says what each operation does, the tables at the
end which rule each function, method and ATen operator (in the graphs of ``torch.export``)
follows: supporting a new one is a row in :data:`FUNCTION_RULES`, :data:`METHOD_RULES` or
:data:`ATEN_RULES` (and a rule, if none fits).
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


def expand(inf: AxisInference, x: Any) -> Layout:
    """A broadcast to the traced output shape: axes kept whole carry their variable; axes of size 1
    made wider and new leading axes are fresh (pinned) ones."""
    x, shape = as_layout(x), inf.out_shape()
    if shape is None or not x.complete or len(shape) < len(x.vars):
        raise Unsupported
    lead = len(shape) - len(x.vars)
    out = list(inf.fresh(lead))
    for v, s, t in zip(x.vars, x.sizes, shape[lead:]):
        if s != t and s != 1:
            raise Unsupported
        out.append(v if s == t else inf.fresh(1)[0])
    return Layout(tuple(out), shape, True)


def split(inf: AxisInference, x: Any, sizes: Any, dim: Any) -> tuple[Layout, ...]:
    """Pieces along one axis (of ``sizes`` each, or of the sizes listed): that axis picks
    positions, so it is pinned; the pieces share every other axis."""
    x = as_layout(x)
    if not x.complete:
        raise Unsupported
    i = axis_index(x, dim)
    if isinstance(sizes, (tuple, list)) and all(isinstance(s, int) for s in sizes):
        count = len(sizes)
    elif isinstance(sizes, int) and not isinstance(sizes, bool) and sizes > 0 and x.sizes[i] is not None:
        count = max(-(-x.sizes[i] // sizes), 1)
    else:
        raise Unsupported
    inf.pin_vars(x.vars[i : i + 1])
    sizes_out = x.sizes[:i] + (None,) + x.sizes[i + 1 :]
    return tuple(Layout(x.vars[:i] + inf.fresh(1) + x.vars[i + 1 :], sizes_out, True) for _ in range(count))


def attention(inf: AxisInference, q: Any, k: Any, v: Any, mask: Any) -> Layout:
    """Scaled dot-product attention, ``softmax(q @ k.mT * scale + mask) @ v`` over the last two
    axes: the scores sum over q's and k's last axis, so permuting both alike changes nothing (the
    default scale reads only its size), and v's last axis is the output's. Every other axis
    (queries, keys, heads, batch) is pinned, and so is the mask: aligning them with the mask and
    with a causal order is not proved."""
    q, k, v = as_layout(q), as_layout(k), as_layout(v)
    if not all(x.complete and len(x.vars) >= 2 for x in (q, k, v)):
        raise Unsupported
    inf.union(q.vars[-1], k.vars[-1])
    inf.pin_vars(q.vars[:-1] + k.vars[:-1] + v.vars[:-1])
    inf.pin(mask)
    return Layout(inf.fresh(len(q.vars) - 1) + v.vars[-1:], q.sizes[:-1] + v.sizes[-1:], True)


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


def _expand_call(inf: AxisInference, args: tuple, kwargs: dict) -> Layout:
    return expand(inf, args[0])


def _split_call(inf: AxisInference, args: tuple, kwargs: dict) -> tuple[Layout, ...]:
    """``split(x, split_size_or_sections, dim=0)`` (and ATen's ``split``, ``split_with_sizes``)."""
    return split(inf, args[0], call_arg(args, kwargs, 1, "split_size"), call_arg(args, kwargs, 2, "dim", 0))


def _attention_call(inf: AxisInference, args: tuple, kwargs: dict) -> Layout:
    """``scaled_dot_product_attention(query, key, value, attn_mask=None, ...)``."""
    q, k, v = (call_arg(args, kwargs, i, name) for i, name in enumerate(("query", "key", "value")))
    return attention(inf, q, k, v, call_arg(args, kwargs, 3, "attn_mask"))


def _constant_call(inf: AxisInference, args: tuple, kwargs: dict) -> Layout:
    """A new tensor whose entries do not depend on the operand's (``new_ones``, ``zeros_like``):
    it ties nothing, and the result, a constant of the traced shape, is pinned."""
    shape = inf.out_shape()
    if shape is None:
        raise Unsupported
    return Layout(inf.fresh(len(shape)), shape, True)


# ---- ATen operators (the graphs of torch.export) ---------------------------------------------------


def _aten_embedding_call(inf: AxisInference, args: tuple, kwargs: dict) -> Layout:
    """``aten.embedding(weight, indices, ...)``: the table first, unlike ``F.embedding``."""
    return embedding(inf, call_arg(args, kwargs, 1, "indices"), args[0])


def _aten_norm_call(inf: AxisInference, args: tuple, kwargs: dict) -> Layout:
    """``aten.batch_norm`` and ``aten.instance_norm``: (input, weight, bias, running_mean,
    running_var, ...), the per-channel vectors in another order than ``F.batch_norm``'s."""
    return per_channel(inf, args[0], 1, *(call_arg(args, kwargs, i, n) for i, n in enumerate(
        ("weight", "bias", "running_mean", "running_var"), 1)))


def _slice_call(inf: AxisInference, args: tuple, kwargs: dict) -> Layout:
    """``aten.slice(x, dim=0, start=None, end=None, step=1)``: the whole axis keeps it, as ``x[:]``."""
    x = as_layout(args[0])
    i = axis_index(x, call_arg(args, kwargs, 1, "dim", 0))
    start, end, step = (call_arg(args, kwargs, j, name) for j, name in enumerate(("start", "end", "step"), 2))
    whole = start in (None, 0) and step in (None, 1) and (
        end is None or (isinstance(end, int) and x.sizes[i] is not None and end >= x.sizes[i])
    )
    return _index(inf, x, (slice(None),) * i + (slice(None) if whole else slice(start, end, step),))


def _numpy_t_call(inf: AxisInference, args: tuple, kwargs: dict) -> Layout:
    """``aten.numpy_T`` (``x.T``): every axis, in reverse order."""
    return _reversed(args[0])


def _select_call(inf: AxisInference, args: tuple, kwargs: dict) -> Layout:
    """``aten.select(x, dim, index)``: ``x[..., index]`` along ``dim``."""
    x = as_layout(args[0])
    i = axis_index(x, call_arg(args, kwargs, 1, "dim"))
    return _index(inf, x, (slice(None),) * i + (call_arg(args, kwargs, 2, "index"),))


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
    torch.split: _split_call,
    F.scaled_dot_product_attention: _attention_call,
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
    **{name: _expand_call for name in "expand expand_as".split()},
    "split": _split_call,
}

_aten = torch.ops.aten

ATEN_RULES: dict[Any, FunctionRule] = {
    **{op: _pointwise_call for op in available(
        _aten,
        "add sub rsub mul div pow neg abs exp exp2 expm1 log log1p log2 sqrt rsqrt square reciprocal sign "
        "sin cos tanh sigmoid relu relu6 gelu silu mish elu selu celu leaky_relu softplus hardtanh hardswish "
        "hardsigmoid erf clamp clamp_min clamp_max clip maximum minimum where masked_fill dropout "
        "softmax _softmax log_softmax _log_softmax layer_norm rms_norm eq ne lt le gt ge logical_not "
        "logical_and logical_or bitwise_not bitwise_and bitwise_or __and__ __or__ "
        "add_ sub_ mul_ div_ relu_ clamp_ sigmoid_ tanh_",
    )},
    **{op: _first_only for op in available(_aten, "alias clone contiguous detach to _to_copy type_as lift_fresh_copy")},
    **{op: _static_call for op in available(_aten, "_assert_tensor_metadata sym_size sym_numel dim")},
    **{op: _constant_call for op in available(
        _aten, "new_ones new_zeros new_full new_empty zeros_like ones_like full_like empty_like"
    )},
    **{op: _reshape_call for op in available(_aten, "view _unsafe_view reshape flatten unflatten squeeze unsqueeze")},
    **{op: _reduce_call for op in available(_aten, "sum mean amax amin logsumexp")},
    **{op: _matmul_call for op in available(_aten, "matmul mm bmm")},
    _aten.addmm: _addmm_call("mat1", "mat2"),
    _aten.baddbmm: _addmm_call("batch1", "batch2"),
    **{op: _transpose_call for op in available(_aten, "transpose swapaxes")},
    _aten.permute: _permute_call,
    _aten.t: _t_call,
    _aten.numpy_T: _numpy_t_call,
    _aten.expand: _expand_call,
    **{op: _split_call for op in available(_aten, "split split_with_sizes")},
    _aten.slice: _slice_call,
    _aten.select: _select_call,
    **{op: _cat_call for op in available(_aten, "cat concat")},
    _aten.stack: _stack_call,
    _aten.linear: _linear_call,
    _aten.embedding: _aten_embedding_call,
    _aten.scaled_dot_product_attention: _attention_call,
    _aten.group_norm: _group_norm_call,
    **{op: _aten_norm_call for op in available(_aten, "batch_norm instance_norm")},
    **{op: _conv_call(d, False) for d, op in enumerate((_aten.conv1d, _aten.conv2d, _aten.conv3d), 1)},
    **{op: _conv_call(d, True) for d in (1, 2, 3) for op in available(_aten, f"conv_transpose{d}d")},
    **{op: _pool_call(d, None) for name in ("max_pool", "avg_pool", "adaptive_avg_pool")
       for d in (1, 2, 3) for op in available(_aten, f"{name}{d}d")},
}
"""What each ATen operator (by packet: every overload, unless one has a row of its own) does, in
the graphs of ``torch.export``. Most follow the rule of the torch function of the same name,
whose arguments ATen lays out alike; embedding (the table first), the batch and instance norms
(their vectors reordered), slice, select and numpy_T have rules of their own."""

