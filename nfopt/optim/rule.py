"""The learned update rule: features -> NFN -> a residual on Adam's step.

    Δ = -lr · α · (u_adam + G·B·tanh(β·d / B)) · exp(G·clamp(γ·c, ±L)),   G = g·s

d and c are the NFN's two output channels, α, β, γ meta-learned positive scalars, each stored as
the log of its ratio to the config's initial value (so that a fresh rule's α is the configured
learning rate exactly, in any dtype).
The NFN's last layer starts at zero, so a fresh rule is exactly Adam with learning rate α and
meta-training moves away from Adam only where that helps. B (``max_deviation``) and L
(``max_log_scale``) bound how far one step may stray from Adam's, per element: far from the
meta-training distribution the rule stays a bounded perturbation of Adam.

g is a per-element gate on the learned part (``gate_floor`` F; without one, F = 0, g = 1):

    g = e / (e + F·ref),   e = sqrt(v̂ + ε) - sqrt(ε),   ref = sqrt(mean of (v̂ + ε) over the component)

with v̂ Adam's bias-corrected second moment after this step's update and ε = SQRT_FLOOR (1e-30),
so that e is sqrt(v̂) with a finite derivative at 0 and exactly 0 where v̂ is, and ref > 0. The
mean is over every element of every tensor of the weight space (of its component, in a batch of
spaces): invariant to permutations and sign flips. Where the gradient history is zero, v̂ = 0 gives
u_adam = 0 and g = 0, so Δ = 0 (whatever the NFN says); where the gradients are at rounding-noise
level relative to the rest of the model (r = sqrt(v̂)/ref tiny), g ≈ r/F and the step is Adam's
to within that fraction.

s is a second per-element factor, from the gradient's signal-to-noise ratio (``snr_gate`` κ;
without one, κ = 0, s = 1):

    s = q / (q + κ²),   q = ρ²,   ρ = |m̂| / (sqrt(v̂ + ε) + eps)

with m̂ the last momentum (of ``momentum_decays[-1]``, the slowest: 0.99 by default)
bias-corrected, v̂ and ε as above and eps Adam's. Under gradients that are pure noise the slow
momentum averages them away (ρ ≈ sqrt((1 - d)/(1 + d)) ≈ 0.07 for d = 0.99), so with κ ≈ 0.25 the
learned part is damped about 13-fold and the step is nearly Adam's; under a consistent gradient
ρ → 1 and s → 1/(1 + κ²). But at step t the momentum has averaged only about t gradients: at step 1
ρ = 1 for any gradient, and noise's ρ² is n_t = (1 - d)(1 + d^t)/((1 + d)(1 - d^t)) on average
(about 1/t early on), so that the first tens of steps of pure noise pass the learned part nearly
whole. A margin K (``snr_margin``) takes the noise's share out:

    q = max(ρ² - K·n_t, 0) / (1 - n_t)

an estimate of the gradient's signal fraction μ²/(μ² + σ²) (with K = 1, unbiased where ρ² is),
0 at step 1 (n_1 = 1) and, for K > 1, 0 unless ρ² exceeds K times what noise gives: under pure
noise ρ²/n_t is about χ² with one degree of freedom, above 8 for one element-step in 200. A
consistent gradient (ρ² = 1) opens the gate once n_t < 1/K. q is 0 where m is, so s = 0 where the
gradient history is zero, with finite derivatives; ρ does not change under permutations or sign
flips of the weights.

A per-tensor step size (``tensor_log_scale`` T; without one, T = 0 and the factor is 1)
multiplies each tensor's rate lr·α (of its whole step, and of its weight decay), outside the
per-element gate, so that a tensor can be stepped at up to e^T times α where its gradients carry
signal:

    rate_T = lr·α·exp(T·(min(a, 0) + S·max(a, 0))),   a = tanh(h(z))

h a small MLP (its last layer starting at zero: a fresh rule steps as without it) of per-tensor
invariants z: the log-ratio of the RMS of each momentum (bias-corrected) to the RMS of sqrt(v̂)
and the log-RMS of Adam's direction (scale-free: ratios of gradient statistics), and the context
(time features, log-RMS of the parameter). Its inputs are moving averages, so the step size moves
as slowly as they do. Increases are gated by the tensor's own signal-to-noise ratio,
S = q/(q + κ²), q = max((c·RMS(m)/RMS(sqrt(v̂)))² - b, 0) with m the last momentum and c, b those
of the per-element gate (:func:`~nfopt.optim.features.snr_scales`; S = 1 without ``snr_gate``):
under pure noise the RMS ratio is the noise's share, below the margin, so q = 0 and a tensor's
step may shrink but not grow beyond Adam's; decreases are not gated. The RMS here are exact, without
the features' floor ``rms_eps`` inside the square root: at rounding-noise level (a conv bias before
BatchNorm) the slow momentum's mean square falls below the floor first, and a floored ratio would
read that as signal. Mean squares are recovered from the floored ones to within the floor's
rounding, so the ratio's denominator has a floor of its own, ``TENSOR_SNR_FLOOR``·rms_eps, far
below any gradient's but above that rounding. Zero gradient history gives q = 0 and a zero step
(u = 0, and the gate closes). RMS ratios do not change under permutations or
sign flips.

This module is the functional core
shared by :class:`~nfopt.optim.NFNOptimizer` (under no_grad) and meta-training (differentiated
through unrolls).

Given a :class:`~nfopt.weight_space.MonomialSpec` whose sets flip signs (hidden neurons of tanh
networks), a rule configured with ``sign_flips`` is also equivariant to those flips, as Adam is: the features that do not flip
with the weights (sqrt(v)) are multiplied by sign(u) and the step-size channel c by sign(u)
again, so that d flips with the weights and exp(γ·c) does not. Scalings are refused: gradient
training is not equivariant to them.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from functools import lru_cache
from typing import Any, NamedTuple

import torch
from torch import nn

from .features import (
    SQRT_FLOOR, STATISTICS, FeatureConfig, adam_direction, context, features, per_member, polar_factor,
    snr_scales, stack_features, update_statistics,
)
from ..weight_space import MonomialSpec, WeightSpaceSpec
from ..nn.plan import Bucket, BucketPlan, bucket_plan_for, constant, from_canonical, plan_for, to_canonical
from ..nn.nfn import NFN, ChunkMeans, ChunkPasses
from ..nn.layer import index
from .blocks import Blocks
from .fused import FusedPasses, FusedStep, library as fused_library


@lru_cache(maxsize=256)
def _split(spec: WeightSpaceSpec | MonomialSpec) -> WeightSpaceSpec | MonomialSpec:
    """The space a rule reads for a space with blocked tensors (made once per space)."""
    return spec.split_blocks()


OPTIONAL = ("gate_floor", "snr_gate", "snr_margin", "tensor_log_scale")
"""The config's options that are off at 0 and left out of its dict there."""

TENSOR_SNR_FLOOR = 1e-4  # of rms_eps: the per-tensor gate's floor on the mean square of sqrt(v̂)


@dataclass(frozen=True)
class UpdateConfig:
    """The shape of a learned update rule: enough to rebuild it before loading its weights."""

    features: FeatureConfig = FeatureConfig()
    hidden_channels: int = 8
    n_layers: int = 2
    pooled: bool = True
    pooled_last: bool = True  # False: the last NF-layer per element, one pass fewer per step
    activation: str = "relu"
    alpha: float = 1e-3
    beta: float = 1.0
    gamma: float = 0.1
    max_deviation: float = 3.0
    max_log_scale: float = 2.0
    sign_flips: bool = False  # equivariant to sign flips of hidden neurons that admit them (tanh)
    gate_floor: float = 0.0  # > 0: the learned part gated per element by g = r/(r + gate_floor) (see above)
    snr_gate: float = 0.0  # κ > 0: the gate times s = q/(q + κ²), q = ρ², ρ the gradient's signal-to-noise ratio (see above)
    snr_margin: float = 0.0  # K > 0: q = (ρ² - K·n_t)/(1 - n_t), less the noise's share n_t of ρ² (see above)
    tensor_log_scale: float = 0.0  # T > 0: a learned per-tensor step factor within exp(±T) (see above)

    def __post_init__(self) -> None:
        if isinstance(self.features, dict):
            object.__setattr__(self, "features", FeatureConfig.from_dict(self.features))
        if min(self.alpha, self.beta, self.gamma, self.max_deviation, self.max_log_scale) <= 0:
            raise ValueError(
                f"alpha, beta, gamma, max_deviation and max_log_scale must be positive, got {self.alpha}, "
                f"{self.beta}, {self.gamma}, {self.max_deviation}, {self.max_log_scale}"
            )
        for name in OPTIONAL:
            value = float(getattr(self, name))
            object.__setattr__(self, name, value)
            if not value >= 0 or not math.isfinite(value):
                raise ValueError(f"{name} must be finite and at least 0, got {value}")
        if self.snr_margin and not self.snr_gate:
            raise ValueError(f"snr_margin {self.snr_margin} needs a signal-to-noise gate (snr_gate > 0)")

    def to_dict(self) -> dict[str, Any]:
        """The fields as a dict; without ``gate_floor``, ``snr_gate``, ``snr_margin`` or
        ``tensor_log_scale`` where it is 0 (that part off), so that a rule without it is written, and
        fingerprinted, as it was before the option existed (and earlier nfopt versions still read its files)."""
        d = asdict(self)
        for name in OPTIONAL:
            if not d[name]:
                del d[name]
        return d


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
            pooled_last=config.pooled_last,
        )
        if config.tensor_log_scale:
            inputs = len(f.momentum_decays) + 1 + f.context_channels
            self.tensor_head = nn.Sequential(
                nn.Linear(inputs, config.hidden_channels), nn.ReLU(), nn.Linear(config.hidden_channels, 1)
            )
            nn.init.zeros_(self.tensor_head[-1].weight)
            nn.init.zeros_(self.tensor_head[-1].bias)
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
        they were (its gradient reads as zero and its other features come from the held, finite
        statistics, so it cannot poison the pooled terms of others). A blocked tensor
        (:mod:`~nfopt.optim.blocks`) is read as its blocks; each block is held alone.
        """
        blocks = Blocks.of(spec)
        if blocks is not None:
            lrs, weight_decays = (None if r is None else blocks.repeat(r) for r in (lrs, weight_decays))
            new_params, new_states, oks = self(
                _split(spec), blocks.split(params), blocks.split(grads), blocks.split_states(states), lrs, weight_decays
            )
            return blocks.join(new_params), blocks.join_states(new_states), [torch.stack(g).min() for g in blocks.groups(oks)]
        plan, lrs, weight_decays = self._plan(spec, len(params), lrs, weight_decays)
        buckets = [self._statistics(b, *_stacked(b, params, grads, states)) for b in plan.buckets]
        xs = [to_canonical(s.x, b.plan, lead=2) for b, s in zip(plan.buckets, buckets)]
        ys = self.nfn.forward_buckets(plan, xs, [s.context for s in buckets], [s.scale for s in buckets])
        new_params: list[torch.Tensor | None] = [None] * len(params)
        new_states: list[dict[str, torch.Tensor] | None] = [None] * len(params)
        new_oks: list[torch.Tensor | None] = [None] * len(params)
        floors = self._gate_floors(plan, [s.root_sq for s in buckets])
        for bucket, y, s, floor in zip(plan.buckets, ys, buckets, floors):
            m = bucket.members
            y = from_canonical(y, bucket.plan, bucket.shape)
            gate = self._gates(s.state["momenta"], s.state["step"], s.root_v, floor)
            new = self._step(
                s.p, s.u, y, s.ok, [lrs[i] for i in m], [weight_decays[i] for i in m], _flips(bucket), gate,
                self.tensor_scales(s.scale, s.context, s.state["step"]),
            )
            for j, i in enumerate(m):
                new_params[i], new_oks[i] = new[j], s.ok[j]
                new_states[i] = {k: v[j] for k, v in s.state.items()}
        return new_params, new_states, new_oks  # type: ignore[return-value]

    @torch.no_grad()
    def step_(
        self,
        spec: WeightSpaceSpec | MonomialSpec,
        params: Sequence[torch.Tensor],
        grads: Sequence[torch.Tensor],
        states: Sequence[dict[str, torch.Tensor]],
        lrs: Sequence[float] | None = None,
        weight_decays: Sequence[float] | None = None,
    ) -> torch.Tensor:
        """:meth:`forward` for an optimizer step: ``params`` are overwritten with their new values
        and the ``states`` dicts take the new statistics (written into their tensors, or new
        tensors for small buckets of the PyTorch path); returns the finite flags of the tensors,
        in their order (N,).

        The same math, pass by pass over the elements, so that no full-size feature or hidden
        tensor need exist: one pass updates the statistics and averages the features, one more
        per later NF-layer averages its input, and the last writes the parameters. On the CPU a
        compiled loop runs each pass (:mod:`nfopt.optim.fused`); elsewhere PyTorch ops do, whole
        for small buckets and in chunks of rows (:data:`CHUNK_ELEMENTS`) for large ones. Results
        agree with :meth:`forward` to rounding (sums are taken in another order). A blocked
        tensor's blocks are stepped as views of it and its statistics (its ``step`` holds one
        count per block).
        """
        blocks = Blocks.of(spec)
        if blocks is not None:
            blocks.count_per_block_(states)
            parts = blocks.split_states(states)
            views = [dict(part) for part in parts]
            lrs, weight_decays = (None if r is None else blocks.repeat(r) for r in (lrs, weight_decays))
            ok = self.step_(_split(spec), blocks.split(params), blocks.split(grads), parts, lrs, weight_decays)
            for part, view in zip(parts, views):  # statistics the PyTorch path returned as new tensors
                for k in STATISTICS:
                    if part[k] is not view[k]:
                        view[k].copy_(part[k])
            return blocks.join_flags(ok)
        plan, lrs, weight_decays = self._plan(spec, len(params), lrs, weight_decays)
        first = self.nfn.layers[0]
        widths = [first.in_channels] + [layer.out_channels for layer in self.nfn.layers]
        momenta = len(self.config.features.momentum_decays)
        scalars = None  # for the compiled loop, as numbers (reading them waits for the device)
        passes: list[_EagerPasses | FusedPasses] = []
        looped: dict[torch.dtype, list[int]] = {}  # the buckets the loop takes, by dtype
        for b, (bucket, act) in enumerate(zip(plan.buckets, self.nfn.activations(plan))):
            m = bucket.members
            members = ([params[i] for i in m], [grads[i] for i in m], [states[i] for i in m])
            rates = ([lrs[i] for i in m], [weight_decays[i] for i in m])
            dtype = params[m[0]].dtype
            looping = not self.config.features.polar and FusedPasses.accepts(bucket, *members, widths, momenta, act)
            entry = fused_library(dtype) if looping else None
            if entry is not None:
                if scalars is None:
                    alpha, beta, gamma = self.scalars()
                    scalars = (alpha, float(beta / self.config.max_deviation), float(gamma))
                passes.append(FusedPasses(entry, self, scalars, bucket, *members, *rates, widths, act))
                looped.setdefault(dtype, []).append(b)
            else:
                passes.append(_EagerPasses(self, bucket, *members, *rates, act))
        stats = {}  # bucket -> its first pass's means, context and scales
        for buckets in looped.values():
            done = FusedStep([passes[b] for b in buckets]).statistics([first.needed_means(plan, b) for b in buckets])
            stats.update(zip(buckets, done))
        for b, p in enumerate(passes):
            if b not in stats:
                stats[b] = p.statistics(first.needed_means(plan, b))
        firsts, contexts, scales = (list(column) for column in zip(*(stats[b] for b in range(len(passes)))))
        if self.config.gate_floor:
            for p, floor in zip(passes, self._gate_floors(plan, [p.root_sums for p in passes])):
                p.set_gate(floor)
        if self.config.tensor_log_scale:
            for p, ctx in zip(passes, contexts):
                p.scale_rates(self.tensor_scales(p.inverse_rms, ctx, p.steps))
        self.nfn.forward_in_passes(plan, passes, firsts, contexts, scales)
        for p in passes:
            p.write_back()
        return torch.cat([p.ok for p in passes])[index(_tensor_order(plan), params[0].device)]

    def _plan(
        self, spec: WeightSpaceSpec | MonomialSpec, n: int, lrs: Sequence[float] | None, weight_decays: Sequence[float] | None
    ) -> tuple[BucketPlan, Sequence[float], Sequence[float]]:
        """The buckets of the space this rule reads, and the per-tensor rates with their defaults."""
        if isinstance(spec, MonomialSpec) and not self.config.sign_flips:
            spec = spec.space  # a rule meta-trained without sign flips reads only the permutations
        _check_no_scalings(spec)
        return bucket_plan_for(spec), [1.0] * n if lrs is None else lrs, [0.0] * n if weight_decays is None else weight_decays

    def _statistics(
        self, bucket: Bucket, p: torch.Tensor, g: torch.Tensor, state: dict[str, torch.Tensor]
    ) -> _BucketStep:
        """A bucket's step before the NFN, from its stacked params and grads (B, *shape) and
        statistics: features, new statistics, Adam direction, finite flags, context and scales."""
        cfg = self.config.features
        g, ok = _finite(g)
        state = update_statistics(g, state, cfg, ok)
        u, root_v = adam_direction(state, cfg)
        x, inv, context_ = features(p, g, state, u, root_v, cfg)
        x = _odd_features(x, u) if _flips(bucket) else x
        root_sq = _square_sums(root_v) if self.config.gate_floor else None
        return _BucketStep(x, p, g, u, state, ok, context_, inv, root_v, root_sq)

    def _gate_floors(self, plan: BucketPlan, root_sums: Sequence[torch.Tensor | None]) -> list[torch.Tensor | None]:
        """Per bucket, its members' F·ref (B,) for the gate (see the module's docstring), from each
        member's sum of v̂ + ε over its elements (``root_sums[b]``: (B,)); Nones without a gate."""
        if not self.config.gate_floor:
            return [None] * len(root_sums)
        components, counts = _components(plan)
        dtype = root_sums[0].dtype
        for r in root_sums[1:]:
            dtype = torch.promote_types(dtype, r.dtype)
        sums = torch.cat([r.to(dtype=dtype, device=root_sums[0].device) for r in root_sums])
        count = constant(counts, sums)
        if components is None:
            floors = (self.config.gate_floor * torch.sqrt(sums.sum() / count[0])).expand(len(sums))
        else:
            at = index(components, sums.device)
            totals = sums.new_zeros(len(counts)).index_add(0, at, sums)
            floors = (self.config.gate_floor * torch.sqrt(totals / count))[at]
        return list(floors.split([len(b.members) for b in plan.buckets]))

    def _gates(
        self, momenta: torch.Tensor, step: torch.Tensor, root_v: torch.Tensor, floor: torch.Tensor | None
    ) -> torch.Tensor | None:
        """The gate G = g·s (B, *shape) on the learned part from the momenta (B, M, *shape), the
        step counts (B,) after this update, sqrt(v̂ + ε) (B, *shape) and the members' F·ref (B,)
        (None without ``gate_floor``): g of :func:`_gate` where F > 0, s of :func:`_snr` where
        κ > 0; None where neither is (no gate, no work)."""
        gate = None if floor is None else _gate(root_v, floor)
        kappa = self.config.snr_gate
        if kappa:
            c, b = snr_scales(step, self.config.features, self.config.snr_margin)
            s = _snr(momenta[:, -1], c, b, root_v, kappa, self.config.features.eps)
            gate = s if gate is None else gate * s
        return gate

    def tensor_scales(self, inv: torch.Tensor, context_: torch.Tensor, step: torch.Tensor) -> torch.Tensor | None:
        """The members' per-tensor step factors (B,) (see the module's docstring) from the inverse
        RMS of their features (B, C), their context (B, context_channels) and their step counts
        after this update (B,); None without ``tensor_log_scale``."""
        limit = self.config.tensor_log_scale
        if not limit:
            return None
        f = self.config.features
        momenta = len(f.momentum_decays)
        log_inv = torch.log(inv)
        t = step.to(inv.dtype).clamp(min=1)[:, None]
        corrections = torch.log1p(-constant(f.momentum_decays, inv) ** t)  # the momenta's bias corrections
        root = log_inv[:, -2:-1]  # the channel of sqrt(v̂); the last is Adam's direction
        z = torch.cat([root - log_inv[:, 2 : 2 + momenta] - corrections, -log_inv[:, -1:], context_.to(inv.dtype)], 1)
        weight = self.tensor_head[0].weight
        a = torch.tanh(self.tensor_head(z.to(weight.dtype))).squeeze(1).to(inv.dtype)
        up = a.clamp(min=0)
        kappa = self.config.snr_gate
        if kappa:
            c, b = snr_scales(step.to(inv.dtype), f, self.config.snr_margin)
            eps = f.rms_eps  # mean squares without the floor: c²·MS(m)/MS(sqrt(v̂)), m the last momentum
            ms_m, ms_root = (torch.relu(inv[:, i] ** -2 - eps) for i in (1 + momenta, -2))
            q = torch.relu(c * c * ms_m / (ms_root + TENSOR_SNR_FLOOR * eps) - b)
            up = up * (q / (q + max(kappa * kappa, torch.finfo(q.dtype).tiny)))
        return torch.exp(limit * (a.clamp(max=0) + up))

    def _step(
        self, p: torch.Tensor, u: torch.Tensor, y: torch.Tensor, ok: torch.Tensor,
        lrs: list[float | torch.Tensor], weight_decays: list[float | torch.Tensor], flips: bool,
        gate: torch.Tensor | None = None, scales: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """New params of a bucket from the NFN's output ``y`` (B, 2, *shape): the bounded
        residual on Adam's direction, gated per element by ``gate`` (B, *shape) where there is
        one, scaled (per member by ``scales`` (B,) where given), with decoupled weight decay at
        the members' rates."""
        alpha, beta, gamma = self.scalars()
        bound, limit = self.config.max_deviation, self.config.max_log_scale
        deviation = torch.tanh(y[:, 0] * (beta / bound))
        c = y[:, 1] * torch.sign(u) if flips else y[:, 1]
        log_scale = torch.clamp(gamma * c, -limit, limit)
        if gate is not None:
            deviation, log_scale = deviation * gate, log_scale * gate
        step = torch.add(u, deviation, alpha=bound) * torch.exp(log_scale)
        lr, wd = _member_values(lrs, p), _member_values(weight_decays, p)
        rate = (lr * per_member(ok, p)) * alpha
        if scales is not None:
            rate = rate * per_member(scales, p)
        decayed = p * (1 - rate * wd) if torch.is_tensor(wd) or wd else p
        return torch.addcmul(decayed, -rate, step)

    def scalars(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """α, β, γ as 0-d tensors."""
        c = self.config
        return c.alpha * self.log_alpha.exp(), c.beta * self.log_beta.exp(), c.gamma * self.log_gamma.exp()


class _BucketStep(NamedTuple):
    """What a bucket's step computes before the NFN; ``x`` and ``u`` are None for a bucket taken
    in chunks, whose features are recomputed chunk by chunk."""

    x: torch.Tensor | None  # features (B, C, *shape), or canonical in the in-place step
    p: torch.Tensor
    g: torch.Tensor  # finite: zero for members whose gradient was not
    u: torch.Tensor | None
    state: dict[str, torch.Tensor]  # the new statistics
    ok: torch.Tensor  # (B,) 1 where the gradient was finite
    context: torch.Tensor
    scale: torch.Tensor  # (B, C) inverse RMS of the features
    root_v: torch.Tensor | None = None  # sqrt(v̂ + ε) (B, *shape), None in chunks
    root_sq: torch.Tensor | None = None  # (B,) its sums of squares, with a gate


class _EagerPasses(ChunkPasses):
    """A bucket's in-place step in PyTorch ops (any device and dtype): whole where it is small,
    else in chunks of rows whose features are recomputed pass after pass, the statistics
    overwritten in place."""

    def __init__(
        self, rule: LearnedUpdate, bucket: Bucket, params: list[torch.Tensor], grads: list[torch.Tensor],
        states: list[dict[str, torch.Tensor]], lrs: list[float | torch.Tensor], weight_decays: list[float | torch.Tensor],
        activation: Callable[[torch.Tensor], torch.Tensor] | None,
    ) -> None:
        first = rule.nfn.layers[0]
        shape = (len(bucket.members), first.in_channels, *bucket.plan.canonical)
        super().__init__(self._chunks_of, self._consume_rows, activation, len(rule.nfn.layers), shape)
        self.rule, self.bucket, self.params, self.states = rule, bucket, params, states
        self.lrs, self.weight_decays = lrs, weight_decays
        self.work: _BucketStep | None = None
        self.floor: torch.Tensor | None = None  # the members' F·ref of the gate, where there is one
        self.scales: torch.Tensor | None = None  # the members' per-tensor step factors, where there are
        self._stacked = _stacked_members(params, grads, states)
        self._polar: torch.Tensor | None = None  # the whole polar-factor channel, in chunks (with ``polar``)

    @property
    def ok(self) -> torch.Tensor:
        return self.work.ok

    @property
    def root_sums(self) -> torch.Tensor:
        """(B,) each member's sum of v̂ + ε over its elements (with a gate, after the first pass)."""
        return self.work.root_sq

    def set_gate(self, floor: torch.Tensor) -> None:
        """The members' F·ref (B,) that the last pass gates the learned part with."""
        self.floor = floor

    @property
    def inverse_rms(self) -> torch.Tensor:
        """(B, C) the inverse RMS of the members' features (after the first pass)."""
        return self.work.scale

    @property
    def steps(self) -> torch.Tensor:
        """(B,) the members' step counts after this update (after the first pass)."""
        return self.work.state["step"]

    def scale_rates(self, scales: torch.Tensor) -> None:
        """The members' per-tensor step factors (B,) that the last pass scales their steps by."""
        self.scales = scales

    def statistics(self, dims: Sequence[tuple[int, ...]]) -> tuple[ChunkMeans, torch.Tensor, torch.Tensor]:
        """Update the statistics; the means over ``dims`` of the features, the context and scales."""
        means = ChunkMeans(dims, self._shape)
        if _row_chunks(self.bucket, CHUNK_ELEMENTS) == (None,):  # whole: as forward, its features kept
            s = self.rule._statistics(self.bucket, *self._stacked)
            s = s._replace(x=to_canonical(s.x, self.bucket.plan, lead=2))
            means.add(s.x, None)
        else:
            s = self._chunked_statistics(*self._stacked, means)
        self.work = s
        return means, s.context, s.scale

    def _chunked_statistics(
        self, p: torch.Tensor, g: torch.Tensor, state: dict[str, torch.Tensor], means: ChunkMeans
    ) -> _BucketStep:
        """:meth:`LearnedUpdate._statistics` row chunk by row chunk: the statistics are written in
        place, the features only averaged into ``means`` (later passes recompute them), so ``x``
        and ``u`` are left None."""
        cfg = self.rule.config.features
        g, ok = _finite(g)
        step = state["step"] + ok
        sumsq = root_sq = None
        gated = bool(self.rule.config.gate_floor)
        chunks = _row_chunks(self.bucket, CHUNK_ELEMENTS)
        for rows in chunks:
            chunk = _rows(state, rows)
            new = update_statistics(_rows_of(g, rows), {"step": state["step"], **chunk}, cfg, ok)
            chunk["momenta"].copy_(new["momenta"])
            chunk["v"].copy_(new["v"])
        self.work = _BucketStep(None, p, g, None, {**state, "step": step}, ok, None, None)
        if cfg.polar:  # of the whole momentum, which every row's features read
            self._polar = polar_factor(state["momenta"][:, cfg.adam_momentum], cfg.rms_eps)
        for rows in chunks:
            x, root_v = self._features_and_root(rows)
            part = torch.linalg.vecdot(*(x.reshape(x.shape[0], x.shape[1], -1),) * 2)
            sumsq = part if sumsq is None else sumsq + part
            if gated:
                part = _square_sums(root_v)
                root_sq = part if root_sq is None else root_sq + part
            means.add(x, rows)
        state["step"].copy_(step)
        inv = torch.rsqrt(sumsq / max(math.prod(self.bucket.shape), 1) + cfg.rms_eps)
        return _BucketStep(None, p, g, None, state, ok, context(step, inv, cfg), inv, None, root_sq)

    def _features(self, rows: slice) -> torch.Tensor:
        """The stacked features (B, C, rows, *canonical[1:]) of a chunked bucket's rows."""
        return self._features_and_root(rows)[0]

    def _features_and_root(self, rows: slice) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`_features`, and sqrt(v̂ + ε) of the rows (B, rows, *shape[1:])."""
        s = self.work
        chunk = {"step": s.state["step"], **_rows(s.state, rows)}
        u, root_v = adam_direction(chunk, self.rule.config.features)
        polar = None if self._polar is None else _rows_of(self._polar, rows)
        x = stack_features(_rows_of(s.p, rows), _rows_of(s.g, rows), chunk, u, root_v, polar)
        if _flips(self.bucket):
            x = _odd_features(x, u)
        return x.reshape(x.shape[0], x.shape[1], x.shape[2], *self.bucket.plan.canonical[1:]), root_v

    def _chunks_of(self) -> Iterable[tuple[slice | None, torch.Tensor]]:
        if self.work.x is not None:
            yield None, self.work.x
            return
        for rows in _row_chunks(self.bucket, CHUNK_ELEMENTS):
            yield rows, self._features(rows)

    def _consume_rows(self, rows: slice | None, y: torch.Tensor) -> None:
        s, bucket = self.work, self.bucket
        chunk = _rows(s.state, rows)
        if s.u is not None:
            u, root_v, y = s.u, s.root_v, from_canonical(y, bucket.plan, bucket.shape)
        else:
            u, root_v = adam_direction({"step": s.state["step"], **chunk}, self.rule.config.features)
            y = y.reshape(y.shape[0], y.shape[1], *u.shape[1:])
        gate = self.rule._gates(chunk["momenta"], s.state["step"], root_v, self.floor)
        target = _rows_of(s.p, rows)
        target.copy_(self.rule._step(target, u, y, s.ok, self.lrs, self.weight_decays, _flips(bucket), gate, self.scales))

    def write_back(self) -> None:
        """Stacked copies written back into the members' own tensors."""
        s, n = self.work, len(self.params)
        if n > 1:
            torch._foreach_copy_(self.params, list(s.p.unbind(0)))
        for k in STATISTICS:
            if s.x is not None:  # new tensors
                for j, state in enumerate(self.states):
                    state[k] = s.state[k][j]
            elif n > 1:
                torch._foreach_copy_([state[k] for state in self.states], list(s.state[k].unbind(0)))


CHUNK_ELEMENTS = 1 << 20
"""Elements of a bucket (all members together) that :meth:`LearnedUpdate.step_` takes at once.
A bucket up to this size is taken whole, as fast as :meth:`LearnedUpdate.forward`; a larger one
in chunks of rows whose features are recomputed pass after pass (slower per element), so that the
step's temporaries stay near a few dozen bytes times this many elements whatever the model's size."""


@lru_cache(maxsize=1024)
def _row_chunks(bucket: Bucket, chunk_elements: int) -> tuple[slice | None, ...]:
    """Slices of the first axis of a bucket's tensors, or (None,) where it is taken whole (small,
    no labelled axis to slice, or an axis order that puts a fixed axis first); made once."""
    if bucket.plan.perm is not None or not bucket.plan.neighbours:  # neighbours: one entry per labelled axis
        return (None,)
    rows = bucket.shape[0]
    per_row = len(bucket.members) * math.prod(bucket.shape[1:])
    step = max(1, chunk_elements // max(per_row, 1))
    return (None,) if step >= rows else tuple(slice(i, min(i + step, rows)) for i in range(0, rows, step))


def _rows_of(t: torch.Tensor, rows: slice | None) -> torch.Tensor:
    """Rows of a stacked (B, *shape) tensor's first own axis."""
    return t if rows is None else t[:, rows]


def _rows(state: dict[str, torch.Tensor], rows: slice | None) -> dict[str, torch.Tensor]:
    """The momenta and second moment of a bucket's rows, as views."""
    if rows is None:
        return {"momenta": state["momenta"], "v": state["v"]}
    return {"momenta": state["momenta"][:, :, rows], "v": state["v"][:, rows]}


def _check_no_scalings(spec: WeightSpaceSpec | MonomialSpec) -> None:
    """Refuse scaling symmetries (read from the layers' cached plan, so a step does no work)."""
    groups = {p.factor_group for p in plan_for(spec).tensors}
    if "scale" in groups or "both" in groups:
        scaled = [label for label, symmetry in spec.symmetries if symmetry == "scale"]
        raise ValueError(
            f"neuron sets {scaled} admit scalings, to which gradient training is not equivariant; "
            "give the update rule a spec with sign flips only"
        )


def _stacked(
    bucket: Bucket, params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor], states: Sequence[dict[str, torch.Tensor]]
) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """A bucket's params, grads and statistics stacked over its members (views for a bucket of one)."""
    m = bucket.members
    return _stacked_members([params[i] for i in m], [grads[i] for i in m], [states[i] for i in m])


def _stacked_members(
    params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor], states: Sequence[dict[str, torch.Tensor]]
) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    def stack(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
        return tensors[0].unsqueeze(0) if len(tensors) == 1 else torch.stack(list(tensors))

    return stack(params), stack(grads), {k: stack([s[k] for s in states]) for k in STATISTICS}


READ_AT_ONCE = {"cpu"}
"""Devices whose tensors the step may read on the host (elsewhere a read waits for the device,
so the step reads nothing there)."""


def reads_at_once(device: torch.device) -> bool:
    """Whether the step may read values of tensors on ``device`` on the host (see :data:`READ_AT_ONCE`)."""
    return device.type in READ_AT_ONCE


def _finite(g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Stacked gradients with non-finite members zeroed, and the flags (B,) of the finite ones.

    One read finds them (inf and NaN survive a sum). Where asking costs no wait (see
    :func:`reads_at_once`), the zeroing copy is made only when some member needs it.
    """
    ok = torch.isfinite(g.reshape(g.shape[0], -1).sum(1)).to(g.dtype)
    if not reads_at_once(g.device) or not bool(ok.all()):
        g = torch.where(per_member(ok, g) > 0, g, 0.0)
    return g, ok


@lru_cache(maxsize=256)
def _tensor_order(plan: BucketPlan) -> tuple[int, ...]:
    """Each tensor's position in bucket order (``plan.order`` inverted)."""
    at = [0] * len(plan.order)
    for position, i in enumerate(plan.order):
        at[i] = position
    return tuple(at)


def _flips(bucket: Bucket) -> bool:
    return bucket.plan.factor_group == "sign"


def _member_values(values: list[float | torch.Tensor], like: torch.Tensor) -> float | torch.Tensor:
    """A learning rate or weight decay of a bucket's members: the one value where all share it (no
    tensor to build on each step), else a (B, 1, ...) tensor."""
    first = values[0]
    if all(v is first for v in values) or (isinstance(first, float) and all(isinstance(v, float) and v == first for v in values)):
        return first
    return per_member(torch.stack([torch.as_tensor(v, dtype=like.dtype, device=like.device) for v in values]), like)


def _square_sums(root_v: torch.Tensor) -> torch.Tensor:
    """Each member's sum of squares (B,) of a stacked (B, *shape) tensor."""
    flat = root_v.reshape(root_v.shape[0], -1)
    return torch.linalg.vecdot(flat, flat)


def _gate(root_v: torch.Tensor, floor: torch.Tensor) -> torch.Tensor:
    """The gate g = e / (e + F·ref) (B, *shape) of the learned part, from sqrt(v̂ + ε) (B, *shape)
    and the members' F·ref (B,), at least the dtype's smallest normal number; e = sqrt(v̂ + ε) -
    sqrt(ε) is exactly 0 where v̂ is (the same rounded square root of ε on both sides)."""
    e = root_v - torch.sqrt(constant([SQRT_FLOOR], root_v))
    floor = floor.to(root_v.dtype).clamp(min=torch.finfo(root_v.dtype).tiny)  # > 0 even where F·ref underflows
    return e / (e + per_member(floor, e))


def _snr(
    momentum: torch.Tensor, c: torch.Tensor, b: torch.Tensor, root_v: torch.Tensor, kappa: float, eps: float
) -> torch.Tensor:
    """The signal-to-noise factor s = q/(q + κ²) (B, *shape) of the gate, q = max(ρ² - b, 0) with
    ρ = c·m/(sqrt(v̂ + ε) + eps), from the last momentum ``momentum`` (B, *shape) and the members'
    c and b (B,) of :func:`~nfopt.optim.features.snr_scales`. ρ² is a square, so q has a
    derivative everywhere but at ρ² = b > 0, and is 0 where m is (then s = 0); κ² is kept at least
    the dtype's smallest normal number, so that s is never 0/0."""
    rho = momentum * per_member(c, momentum) / (root_v + eps)
    q = torch.relu(rho * rho - per_member(b, momentum))
    return q / (q + max(kappa * kappa, torch.finfo(rho.dtype).tiny))


@lru_cache(maxsize=256)
def _components(plan: BucketPlan) -> tuple[tuple[int, ...] | None, tuple[float, ...]]:
    """Each member's component in bucket order (None: one space) and the elements of each
    component (at least 1), for the gate's per-component mean."""
    if all(b.components is None for b in plan.buckets):
        return None, (float(max(sum(len(b.members) * math.prod(b.shape) for b in plan.buckets), 1)),)
    rows = tuple(c for b in plan.buckets for c in b.components)
    counts = [0] * (max(rows) + 1)
    for b in plan.buckets:
        for c in b.components:
            counts[c] += math.prod(b.shape)
    return rows, tuple(float(max(n, 1)) for n in counts)


def _odd_features(x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Features (B, C, *shape) of sign-flipping tensors with sqrt(v) (which does not flip) made to
    flip, by sign(u)."""
    return torch.cat([x[:, :-2], (x[:, -2] * torch.sign(u)).unsqueeze(1), x[:, -1:]], 1)
