"""Per-element optimizer features and the statistics they are built from.

Each parameter tensor keeps momenta of its gradient at a few decay rates, Adam's second moment and
a step counter. From them the NFN reads, per element, the parameter, the gradient, the momenta,
the RMS of the gradient and Adam's direction, each channel normalised by its RMS over the tensor
(eps inside the square root, so meta-gradients stay finite at zero); and per tensor, a context of
invariants: time features tanh(t/s) for s over a log range (constants over a tensor, so they are
not normalised) and the log-RMS of the parameter. Nothing depends on a training horizon.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from ..nn.plan import constant


@dataclass(frozen=True)
class FeatureConfig:
    """What the features are; stored in checkpoints so a network is read with the features it was trained on."""

    momentum_decays: tuple[float, ...] = (0.5, 0.9, 0.99)
    adam_momentum: int = 1  # index into momentum_decays of Adam's beta1
    beta2: float = 0.999
    eps: float = 1e-8  # Adam's epsilon
    rms_eps: float = 1e-16  # inside the square root of the per-tensor RMS
    time_scales: tuple[float, ...] = (10.0, 100.0, 1000.0, 10000.0)

    def __post_init__(self) -> None:
        object.__setattr__(self, "momentum_decays", tuple(float(d) for d in self.momentum_decays))
        object.__setattr__(self, "time_scales", tuple(float(s) for s in self.time_scales))
        if not self.momentum_decays or not all(0.0 <= d < 1.0 for d in self.momentum_decays):
            raise ValueError(f"momentum decays must lie in [0, 1), got {self.momentum_decays}")
        if not 0 <= self.adam_momentum < len(self.momentum_decays):
            raise ValueError(f"adam_momentum {self.adam_momentum} is not an index into {self.momentum_decays}")
        if not 0.0 <= self.beta2 < 1.0:
            raise ValueError(f"beta2 must lie in [0, 1), got {self.beta2}")
        if self.eps <= 0 or self.rms_eps <= 0:
            raise ValueError(f"eps and rms_eps must be positive, got {self.eps}, {self.rms_eps}")

    @property
    def channels(self) -> int:
        """p, g, each momentum, sqrt(v) and Adam's direction."""
        return len(self.momentum_decays) + 4

    @property
    def context_channels(self) -> int:
        return len(self.time_scales) + 1

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> FeatureConfig:
        return cls(**d)


def init_state(p: torch.Tensor, cfg: FeatureConfig) -> dict[str, torch.Tensor]:
    """Fresh statistics for one parameter, in float32 (or float64 for float64 parameters)."""
    dtype = torch.float64 if p.dtype == torch.float64 else torch.float32
    return {
        "step": torch.zeros((), dtype=dtype, device=p.device),
        "momenta": torch.zeros((len(cfg.momentum_decays), *p.shape), dtype=dtype, device=p.device),
        "v": torch.zeros(p.shape, dtype=dtype, device=p.device),
    }


def update_statistics(
    g: torch.Tensor, state: dict[str, torch.Tensor], cfg: FeatureConfig, ok: torch.Tensor
) -> dict[str, torch.Tensor]:
    """New statistics after seeing gradient ``g``; ``ok`` (a 0-d 0/1 tensor) holds them still.

    Functional (returns new tensors) so that unrolled meta-training can differentiate through it.
    """
    rates = constant([1 - d for d in cfg.momentum_decays], g) * ok
    momenta = torch.lerp(state["momenta"], g.expand_as(state["momenta"]), rates.reshape(-1, *([1] * g.dim())))
    v = torch.lerp(state["v"], g * g, (1 - cfg.beta2) * ok)
    return {"step": state["step"] + ok, "momenta": momenta, "v": v}


_SQRT_FLOOR = 1e-30
"""Inside sqrt(v̂): an exactly-zero gradient element (a constant input pixel, a dead ReLU) would
otherwise give sqrt an infinite derivative and the meta-gradient NaN. Far below eps², so a fresh
rule still steps as Adam."""


def adam_direction(state: dict[str, torch.Tensor], cfg: FeatureConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Adam's bias-corrected direction m̂/(sqrt(v̂)+eps), and sqrt(v̂); at step 0 both are zero."""
    t = state["step"].clamp(min=1)
    bc1 = 1 - cfg.momentum_decays[cfg.adam_momentum] ** t
    bc2 = 1 - cfg.beta2**t
    root_v = torch.sqrt(state["v"] / bc2 + _SQRT_FLOOR)
    u = state["momenta"][cfg.adam_momentum] / bc1 / (root_v + cfg.eps)
    return u, root_v


def inverse_rms(x: torch.Tensor, eps: float) -> torch.Tensor:
    """1/sqrt(mean(x²) + eps) of each channel (axis 0) over the rest of the tensor: (C,)."""
    flat = x.reshape(x.shape[0], -1)
    return torch.rsqrt(torch.linalg.vecdot(flat, flat) / max(flat.shape[1], 1) + eps)


def features(
    p: torch.Tensor, g: torch.Tensor, state: dict[str, torch.Tensor], u: torch.Tensor, root_v: torch.Tensor,
    cfg: FeatureConfig,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-element features (C, *shape), the inverse RMS of each channel (C,) that normalises
    them (the NFN folds it into its first layer's weights), and the tensor's context vector."""
    x = torch.cat([p.unsqueeze(0), g.unsqueeze(0), state["momenta"], root_v.unsqueeze(0), u.unsqueeze(0)])
    inv = inverse_rms(x, cfg.rms_eps)
    scales = constant(cfg.time_scales, p)
    context = torch.cat([torch.tanh(state["step"] / scales), (-0.1 * torch.log(inv[0])).reshape(1)])
    return x, inv, context
