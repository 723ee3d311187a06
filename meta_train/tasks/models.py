"""The small networks that tasks train: MLPs and CNNs, and their seeded initialisation.

Models are plain ``nn.Sequential`` stacks of ``Linear``/``Conv2d``/``BatchNorm2d`` and
activations, so the weight-space structure (which axes share neurons) can be read from the
modules, and ``torch.func.functional_call`` can run them on any parameter dict.
"""

from __future__ import annotations

import math

import torch
from torch import nn

ACTIVATIONS: dict[str, type[nn.Module]] = {"relu": nn.ReLU, "tanh": nn.Tanh, "gelu": nn.GELU}
ARCHS: tuple[str, ...] = ("mlp", "cnn")
DEPTH_RANGE: dict[str, tuple[int, int]] = {"mlp": (1, 4), "cnn": (1, 3)}
"""Inclusive range of hidden layers (MLP) or conv layers (CNN)."""
WIDTH_RANGE: dict[str, tuple[int, int]] = {"mlp": (16, 128), "cnn": (4, 32)}
"""Inclusive range of hidden units (MLP) or channels (CNN)."""


def check_architecture(arch: str, depth: int, width: int, activation: str, batchnorm: bool) -> None:
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
    if batchnorm and arch != "cnn":
        raise ValueError("batchnorm is only available for arch 'cnn'")


def build_model(
    arch: str,
    depth: int,
    width: int,
    activation: str,
    batchnorm: bool,
    input_shape: tuple[int, ...],
    n_outputs: int,
) -> nn.Sequential:
    """An MLP or CNN for inputs of ``input_shape`` (without the batch axis) and ``n_outputs`` outputs.

    MLP: flatten, then ``depth`` hidden ``Linear`` layers of ``width`` units with the activation,
    then a ``Linear`` head. CNN (``input_shape`` is ``(C, H, W)``): ``depth`` 3x3 convolutions
    (padding 1) of ``width`` channels, each followed by optional ``BatchNorm2d`` and the activation,
    then global average pooling and a ``Linear`` head. A conv followed by BatchNorm has no bias: the
    normalisation would cancel it, leaving a parameter with an identically zero gradient.
    """
    check_architecture(arch, depth, width, activation, batchnorm)
    act = ACTIVATIONS[activation]
    layers: list[nn.Module] = []
    if arch == "mlp":
        layers.append(nn.Flatten())
        fan_in = math.prod(input_shape)
        for _ in range(depth):
            layers += [nn.Linear(fan_in, width), act()]
            fan_in = width
    else:
        if len(input_shape) != 3:
            raise ValueError(f"arch 'cnn' needs image inputs (C, H, W), got input shape {input_shape}")
        channels = input_shape[0]
        for _ in range(depth):
            layers.append(nn.Conv2d(channels, width, kernel_size=3, padding=1, bias=not batchnorm))
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
    ``reset_parameters`` does, but seeded); ``BatchNorm2d`` starts as the identity (weight 1,
    bias 0) whatever the scale. Tensors are drawn on the CPU in module order and then moved to the
    model's device and dtype, so a generator seed gives the same values on every device.
    """
    params: dict[str, torch.Tensor] = {}
    for prefix, module in model.named_modules():
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            bound = scale / math.sqrt(module.weight[0].numel())
            for name, p in module.named_parameters(recurse=False):
                u = torch.rand(p.shape, generator=generator, dtype=torch.float64)
                params[f"{prefix}.{name}"] = ((2 * u - 1) * bound).to(device=p.device, dtype=p.dtype)
        elif isinstance(module, nn.BatchNorm2d):
            params[f"{prefix}.weight"] = torch.ones_like(module.weight)
            params[f"{prefix}.bias"] = torch.zeros_like(module.bias)
    return params
