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
    polar: bool = False  # one more channel: the polar factor of Adam's momentum (see :func:`polar_factor`)

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
        """p, g, each momentum, (with ``polar``, the polar factor of Adam's momentum,) sqrt(v) and
        Adam's direction."""
        return len(self.momentum_decays) + 4 + self.polar

    @property
    def context_channels(self) -> int:
        return len(self.time_scales) + 1

    def to_dict(self) -> dict:
        """The fields; without ``polar`` where it is off, so that such a config is written, and
        fingerprinted, as before the option existed."""
        d = asdict(self)
        if not d["polar"]:
            del d["polar"]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> FeatureConfig:
        return cls(**d)


STATISTICS = ("step", "momenta", "v")
"""The keys of a parameter's statistics (:func:`init_state`)."""


def init_state(p: torch.Tensor, cfg: FeatureConfig) -> dict[str, torch.Tensor]:
    """Fresh statistics for one parameter, in float32 (or float64 for float64 parameters)."""
    dtype = torch.float64 if p.dtype == torch.float64 else torch.float32
    return {
        "step": torch.zeros((), dtype=dtype, device=p.device),
        "momenta": torch.zeros((len(cfg.momentum_decays), *p.shape), dtype=dtype, device=p.device),
        "v": torch.zeros(p.shape, dtype=dtype, device=p.device),
    }


def per_member(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(B,) per-member values shaped to broadcast over a (B, *rest) tensor like ``like``."""
    return values.reshape(-1, *([1] * (like.dim() - 1)))


def update_statistics(
    g: torch.Tensor, state: dict[str, torch.Tensor], cfg: FeatureConfig, ok: torch.Tensor
) -> dict[str, torch.Tensor]:
    """New statistics of B same-shape tensors after seeing their gradients ``g`` (B, *shape).

    ``state`` holds ``step`` (B,), ``momenta`` (B, M, *shape) and ``v`` (B, *shape); ``ok`` (B,)
    is 1 per member, or 0 to hold that member's statistics still. Functional (returns new
    tensors) so that unrolled meta-training can differentiate through it.
    """
    momenta = state["momenta"]
    rates = ok[:, None] * constant([1 - d for d in cfg.momentum_decays], g)
    momenta = torch.lerp(momenta, g.unsqueeze(1).expand_as(momenta), rates.reshape(*rates.shape, *([1] * (g.dim() - 1))))
    v = torch.lerp(state["v"], g * g, per_member((1 - cfg.beta2) * ok, g))
    return {"step": state["step"] + ok, "momenta": momenta, "v": v}


SQRT_FLOOR = 1e-30
"""Inside sqrt(v̂): an exactly-zero gradient element (a constant input pixel, a dead ReLU) would
otherwise give sqrt an infinite derivative and the meta-gradient NaN. Far below eps², so a fresh
rule still steps as Adam."""


def bias_corrections(step: torch.Tensor, cfg: FeatureConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Adam's bias corrections 1 - β1^t and 1 - β2^t of each member (B,) at its step t (at least 1)."""
    t = step.clamp(min=1)
    return 1 - cfg.momentum_decays[cfg.adam_momentum] ** t, 1 - cfg.beta2**t


def snr_scales(step: torch.Tensor, cfg: FeatureConfig, margin: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per member (B,), the factor c and the offset b of the signal-to-noise gate's
    q = max((c·m / (sqrt(v̂ + ε) + eps))² - b, 0) at step t (at least 1), m the last momentum (of decay
    d, the slowest: 0.99 by default).

    Without a ``margin`` (0), c = 1/(1 - d^t) (m bias-corrected) and b = 0: q = ρ². With a margin
    K > 0, q = (ρ² - K·n_t)/(1 - n_t), where n_t = (1 - d)(1 + d^t) / ((1 + d)(1 - d^t)) is the
    share of ρ² that pure noise gives after t steps (1 at step 1, (1 - d)/(1 + d) in the long run):
    q estimates the gradient's signal fraction μ²/(μ² + σ²), and with K > 1 it is 0 unless the
    evidence for a signal is K times the noise's. At step 1 (n_t = 1: one gradient cannot tell
    signal from noise) c = b = 0."""
    d = cfg.momentum_decays[-1]
    t = step.clamp(min=1)
    bc = 1 - d**t
    if not margin:
        return 1 / bc, torch.zeros_like(bc)
    signal = 2 * d * (1 - d ** (t - 1)) / ((1 + d) * bc)  # 1 - n_t, exactly 0 at step 1
    first = signal <= 0
    signal = torch.where(first, torch.ones_like(signal), signal)
    c = torch.where(first, torch.zeros_like(bc), 1 / (bc * torch.sqrt(signal)))
    b = torch.where(first, torch.zeros_like(bc), margin * (1 - signal) / signal)
    return c, b


def adam_direction(state: dict[str, torch.Tensor], cfg: FeatureConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Adam's bias-corrected direction m̂/(sqrt(v̂)+eps), and sqrt(v̂), of B same-shape tensors
    (statistics as in :func:`update_statistics`); at step 0 both are zero."""
    v = state["v"]
    bc1, bc2 = (per_member(c, v) for c in bias_corrections(state["step"], cfg))
    root_v = torch.sqrt(v / bc2 + SQRT_FLOOR)
    u = state["momenta"][:, cfg.adam_momentum] / bc1 / (root_v + cfg.eps)
    return u, root_v


def inverse_rms(x: torch.Tensor, eps: float) -> torch.Tensor:
    """1/sqrt(mean(x²) + eps) of each member and channel of (B, C, *shape) features: (B, C)."""
    flat = x.reshape(x.shape[0], x.shape[1], -1)
    return torch.rsqrt(torch.linalg.vecdot(flat, flat) / max(flat.shape[2], 1) + eps)


NEWTON_SCHULZ = (3.4445, -4.7750, 2.0315)
"""The quintic X ← aX + b(XXᵀ)X + c(XXᵀ)²X that Muon iterates: from X = M/‖M‖ it takes every
singular value into about [0.7, 1.2] in a few steps (fast rather than exact)."""

NEWTON_SCHULZ_STEPS = 5


def polar_factor(m: torch.Tensor, eps: float) -> torch.Tensor:
    """The approximate polar factor UVᵀ (B, *shape) of each member of B same-shape tensors read as
    matrices (the first dimension by the rest; a vector as one column; a scalar as 1x1), from
    :data:`NEWTON_SCHULZ_STEPS` steps of :data:`NEWTON_SCHULZ` from M/sqrt(‖M‖² + eps) (``eps``
    keeps the derivative finite where M = 0). It commutes with permutations and sign flips of
    rows and columns (P·M·Q ↦ P·UVᵀ·Q), so a rule that reads it stays equivariant; it is 0 where
    M is."""
    b = m.shape[0]
    x = m.reshape(b, m.shape[1] if m.dim() > 1 else m[0].numel(), -1)
    tall = x.shape[1] > x.shape[2]
    if tall:
        x = x.transpose(1, 2)
    x = x * torch.rsqrt(torch.linalg.vecdot(x.flatten(1), x.flatten(1)) + eps)[:, None, None]
    a, bb, c = NEWTON_SCHULZ
    for _ in range(NEWTON_SCHULZ_STEPS):
        gram = x @ x.transpose(1, 2)
        x = a * x + (bb * gram + c * gram @ gram) @ x
    if tall:
        x = x.transpose(1, 2)
    return x.reshape(m.shape)


def stack_features(
    p: torch.Tensor, g: torch.Tensor, state: dict[str, torch.Tensor], u: torch.Tensor, root_v: torch.Tensor,
    polar: torch.Tensor | None = None,
) -> torch.Tensor:
    """The per-element channels (B, C, *shape) of B same-shape tensors: p, g, the momenta, the
    polar factor of Adam's momentum where ``polar`` is given, sqrt(v̂) and Adam's direction u."""
    extra = [] if polar is None else [polar.unsqueeze(1)]
    return torch.cat([p.unsqueeze(1), g.unsqueeze(1), state["momenta"], *extra, root_v.unsqueeze(1), u.unsqueeze(1)], 1)


def context(step: torch.Tensor, inv: torch.Tensor, cfg: FeatureConfig) -> torch.Tensor:
    """Each member's per-tensor invariants (B, context_channels): time features tanh(t/s) and the
    log-RMS of the parameter (from the inverse RMS ``inv`` (B, C) of its channels)."""
    return torch.cat([torch.tanh(step[:, None] / constant(cfg.time_scales, inv)), (-0.1 * torch.log(inv[:, :1]))], 1)


def features(
    p: torch.Tensor, g: torch.Tensor, state: dict[str, torch.Tensor], u: torch.Tensor, root_v: torch.Tensor,
    cfg: FeatureConfig,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-element features (B, C, *shape) of B same-shape tensors, the inverse RMS of each
    member's channels (B, C) that normalises them (the NFN folds it into its first layer's
    weights), and each member's context vector (B, context_channels)."""
    polar = polar_factor(state["momenta"][:, cfg.adam_momentum], cfg.rms_eps) if cfg.polar else None
    x = stack_features(p, g, state, u, root_v, polar)
    inv = inverse_rms(x, cfg.rms_eps)
    return x, inv, context(state["step"], inv, cfg)
