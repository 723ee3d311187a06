"""What calls of ``torch.nn`` modules do to axis variables.

A module's rule sees the module (its parameters' layouts come from
:meth:`~nfopt.labelling.axes.AxisInference.tensor`) and the layouts of its call's operands, and
mostly says which operation of :mod:`nfopt.labelling.op_rules` it computes; composite modules
(attention, transformer layers) follow their forward through their submodules. Rules go by exact
type, since a subclass may compute something else; a module with no rule, or with forward hooks,
pins everything it touches. Supporting a new module is a row in :data:`MODULE_RULES`.
"""

from __future__ import annotations

from functools import reduce
from typing import Any

from torch import nn

from .axes import UNKNOWN, AxisInference, Layout, ModuleRule, Unsupported, as_layout
from .op_rules import POINTWISE_FUNCTIONS, conv, embedding, group_norm, linear, per_channel, pointwise, pool, reshape
from .trace import available, call_arg

# --------------------------------------------------------------------------------------------------
# Layers
# --------------------------------------------------------------------------------------------------


def _input(args: tuple, kwargs: dict) -> Any:
    return call_arg(args, kwargs, 0, "input")


_ELEMENTWISE_MODULES = available(
    nn,
    "Identity ReLU ReLU6 GELU Tanh Sigmoid SiLU Mish LeakyReLU ELU SELU CELU Softplus Softsign Hardtanh "
    "Hardswish Hardsigmoid Tanhshrink Softshrink Hardshrink LogSigmoid Threshold Dropout Dropout1d "
    "Dropout2d Dropout3d AlphaDropout FeatureAlphaDropout Softmax LogSoftmax Softmin Softmax2d",
)


def _is_elementwise(fn: Any) -> bool:
    """Whether a callable (a TransformerEncoderLayer's activation) acts elementwise."""
    return type(fn) in _ELEMENTWISE_MODULES or any(fn is f for f in POINTWISE_FUNCTIONS)


def _elementwise_module(inf: AxisInference, m: nn.Module, args: tuple, kwargs: dict) -> Any:
    return pointwise(inf, _input(args, kwargs))


def _linear_module(inf: AxisInference, m: nn.Module, args: tuple, kwargs: dict) -> Any:
    return linear(inf, _input(args, kwargs), inf.tensor(m.weight), inf.tensor(m.bias))


def _layer_norm_module(inf: AxisInference, m: nn.Module, args: tuple, kwargs: dict) -> Any:
    """LayerNorm and RMSNorm: equivariant along every axis, affine weights broadcast on the last."""
    return pointwise(inf, _input(args, kwargs), inf.tensor(m.weight), inf.tensor(getattr(m, "bias", None)))


def _group_norm_module(inf: AxisInference, m: nn.Module, args: tuple, kwargs: dict) -> Layout:
    return group_norm(inf, _input(args, kwargs), m.num_groups, inf.tensor(m.weight), inf.tensor(m.bias))


def _prelu_module(inf: AxisInference, m: nn.Module, args: tuple, kwargs: dict) -> Any:
    """PReLU: one slope per channel (axis 1), or one for all."""
    if m.num_parameters == 1:
        return pointwise(inf, _input(args, kwargs))
    return per_channel(inf, _input(args, kwargs), 1, inf.tensor(m.weight))


def _embedding_module(inf: AxisInference, m: nn.Module, args: tuple, kwargs: dict) -> Layout:
    return embedding(inf, _input(args, kwargs), inf.tensor(m.weight))


def _reshape_module(inf: AxisInference, m: nn.Module, args: tuple, kwargs: dict) -> Layout:
    return reshape(inf, _input(args, kwargs))


def _channel_dim_module(dim: int) -> ModuleRule:
    """Batch and instance norms: per-channel weights and running statistics along ``dim``."""

    def rule(inf: AxisInference, m: nn.Module, args: tuple, kwargs: dict) -> Layout:
        tensors = (m.weight, m.bias, getattr(m, "running_mean", None), getattr(m, "running_var", None))
        return per_channel(inf, _input(args, kwargs), dim, *map(inf.tensor, tensors))

    return rule


def _conv_module(d: int, transposed: bool) -> ModuleRule:
    def rule(inf: AxisInference, m: nn.Module, args: tuple, kwargs: dict) -> Layout:
        return conv(inf, _input(args, kwargs), inf.tensor(m.weight), inf.tensor(m.bias), d, m.groups, transposed)

    return rule


def _pool_module(d: int) -> ModuleRule:
    def rule(inf: AxisInference, m: nn.Module, args: tuple, kwargs: dict) -> Layout:
        if getattr(m, "return_indices", False):
            raise Unsupported
        return pool(inf, _input(args, kwargs), d)

    return rule


# --------------------------------------------------------------------------------------------------
# Attention and transformer layers
# --------------------------------------------------------------------------------------------------


def _attention(inf: AxisInference, m: nn.MultiheadAttention, args: tuple, kwargs: dict) -> tuple:
    """nn.MultiheadAttention: input features tied to the projections' columns and the output
    features to out_proj's rows. The packed q/k/v rows and the head axis stay pinned (permuting
    them across heads or between q, k and v is no symmetry)."""
    names = ("query", "key", "value")
    qkv = [as_layout(call_arg(args, kwargs, i, name)) for i, name in enumerate(names)]
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
    out = Layout(inf.fresh(n_lead) + out_w.vars[:1], (None,) * n_lead + out_w.sizes[:1], qkv[0].complete)
    return out, UNKNOWN


def _encoder_layer(inf: AxisInference, m: nn.TransformerEncoderLayer, args: tuple, kwargs: dict) -> Any:
    """nn.TransformerEncoderLayer, following its forward: the residual stream's features tie
    attention's input and output, the norms and the feed-forward block's ends; the feed-forward
    hidden neurons are a set of their own when the activation is elementwise."""
    x = as_layout(call_arg(args, kwargs, 0, "src"))
    inf.pin((args[1:], {k: v for k, v in kwargs.items() if k != "src"}))

    def attend(y: Any) -> Any:
        out = inf.call_submodule(m.self_attn, (y, y, y))
        if isinstance(out, tuple):
            return out[0]
        inf.pin(out)
        return UNKNOWN

    def feed_forward(y: Any) -> Any:
        h = inf.call_submodule(m.linear1, (y,))
        if not _is_elementwise(m.activation):
            h = inf.opaque((h,), {})
        return inf.call_submodule(m.linear2, (h,))

    if m.norm_first:
        x = pointwise(inf, x, attend(inf.call_submodule(m.norm1, (x,))))
        return pointwise(inf, x, feed_forward(inf.call_submodule(m.norm2, (x,))))
    x = inf.call_submodule(m.norm1, (pointwise(inf, x, attend(x)),))
    return inf.call_submodule(m.norm2, (pointwise(inf, x, feed_forward(x)),))


def _encoder(inf: AxisInference, m: nn.TransformerEncoder, args: tuple, kwargs: dict) -> Any:
    """nn.TransformerEncoder: its layers in turn, then its final norm."""
    x = call_arg(args, kwargs, 0, "src")
    inf.pin((args[1:], {k: v for k, v in kwargs.items() if k != "src"}))
    for layer in m.layers:
        x = inf.call_submodule(layer, (x,))
    return x if m.norm is None else inf.call_submodule(m.norm, (x,))


# --------------------------------------------------------------------------------------------------
# Recurrent layers
# --------------------------------------------------------------------------------------------------


GATES = {nn.RNN: 1, nn.GRU: 3, nn.LSTM: 4}
"""How many gate blocks a recurrent layer's input and recurrent weights stack along their rows."""


def _rnn(inf: AxisInference, m: nn.RNNBase, args: tuple, kwargs: dict) -> tuple:
    """nn.RNN (tanh or ReLU), nn.LSTM and nn.GRU: a layer's hidden neurons index the rows of its
    input weights and biases (each gate's block of rows alike: LSTM 4, GRU 3), and both axes of its
    recurrent weights; they are the next layer's inputs and the output's features. The final
    state h_n (and an LSTM's c_n) stacks every layer's hidden state along one axis, so with several
    layers their sets are one (the same permutation for all: still a symmetry, whatever reads
    h_n). A given initial state is read along the same axis and joins that set (pinning it unless
    it is permuted too). Bidirectional layers and an LSTM's projections: see
    :func:`_recurrent_inputs`."""
    if m.bidirectional or getattr(m, "proj_size", 0):
        return _recurrent_inputs(inf, m, args, kwargs)
    gates = GATES[type(m)]
    x = as_layout(call_arg(args, kwargs, 0, "input"))
    hx = call_arg(args, kwargs, 1, "hx")
    features = inf.dim(x, -1)[0]
    hidden = []
    for k in range(m.num_layers):
        w_ih, w_hh = (getattr(m, f"weight_{w}_l{k}") for w in ("ih", "hh"))
        rows = [w_ih, w_hh, *((getattr(m, f"bias_{w}_l{k}") for w in ("ih", "hh")) if m.bias else ())]
        for t in rows:
            inf.block(t, gates)
        h = reduce(inf.union, [inf.tensor(t).vars[0] for t in rows] + [inf.tensor(w_hh).vars[1]])
        inf.union(features, inf.tensor(w_ih).vars[1])
        features = h
        hidden.append(h)
    state = reduce(inf.union, hidden)
    states = () if hx is None else tuple(hx) if isinstance(m, nn.LSTM) else (hx,)
    for h0 in states:
        h0 = as_layout(h0)
        inf.union(state, inf.dim(h0, -1)[0])
        inf.pin(h0.lead(1))
    if m.num_layers > 1:
        hidden = [state] * m.num_layers
    lead = len(x.lead(1).vars)

    def layout(v: int) -> Layout:
        return Layout(inf.fresh(lead) + (v,), (None,) * lead + (m.hidden_size,), x.complete)

    out, h_n = layout(hidden[-1]), layout(state)
    return (out, (h_n, layout(state))) if isinstance(m, nn.LSTM) else (out, h_n)


def _recurrent_inputs(inf: AxisInference, m: nn.RNNBase, args: tuple, kwargs: dict) -> tuple:
    """Bidirectional recurrent layers and LSTMs with projections: the input features index the
    first layer's input weights' columns (of both directions); everything else stays pinned. A
    bidirectional layer's output holds two sets side by side, which no label expresses."""
    x = as_layout(call_arg(args, kwargs, 0, "input"))
    inf.pin((args[1:], {k: v for k, v in kwargs.items() if k != "input"}))
    inf.pin(x.lead(1))
    features = inf.dim(x, -1)[0]
    for name, t in m.named_parameters(recurse=False):
        layout = inf.tensor(t)
        if name in ("weight_ih_l0", "weight_ih_l0_reverse"):
            inf.union(features, layout.vars[1])
            inf.pin_vars(layout.vars[:1])
        else:
            inf.pin(layout)
    return UNKNOWN, UNKNOWN


# --------------------------------------------------------------------------------------------------
# Which rule each module type follows
# --------------------------------------------------------------------------------------------------


MODULE_RULES: dict[type, ModuleRule] = {
    **{cls: _elementwise_module for cls in _ELEMENTWISE_MODULES},
    nn.Linear: _linear_module,
    nn.modules.linear.NonDynamicallyQuantizableLinear: _linear_module,
    **{cls: _conv_module(d, False) for d, cls in enumerate((nn.Conv1d, nn.Conv2d, nn.Conv3d), 1)},
    **{cls: _conv_module(d, True) for d in (1, 2, 3) for cls in available(nn, f"ConvTranspose{d}d")},
    nn.BatchNorm1d: _channel_dim_module(1),
    nn.SyncBatchNorm: _channel_dim_module(1),
    nn.BatchNorm2d: _channel_dim_module(-3),
    nn.BatchNorm3d: _channel_dim_module(-4),
    **{cls: _channel_dim_module(-(d + 1)) for d in (1, 2, 3) for cls in available(nn, f"InstanceNorm{d}d")},
    **{cls: _layer_norm_module for cls in available(nn, "LayerNorm RMSNorm")},
    nn.GroupNorm: _group_norm_module,
    nn.PReLU: _prelu_module,
    nn.Embedding: _embedding_module,
    nn.Flatten: _reshape_module,
    nn.Unflatten: _reshape_module,
    **{cls: _pool_module(d) for name in ("MaxPool", "AvgPool", "AdaptiveAvgPool", "AdaptiveMaxPool", "LPPool")
       for d in (1, 2, 3) for cls in available(nn, f"{name}{d}d")},
    nn.MultiheadAttention: _attention,
    nn.TransformerEncoderLayer: _encoder_layer,
    nn.TransformerEncoder: _encoder,
    **{cls: _rnn for cls in GATES},
}
"""What each torch.nn leaf module (by exact type: a subclass may compute something else) does."""
