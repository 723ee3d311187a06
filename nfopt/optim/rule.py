"""The learned update rule: features -> NFN -> a residual on Adam's step.

    Δ = -lr · α · (u_adam + B·tanh(β·d / B)) · exp(clamp(γ·c, ±L))

d and c are the NFN's two output channels, α, β, γ meta-learned positive scalars, each stored as
the log of its ratio to the config's initial value (so that a fresh rule's α is the configured
learning rate exactly, in any dtype).
The NFN's last layer starts at zero, so a fresh rule is exactly Adam with learning rate α and
meta-training moves away from Adam only where that helps. B (``max_deviation``) and L
(``max_log_scale``) bound how far one step may stray from Adam's, per element: far from the
meta-training distribution the rule stays a bounded perturbation of Adam. This module is the functional core
shared by :class:`~nfopt.optim.NFNOptimizer` (under no_grad) and meta-training (differentiated
through unrolls).

Given a :class:`~nfopt.weight_space.MonomialSpec` whose sets flip signs (hidden neurons of tanh
networks), a rule configured with ``sign_flips`` is also equivariant to those flips, as Adam is: the features that do not flip
with the weights (sqrt(v)) are multiplied by sign(u) and the step-size channel c by sign(u)
again, so that d flips with the weights and exp(γ·c) does not. Scalings are refused: gradient
training is not equivariant to them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from .features import FeatureConfig, adam_direction, features, update_statistics
from ..weight_space import MonomialSpec, WeightSpaceSpec
from ..nn.plan import plan_for
from ..nn.nfn import NFN


@dataclass(frozen=True)
class UpdateConfig:
    """The shape of a learned update rule: enough to rebuild it before loading its weights."""

    features: FeatureConfig = FeatureConfig()
    hidden_channels: int = 8
    n_layers: int = 2
    pooled: bool = True
    activation: str = "relu"
    alpha: float = 1e-3
    beta: float = 1.0
    gamma: float = 0.1
    max_deviation: float = 3.0
    max_log_scale: float = 2.0
    sign_flips: bool = False  # equivariant to sign flips of hidden neurons that admit them (tanh)

    def __post_init__(self) -> None:
        if isinstance(self.features, dict):
            object.__setattr__(self, "features", FeatureConfig.from_dict(self.features))
        if min(self.alpha, self.beta, self.gamma, self.max_deviation, self.max_log_scale) <= 0:
            raise ValueError(
                f"alpha, beta, gamma, max_deviation and max_log_scale must be positive, got {self.alpha}, "
                f"{self.beta}, {self.gamma}, {self.max_deviation}, {self.max_log_scale}"
            )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class LearnedUpdate(nn.Module):
    """An NFN and the update's scalars; maps (params, grads, statistics) to new params and statistics."""

    def __init__(self, config: UpdateConfig = UpdateConfig()) -> None:
        super().__init__()
        self.config = config
        f = config.features
        self.nfn = NFN(
            f.channels,
            config.hidden_channels,
            2,
            n_layers=config.n_layers,
            context_channels=f.context_channels,
            pooled=config.pooled,
            activation=config.activation,
            zero_last=True,
        )
        self.log_alpha = nn.Parameter(torch.zeros(()))
        self.log_beta = nn.Parameter(torch.zeros(()))
        self.log_gamma = nn.Parameter(torch.zeros(()))
        self.provenance: dict[str, Any] = {}

    def forward(
        self,
        spec: WeightSpaceSpec | MonomialSpec,
        params: Sequence[torch.Tensor],
        grads: Sequence[torch.Tensor],
        states: Sequence[dict[str, torch.Tensor]],
        lrs: Sequence[float] | None = None,
        weight_decays: Sequence[float] | None = None,
    ) -> tuple[list[torch.Tensor], list[dict[str, torch.Tensor]], list[torch.Tensor]]:
        """One step for every tensor of the weight space, computed jointly.

        Returns new parameters, new statistics and, per tensor, a 0-d flag that is 0 where the
        gradient held a non-finite value: that tensor's parameters and statistics are left as
        they were (and its features are zeros, so it cannot poison the pooled terms of others).
        """
        cfg = self.config.features
        n = len(params)
        if isinstance(spec, MonomialSpec) and not self.config.sign_flips:
            spec = spec.space  # a rule meta-trained without sign flips reads only the permutations
        flips = _flipping(spec)
        lrs = [1.0] * n if lrs is None else lrs
        weight_decays = [0.0] * n if weight_decays is None else weight_decays
        oks = [torch.isfinite(g.sum()).to(g.dtype) for g in grads]  # one read; inf/NaN survive a sum
        grads = [torch.where(ok > 0, g, 0.0) for g, ok in zip(grads, oks)]
        states = [update_statistics(g, s, cfg, ok) for g, s, ok in zip(grads, states, oks)]
        directions = [adam_direction(s, cfg) for s in states]
        feats = [features(p, g, s, u, r, cfg) for p, g, s, (u, r) in zip(params, grads, states, directions)]
        xs = [_odd_features(x, u) if f else x for (x, _, _), (u, _), f in zip(feats, directions, flips)]
        scale = torch.stack([s for _, s, _ in feats])
        context = torch.stack([c for _, _, c in feats])
        out = self.nfn(spec, xs, context, scale)
        alpha, beta, gamma = self.scalars()
        bound, limit = self.config.max_deviation, self.config.max_log_scale
        new_params = []
        for p, (u, _), y, ok, lr, wd, f in zip(params, directions, out, oks, lrs, weight_decays, flips):
            deviation = torch.tanh(y[0] * (beta / bound))
            c = y[1] * torch.sign(u) if f else y[1]
            step = torch.add(u, deviation, alpha=bound) * torch.exp(torch.clamp(gamma * c, -limit, limit))
            rate = (lr * ok) * alpha
            decayed = p * (1 - rate * wd) if wd else p
            new_params.append(torch.addcmul(decayed, -rate, step))
        return new_params, states, oks

    def scalars(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """α, β, γ as 0-d tensors."""
        c = self.config
        return c.alpha * self.log_alpha.exp(), c.beta * self.log_beta.exp(), c.gamma * self.log_gamma.exp()


def _flipping(spec: WeightSpaceSpec | MonomialSpec) -> list[bool]:
    """Per tensor, whether its elements flip sign under the spec's group (read from the layers'
    cached plan, so a step does no work on it)."""
    groups = [p.factor_group for p in plan_for(spec).tensors]
    if "scale" in groups or "both" in groups:
        scaled = [label for label, symmetry in spec.symmetries if symmetry == "scale"]
        raise ValueError(
            f"neuron sets {scaled} admit scalings, to which gradient training is not equivariant; "
            "give the update rule a spec with sign flips only"
        )
    return [g == "sign" for g in groups]


def _odd_features(x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Features of a sign-flipping tensor with sqrt(v) (which does not flip) made to flip, by sign(u)."""
    return torch.cat([x[:-2], (x[-2] * torch.sign(u)).unsqueeze(0), x[-1:]])
