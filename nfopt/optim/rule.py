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

import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from .features import FeatureConfig, adam_direction, context, features, stack_features, update_statistics
from ..weight_space import MonomialSpec, WeightSpaceSpec
from ..nn.plan import Bucket, bucket_plan_for, from_canonical, plan_for, to_canonical
from ..nn.nfn import NFN, ChunkMeans


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
        they were (its gradient reads as zero and its other features come from the held, finite
        statistics, so it cannot poison the pooled terms of others).
        """
        n = len(params)
        if isinstance(spec, MonomialSpec) and not self.config.sign_flips:
            spec = spec.space  # a rule meta-trained without sign flips reads only the permutations
        _check_no_scalings(spec)
        plan = bucket_plan_for(spec)
        lrs = [1.0] * n if lrs is None else lrs
        weight_decays = [0.0] * n if weight_decays is None else weight_decays
        buckets = [
            self._statistics(
                _stack(params, b), _stack(grads, b), {k: _stack([s[k] for s in states], b) for k in _STATS},
                b.plan.factor_group == "sign",
            )
            for b in plan.buckets
        ]
        xs = [to_canonical(x, b.plan, lead=2) for b, (x, *_) in zip(plan.buckets, buckets)]
        ys = self.nfn.forward_buckets(plan, xs, [c for *_, c, _ in buckets], [s for *_, s in buckets])
        new_params: list[torch.Tensor | None] = [None] * n
        new_states: list[dict[str, torch.Tensor] | None] = [None] * n
        new_oks: list[torch.Tensor | None] = [None] * n
        for bucket, y, (_, p, u, stats, ok, _, _) in zip(plan.buckets, ys, buckets):
            m = bucket.members
            y = from_canonical(y, bucket.plan, bucket.shape)
            new = self._step(p, u, y, ok, _per_member([lrs[i] for i in m]), _per_member([weight_decays[i] for i in m]),
                             bucket.plan.factor_group == "sign")
            for j, i in enumerate(m):
                new_params[i], new_oks[i] = new[j], ok[j]
                new_states[i] = {k: v[j] for k, v in stats.items()}
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
    ) -> list[torch.Tensor]:
        """:meth:`forward` for an optimizer step: ``params`` are overwritten with their new values
        and the ``states`` dicts take the new statistics (in new tensors, or written into theirs
        where a bucket goes in chunks); returns the per-tensor finite flags.

        The same math, with large tensors taken in chunks of rows (:data:`CHUNK_ELEMENTS`
        elements) so that no full-size feature or hidden tensor is ever materialised: one pass
        updates the statistics and averages the features, one more per later NF-layer averages
        its input, and the last writes the parameters. Results agree with :meth:`forward` to
        rounding (sums are taken in another order).
        """
        n = len(params)
        if isinstance(spec, MonomialSpec) and not self.config.sign_flips:
            spec = spec.space
        _check_no_scalings(spec)
        plan = bucket_plan_for(spec)
        lrs = [1.0] * n if lrs is None else lrs
        weight_decays = [0.0] * n if weight_decays is None else weight_decays
        cfg = self.config.features
        first = self.nfn.layers[0]
        work, shapes, contexts, scales, firsts = [], [], [], [], []
        whole: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # features and u of buckets taken whole
        for b, bucket in enumerate(plan.buckets):
            p, g = _stack(params, bucket), _stack(grads, bucket)
            state = {k: _stack([s[k] for s in states], bucket) for k in _STATS}
            ok = torch.isfinite(g.reshape(g.shape[0], -1).sum(1)).to(g.dtype)
            if g.device.type != "cpu" or not bool(ok.all()):  # on CPU the check is free and saves a copy
                g = torch.where(_per_member_like(ok, g) > 0, g, 0.0)
            step = state["step"] + ok
            shape = bucket.plan.canonical
            means = ChunkMeans(first.needed_means(plan, b), (len(bucket.members), first.in_channels, *shape))
            sumsq = None
            flips = bucket.plan.factor_group == "sign"
            if _row_chunks(bucket) == [None]:  # whole: new statistics replace the old, features are kept
                state = update_statistics(g, state, cfg, ok)
                u, root_v = adam_direction(state, cfg)
                x = stack_features(p, g, state, u, root_v)
                x = to_canonical(_odd_features(x, u) if flips else x, bucket.plan, lead=2)
                whole[b] = (x, u)
                sumsq = torch.linalg.vecdot(*(x.reshape(x.shape[0], x.shape[1], -1),) * 2)
                means.add(x, None)
            else:  # in chunks of rows, the statistics overwritten in place
                for rows in _row_chunks(bucket):
                    chunk = _rows(state, rows)
                    new = update_statistics(_rows_of(g, rows), {"step": state["step"], **chunk}, cfg, ok)
                    chunk["momenta"].copy_(new["momenta"])
                    chunk["v"].copy_(new["v"])
                    x = self._chunk_features(p, g, state, step, rows, bucket, flips)
                    flat = x.reshape(x.shape[0], x.shape[1], -1)
                    part = torch.linalg.vecdot(flat, flat)
                    sumsq = part if sumsq is None else sumsq + part
                    means.add(x, rows)
                state["step"].copy_(step)
            inv = torch.rsqrt(sumsq / max(math.prod(bucket.shape), 1) + cfg.rms_eps)
            work.append((p, g, state, ok, flips))
            shapes.append(shape)
            contexts.append(context(step, inv, cfg))
            scales.append(inv)
            firsts.append(means)

        def chunks(b: int) -> Iterable[tuple[slice | None, torch.Tensor]]:
            p, g, state, _, flips = work[b]
            if b in whole:
                yield None, whole[b][0]
                return
            for rows in _row_chunks(plan.buckets[b]):
                yield rows, self._chunk_features(p, g, state, state["step"], rows, plan.buckets[b], flips)

        def consume(b: int, rows: slice | None, y: torch.Tensor) -> None:
            bucket, (p, _, state, ok, flips) = plan.buckets[b], work[b]
            m = bucket.members
            if b in whole:
                u = whole[b][1]
            else:
                u, _ = adam_direction({"step": state["step"], **_rows(state, rows)}, cfg)
            y = y.reshape(y.shape[0], y.shape[1], *u.shape[1:]) if rows is not None else from_canonical(y, bucket.plan, bucket.shape)
            target = _rows_of(p, rows)
            target.copy_(self._step(target, u, y, ok, _per_member([lrs[i] for i in m]),
                                    _per_member([weight_decays[i] for i in m]), flips))

        self.nfn.forward_chunked(plan, shapes, chunks, firsts, contexts, scales, consume)
        oks: list[torch.Tensor | None] = [None] * n
        for b, (bucket, (p, _, state, ok, _)) in enumerate(zip(plan.buckets, work)):
            m = bucket.members
            if len(m) > 1:  # stacked copies: write the members back
                torch._foreach_copy_([params[i] for i in m], list(p.unbind(0)))
            for k in _STATS:
                if b in whole:  # new tensors
                    for j, i in enumerate(m):
                        states[i][k] = state[k][j]
                elif len(m) > 1:
                    torch._foreach_copy_([states[i][k] for i in m], list(state[k].unbind(0)))
            for j, i in enumerate(m):
                oks[i] = ok[j]
        return oks  # type: ignore[return-value]

    def _chunk_features(
        self, p: torch.Tensor, g: torch.Tensor, state: dict[str, torch.Tensor], step: torch.Tensor,
        rows: slice | None, bucket: Bucket, flips: bool,
    ) -> torch.Tensor:
        """The stacked features (B, C, *canonical) of a bucket's rows (all of it for None)."""
        cfg = self.config.features
        chunk = {"step": step, **_rows(state, rows)}
        u, root_v = adam_direction(chunk, cfg)
        x = stack_features(_rows_of(p, rows), _rows_of(g, rows), chunk, u, root_v)
        if flips:
            x = _odd_features(x, u)
        if rows is None:
            return to_canonical(x, bucket.plan, lead=2)
        return x.reshape(x.shape[0], x.shape[1], x.shape[2], *bucket.plan.canonical[1:])

    def _statistics(
        self, p: torch.Tensor, g: torch.Tensor, state: dict[str, torch.Tensor], flips: bool
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict[str, torch.Tensor], torch.Tensor, torch.Tensor, torch.Tensor]:
        """For a bucket's stacked params and grads (B, *shape) and statistics: its features,
        params, Adam direction, new statistics, finite flags (B,), context and input scales."""
        cfg = self.config.features
        ok = torch.isfinite(g.reshape(g.shape[0], -1).sum(1)).to(g.dtype)  # one read; inf/NaN survive a sum
        g = torch.where(_per_member_like(ok, g) > 0, g, 0.0)
        state = update_statistics(g, state, cfg, ok)
        u, root_v = adam_direction(state, cfg)
        x, inv, context = features(p, g, state, u, root_v, cfg)
        return (_odd_features(x, u) if flips else x), p, u, state, ok, context, inv

    def _step(
        self, p: torch.Tensor, u: torch.Tensor, y: torch.Tensor, ok: torch.Tensor, lr: float | torch.Tensor | list[float | torch.Tensor],
        wd: float | Sequence[float], flips: bool,
    ) -> torch.Tensor:
        """New params of a bucket from the NFN's output ``y`` (B, 2, *shape): the bounded
        residual on Adam's direction, scaled, with decoupled weight decay."""
        alpha, beta, gamma = self.scalars()
        bound, limit = self.config.max_deviation, self.config.max_log_scale
        deviation = torch.tanh(y[:, 0] * (beta / bound))
        c = y[:, 1] * torch.sign(u) if flips else y[:, 1]
        step = torch.add(u, deviation, alpha=bound) * torch.exp(torch.clamp(gamma * c, -limit, limit))
        lr, wd = _as_member_tensor(lr, p), _as_member_tensor(wd, p)
        rate = (lr * _per_member_like(ok, p)) * alpha
        decayed = p * (1 - rate * wd) if torch.is_tensor(wd) or wd else p
        return torch.addcmul(decayed, -rate, step)

    def scalars(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """α, β, γ as 0-d tensors."""
        c = self.config
        return c.alpha * self.log_alpha.exp(), c.beta * self.log_beta.exp(), c.gamma * self.log_gamma.exp()


_STATS = ("step", "momenta", "v")


CHUNK_ELEMENTS = 1 << 20
"""Elements of a bucket (all members together) that :meth:`LearnedUpdate.step_` takes at once.
A bucket up to this size is taken whole, as fast as :meth:`LearnedUpdate.forward`; a larger one
in chunks of rows, recomputed pass after pass (slower per element, measured 1.5x), so that the
step's temporaries stay near a few dozen bytes times this many elements whatever the model's size."""


def _row_chunks(bucket: Bucket) -> list[slice | None]:
    """Slices of the first axis of a bucket's tensors, or [None] where it is taken whole (no
    labelled axis to slice, or an axis order that puts a fixed axis first)."""
    if bucket.plan.perm is not None or not bucket.plan.neighbours:  # neighbours: one entry per labelled axis
        return [None]
    rows = bucket.shape[0]
    per_row = len(bucket.members) * math.prod(bucket.shape[1:])
    step = max(1, CHUNK_ELEMENTS // max(per_row, 1))
    return [None] if step >= rows else [slice(i, min(i + step, rows)) for i in range(0, rows, step)]


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


def _stack(tensors: Sequence[torch.Tensor], bucket: Bucket) -> torch.Tensor:
    """A bucket's members' tensors stacked (a view for a bucket of one)."""
    m = bucket.members
    return tensors[m[0]].unsqueeze(0) if len(m) == 1 else torch.stack([tensors[i] for i in m])


def _per_member(values: list[float | torch.Tensor]) -> float | torch.Tensor | list[float | torch.Tensor]:
    """One value where every member has the same (no tensor to build on each step), else the list."""
    first = values[0]
    same = all(v is first for v in values) or (
        isinstance(first, float) and all(isinstance(v, float) and v == first for v in values)
    )
    return first if same else values


def _as_member_tensor(values: float | torch.Tensor | list[float | torch.Tensor], like: torch.Tensor) -> float | torch.Tensor:
    """A learning rate or weight decay per member: a scalar for all, or a (B, 1, ...) tensor."""
    if not isinstance(values, list):
        return values
    stacked = torch.stack([torch.as_tensor(v, dtype=like.dtype, device=like.device) for v in values])
    return _per_member_like(stacked, like)


def _per_member_like(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return values.reshape(-1, *([1] * (like.dim() - 1)))


def _odd_features(x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Features (B, C, *shape) of sign-flipping tensors with sqrt(v) (which does not flip) made to
    flip, by sign(u)."""
    return torch.cat([x[:, :-2], (x[:, -2] * torch.sign(u)).unsqueeze(1), x[:, -1:]], 1)
