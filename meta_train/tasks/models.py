"""The small networks that tasks train, and their seeded initialisation.

MLPs and CNNs are plain ``nn.Sequential`` stacks of ``Linear``/``Conv2d``/``BatchNorm2d`` and
activations. The broader architectures are small modules of standard layers: pre-LayerNorm
residual MLPs, MLP autoencoders, causal character transformers (``nn.TransformerEncoderLayer``)
and LSTM / GRU character models. The weight-space structure (which axes share neurons) can be
read from the modules, and ``torch.func.functional_call`` can run them on any parameter dict.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

ACTIVATIONS: dict[str, type[nn.Module]] = {"relu": nn.ReLU, "tanh": nn.Tanh, "gelu": nn.GELU}
ARCHS: tuple[str, ...] = ("mlp", "cnn", "resmlp", "autoencoder", "transformer", "lstm", "gru")
SEQUENCE_ARCHS: tuple[str, ...] = ("transformer", "lstm", "gru")
"""Architectures that read sequences of token ids (the text datasets)."""
DEPTH_RANGE: dict[str, tuple[int, int]] = {
    "mlp": (1, 4), "cnn": (1, 3), "resmlp": (1, 4), "autoencoder": (1, 2), "transformer": (1, 2), "lstm": (1, 1),
    "gru": (1, 1),
}
"""Inclusive range of hidden layers (MLP), conv layers (CNN), residual blocks (residual MLP), hidden
layers on each side of the code (autoencoder), encoder layers (transformer) or recurrent layers."""
WIDTH_RANGE: dict[str, tuple[int, int]] = {
    "mlp": (16, 128), "cnn": (4, 32), "resmlp": (16, 128), "autoencoder": (16, 128), "transformer": (8, 64),
    "lstm": (8, 64), "gru": (8, 64),
}
"""Inclusive range of hidden units (MLP, residual MLP, autoencoder), channels (CNN), the model
dimension (transformer, a multiple of :data:`HEAD_DIM`) or the hidden state (LSTM, GRU)."""
HEAD_DIM = 8
"""A transformer's attention heads have this many dimensions each: ``width // HEAD_DIM`` heads."""


def check_architecture(
    arch: str, depth: int, width: int, activation: str, batchnorm: bool, conv_bias: bool = False
) -> None:
    """Raise ``ValueError`` with the accepted values unless the architecture is one we build."""
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; known archs: {', '.join(ARCHS)}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}; known activations: {', '.join(ACTIVATIONS)}")
    lo, hi = DEPTH_RANGE[arch]
    if not lo <= depth <= hi:
        raise ValueError(f"depth {depth} out of range for {arch}: must be in [{lo}, {hi}]")
    lo, hi = WIDTH_RANGE[arch]
    if not lo <= width <= hi:
        raise ValueError(f"width {width} out of range for {arch}: must be in [{lo}, {hi}]")
    if arch == "transformer" and width % HEAD_DIM:
        raise ValueError(f"width {width} of a transformer must be a multiple of {HEAD_DIM}")
    if batchnorm and arch != "cnn":
        raise ValueError("batchnorm is only available for arch 'cnn'")
    if conv_bias and not batchnorm:
        raise ValueError("conv_bias keeps a conv's bias before BatchNorm: it needs batchnorm")


class ResidualBlock(nn.Module):
    """``x + fc2(act(fc1(layernorm(x))))``: a pre-norm residual block of constant width."""

    def __init__(self, width: int, activation: str) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.fc1 = nn.Linear(width, width)
        self.act = ACTIVATIONS[activation]()
        self.fc2 = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(self.act(self.fc1(self.norm(x))))


class CharTransformer(nn.Module):
    """A transformer encoder over ``(batch, length)`` token ids, pre-LayerNorm, without dropout.

    ``per_position``: causal language modelling, logits ``(batch, n_outputs, length)`` (the
    layout in which ``F.cross_entropy`` and an argmax over dim 1 read a sequence of predictions);
    otherwise sequence classification, bidirectional, the final states mean-pooled into logits
    ``(batch, n_outputs)``. Positions are a learned ``Embedding`` of ``length`` rows. Attention
    runs on the math kernel of ``scaled_dot_product_attention``, the one with a second derivative
    (meta-training differentiates through inner gradients; the fused CPU kernel has none).
    """

    def __init__(
        self, vocabulary: int, length: int, depth: int, width: int, activation: str, n_outputs: int, per_position: bool
    ) -> None:
        super().__init__()
        self.per_position = per_position
        self.embed = nn.Embedding(vocabulary, width)
        self.position = nn.Embedding(length, width)
        act = {"relu": F.relu, "gelu": F.gelu, "tanh": torch.tanh}[activation]
        layer = nn.TransformerEncoderLayer(
            width, width // HEAD_DIM, 2 * width, dropout=0.0, activation=act, batch_first=True, norm_first=True
        )
        self.encoder = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, n_outputs)
        # A plain attribute, not a buffer: a constant, not state to load or optimise.
        self.causal_mask = nn.Transformer.generate_square_subsequent_mask(length) if per_position else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x) + self.position.weight
        with sdpa_kernel(SDPBackend.MATH):
            if self.per_position:
                h = self.encoder(h, mask=self.causal_mask.to(device=h.device, dtype=h.dtype), is_causal=True)
                return self.head(self.norm(h)).transpose(1, 2)
            return self.head(self.norm(self.encoder(h)).mean(dim=1))


class CharRNN(nn.Module):
    """An ``Embedding``, a one-layer ``nn.LSTM`` or ``nn.GRU`` (batch first) and a ``Linear`` head.

    ``per_position``: next-token logits ``(batch, n_outputs, length)``; otherwise the states are
    mean-pooled into logits ``(batch, n_outputs)``.
    """

    def __init__(self, kind: str, vocabulary: int, width: int, n_outputs: int, per_position: bool) -> None:
        super().__init__()
        self.per_position = per_position
        self.embed = nn.Embedding(vocabulary, width)
        self.rnn = {"lstm": nn.LSTM, "gru": nn.GRU}[kind](width, width, batch_first=True)
        self.head = nn.Linear(width, n_outputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, _ = self.rnn(self.embed(x))
        if self.per_position:
            return self.head(h).transpose(1, 2)
        return self.head(h.mean(dim=1))


def build_model(
    arch: str,
    depth: int,
    width: int,
    activation: str,
    batchnorm: bool,
    input_shape: tuple[int, ...],
    n_outputs: int,
    conv_bias: bool = False,
    vocabulary: int = 0,
    per_position: bool = True,
) -> nn.Module:
    """A model of ``arch`` for inputs of ``input_shape`` (without the batch axis) and ``n_outputs`` outputs.

    MLP: flatten, then ``depth`` hidden ``Linear`` layers of ``width`` units with the activation,
    then a ``Linear`` head. CNN (``input_shape`` is ``(C, H, W)``): ``depth`` 3x3 convolutions
    (padding 1) of ``width`` channels, each followed by optional ``BatchNorm2d`` and the activation,
    then global average pooling and a ``Linear`` head. A conv followed by BatchNorm has no bias
    unless ``conv_bias``: the normalisation cancels it, leaving a parameter whose gradient is
    rounding noise (a case an optimizer meets in real models). Residual MLP: flatten, a ``Linear``
    embedding to ``width``, ``depth`` pre-LayerNorm residual blocks, a final LayerNorm and a head.
    Autoencoder: ``depth`` hidden layers of ``width`` units, a code of ``max(2, width // 4)``
    units, ``depth`` hidden layers and a linear decoder back to ``n_outputs`` (the flattened
    input). Transformer, LSTM, GRU (``input_shape`` is ``(length,)`` of token ids below
    ``vocabulary``): :class:`CharTransformer`, :class:`CharRNN` (the activation is unused: their
    gates are fixed), with logits per position when ``per_position``.
    """
    check_architecture(arch, depth, width, activation, batchnorm, conv_bias)
    act = ACTIVATIONS[activation]
    if arch in SEQUENCE_ARCHS:
        if len(input_shape) != 1 or vocabulary < 1:
            raise ValueError(f"arch {arch!r} needs token sequences (length,) and a vocabulary, got input shape "
                             f"{input_shape} and vocabulary {vocabulary}")
        if arch == "transformer":
            return CharTransformer(vocabulary, input_shape[0], depth, width, activation, n_outputs, per_position)
        return CharRNN(arch, vocabulary, width, n_outputs, per_position)
    layers: list[nn.Module] = []
    if arch in ("mlp", "autoencoder"):
        layers.append(nn.Flatten())
        fan_in = math.prod(input_shape)
        sizes = [width] * depth
        if arch == "autoencoder":
            sizes = sizes + [max(2, width // 4)] + sizes
        for size in sizes:
            layers += [nn.Linear(fan_in, size), act()]
            fan_in = size
    elif arch == "resmlp":
        layers += [nn.Flatten(), nn.Linear(math.prod(input_shape), width)]
        layers += [ResidualBlock(width, activation) for _ in range(depth)]
        layers.append(nn.LayerNorm(width))
        fan_in = width
    else:
        if len(input_shape) != 3:
            raise ValueError(f"arch 'cnn' needs image inputs (C, H, W), got input shape {input_shape}")
        channels = input_shape[0]
        for _ in range(depth):
            layers.append(nn.Conv2d(channels, width, kernel_size=3, padding=1, bias=not batchnorm or conv_bias))
            if batchnorm:
                layers.append(nn.BatchNorm2d(width))
            layers.append(act())
            channels = width
        layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
        fan_in = width
    layers.append(nn.Linear(fan_in, n_outputs))
    return nn.Sequential(*layers)


def init_parameters(model: nn.Module, generator: torch.Generator, scale: float = 1.0) -> dict[str, torch.Tensor]:
    """Fresh parameters for ``model``: PyTorch's default init times ``scale``, drawn from ``generator``.

    ``Linear`` and ``Conv2d`` weights and biases are uniform in ``±scale/sqrt(fan_in)`` (what
    ``reset_parameters`` does, but seeded); ``BatchNorm2d`` and ``LayerNorm`` start as the identity
    (weight 1, bias 0) whatever the scale. ``Embedding`` weights are standard normal times
    ``scale``. ``MultiheadAttention``'s packed input projection is Xavier-uniform times ``scale``
    with a zero bias, and its output projection a ``Linear`` with a zero bias. ``LSTM`` / ``GRU``
    weights and biases are uniform in ``±scale/sqrt(hidden_size)``. Tensors are drawn on the CPU
    in module order and then moved to the model's device and dtype, so a generator seed gives the
    same values on every device.
    """
    params: dict[str, torch.Tensor] = {}
    zero_bias: set[str] = set()

    def uniform(p: torch.Tensor, bound: float) -> torch.Tensor:
        u = torch.rand(p.shape, generator=generator, dtype=torch.float64)
        return ((2 * u - 1) * bound).to(device=p.device, dtype=p.dtype)

    for prefix, module in model.named_modules():
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            bound = scale / math.sqrt(module.weight[0].numel())
            for name, p in module.named_parameters(recurse=False):
                params[f"{prefix}.{name}"] = uniform(p, bound)
                if f"{prefix}.{name}" in zero_bias:
                    params[f"{prefix}.{name}"] = torch.zeros_like(p)
        elif isinstance(module, (nn.BatchNorm2d, nn.LayerNorm)):
            params[f"{prefix}.weight"] = torch.ones_like(module.weight)
            params[f"{prefix}.bias"] = torch.zeros_like(module.bias)
        elif isinstance(module, nn.Embedding):
            w = torch.randn(module.weight.shape, generator=generator, dtype=torch.float64) * scale
            params[f"{prefix}.weight"] = w.to(device=module.weight.device, dtype=module.weight.dtype)
        elif isinstance(module, nn.MultiheadAttention):
            if module.in_proj_weight is None:
                raise ValueError(f"{prefix}: attention with separate q/k/v projections is not supported")
            w = module.in_proj_weight
            params[f"{prefix}.in_proj_weight"] = uniform(w, scale * math.sqrt(6 / (w.shape[0] + w.shape[1])))
            params[f"{prefix}.in_proj_bias"] = torch.zeros_like(module.in_proj_bias)
            zero_bias.add(f"{prefix}.out_proj.bias")
        elif isinstance(module, (nn.LSTM, nn.GRU)):
            bound = scale / math.sqrt(module.hidden_size)
            for name, p in module.named_parameters(recurse=False):
                params[f"{prefix}.{name}"] = uniform(p, bound)
    return params
