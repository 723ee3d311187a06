"""The shared-weight NF-layer: one equivariant linear map for every width, depth and kernel size.

Features on a weight space are one tensor per parameter tensor, of shape ``(C, *shape)``. For
each tensor ``t`` of kind ``k`` the layer computes

    Y_t = A_k X_t + sum_S B_{k,S} mean_S(X_t) + sum_a N(a) + G_k g + E_k ctx_t + bias_k

where ``S`` runs over the nonempty subsets of t's labelled axes, ``N(a)`` is the neighbour term
of labelled axis ``a`` (vectors indexed by a's neuron set, pooled from every other tensor axis
with the same set, averaged per relation and mixed by one matrix per relation), ``g`` is the mean
of all per-tensor means, and ``ctx_t`` is an optional per-tensor context vector (an invariant:
step counters, scale statistics). Weights are shared by kind and relations keyed by kinds, so a
layer instance serves any network; means instead of sums keep it width-invariant.

Given a :class:`~nfopt.weight_space.MonomialSpec` instead of a plain weight space, the same layer
is equivariant to the monomial group: a term is kept only where the factors of the elements it
reads match those of the elements it writes (no mean over a sign-flipped or scaled axis, no
broadcast onto one, no constant on a tensor that flips or scales, neighbours of a scaled set only
between axes of the same exponent), so far fewer of the weights act on such a network.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import lru_cache

import torch
from torch import nn

from ..weight_space import KINDS, MonomialSpec, WeightSpaceSpec
from .plan import N_RELATIONS, SUBSET_SLOTS, BucketPlan, Neighbours, bucket_plan_for, from_canonical, to_canonical


class _Pooled:
    """Means of one tensor over sets of axes (keepdim), each reduced from the largest cached one."""

    def __init__(self, x: torch.Tensor) -> None:
        self._cache: dict[frozenset[int], torch.Tensor] = {frozenset(): x}

    def mean(self, dims: Sequence[int]) -> torch.Tensor:
        key = frozenset(dims)
        if key not in self._cache:
            base = max((k for k in self._cache if k <= key), key=len)
            self._cache[key] = self._cache[base].mean(tuple(sorted(key - base)), keepdim=True)
        return self._cache[key]


class NFLayer(nn.Module):
    """Equivariant linear layer on weight-space features, shared across kinds of tensors.

    ``pooled=False`` drops every term that reads other elements (pooled, neighbour and global):
    what is left is a per-element linear map, the ablation that shows what the structure buys.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        context_channels: int = 0,
        pooled: bool = True,
    ) -> None:
        super().__init__()
        if in_channels < 1 or out_channels < 1 or context_channels < 0:
            raise ValueError(
                f"channels must be positive, got in={in_channels}, out={out_channels}, "
                f"context={context_channels}"
            )
        self.in_channels, self.out_channels = in_channels, out_channels
        self.context_channels, self.pooled = context_channels, pooled
        K = len(KINDS)
        self.A = nn.Parameter(torch.empty(K, out_channels, in_channels))
        self.bias = nn.Parameter(torch.zeros(K, out_channels))
        if pooled:
            self.B = nn.Parameter(torch.empty(len(SUBSET_SLOTS), out_channels, in_channels))
            self.N = nn.Parameter(torch.empty(N_RELATIONS, out_channels, in_channels))
            self.G = nn.Parameter(torch.empty(K, out_channels, in_channels))
        if context_channels:
            self.E = nn.Parameter(torch.empty(K, out_channels, context_channels))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Variance-preserving init: the per-element term carries most of the signal."""
        bound = 1.0 / math.sqrt(self.in_channels)
        nn.init.uniform_(self.A, -bound, bound)
        nn.init.zeros_(self.bias)
        for name in ("B", "N", "G"):
            if hasattr(self, name):
                nn.init.uniform_(getattr(self, name), -0.5 * bound, 0.5 * bound)
        if self.context_channels:
            nn.init.uniform_(self.E, -1 / math.sqrt(self.context_channels), 1 / math.sqrt(self.context_channels))

    def zero_(self) -> NFLayer:
        """Make the layer output exactly zero (a residual branch that starts closed)."""
        with torch.no_grad():
            for p in self.parameters():
                p.zero_()
        return self

    def extra_repr(self) -> str:
        return (
            f"in_channels={self.in_channels}, out_channels={self.out_channels}, "
            f"context_channels={self.context_channels}, pooled={self.pooled}"
        )

    def forward(
        self,
        spec: WeightSpaceSpec | MonomialSpec,
        xs: Sequence[torch.Tensor],
        context: torch.Tensor | None = None,
        scale: torch.Tensor | None = None,
    ) -> list[torch.Tensor]:
        """Map features ``xs[t]`` of shape (C_in, *shape_t) to (C_out, *shape_t).

        ``context`` is a (T, context_channels) tensor of per-tensor invariants, or None.
        ``scale`` (T, C_in), if given, multiplies each tensor's input channels; it is folded into
        the weights, which is cheaper than scaling the features (per-tensor normalisation).
        """
        plan = bucket_plan_for(spec)
        return unstack(plan, self.forward_buckets(plan, stack(plan, xs), *per_bucket(plan, context, scale)))

    def forward_buckets(
        self,
        plan: BucketPlan,
        xs: Sequence[torch.Tensor],
        contexts: Sequence[torch.Tensor] | None = None,
        scales: Sequence[torch.Tensor] | None = None,
    ) -> list[torch.Tensor]:
        """The layer on stacked features: ``xs[b]`` is (B, C_in, *canonical shape) of bucket b.

        ``contexts[b]`` (B, context_channels) and ``scales[b]`` (B, C_in) are the members'
        context and input scales. The work per call does not grow with the number of tensors,
        only with the number of buckets (distinct shapes).
        """
        if self.context_channels and contexts is None:
            raise ValueError(f"this layer expects a context of {self.context_channels} channels per tensor")
        buckets = plan.buckets
        pooled = [_Pooled(x) for x in xs] if self.pooled else []
        g = None
        if self.pooled and plan.invariant_rows:
            means = torch.cat([
                _scaled(p.mean(range(2, x.dim())).reshape(x.shape[0], x.shape[1]), scales, b)
                for b, (p, x) in enumerate(zip(pooled, xs))
            ])
            g = means[index(plan.invariant_rows, means.device)].mean(0)
        targets = self._neighbours(plan, xs, pooled, scales) if self.pooled and plan.neighbours else None
        out = []
        for b, (bucket, x) in enumerate(zip(buckets, xs)):
            p, k, s = bucket.plan, bucket.plan.kind, None if scales is None else scales[b]
            n, c_in = x.shape[0], x.shape[1]
            const = None
            if bucket.constant:
                const = self.bias[k].expand(n, -1)
                if self.context_channels:
                    const = const + contexts[b] @ self.E[k].T
                if g is not None:
                    const = const + self.G[k] @ g
            terms: list[torch.Tensor] = []
            if self.pooled:
                for axes, slot in p.subsets:
                    m = pooled[b].mean(tuple(a + 2 for a in axes))
                    w = self.B[slot] if s is None else self.B[slot] * s[:, None, :]
                    terms.append((w @ m.reshape(n, c_in, -1)).reshape(n, -1, *m.shape[2:]))
                for ax, first in enumerate(bucket.targets):
                    if first >= 0:
                        size = p.canonical[ax]
                        shape = [n, self.out_channels] + [1] * (x.dim() - 2)
                        shape[ax + 2] = size
                        terms.append(targets[first : first + n * size].reshape(n, size, -1).transpose(1, 2).reshape(shape))
            a = self.A[k] if s is None else self.A[k] * s[:, None, :]
            out.append(_combine(a, x, const, terms))
        return out

    def _neighbours(
        self, plan: BucketPlan, xs: Sequence[torch.Tensor], pooled: list[_Pooled], scales: Sequence[torch.Tensor] | None
    ) -> torch.Tensor:
        """Every neighbour vector of the weight space, as rows of one (n_targets, C_out) tensor."""
        nb = plan.neighbours
        vectors = []
        for b, (bucket, x) in enumerate(zip(plan.buckets, xs)):
            for ax, first in enumerate(bucket.sources):
                if first >= 0:
                    v = pooled[b].mean(tuple(d for d in range(2, x.dim()) if d != ax + 2))
                    v = v.reshape(x.shape[0], x.shape[1], -1)
                    if scales is not None:
                        v = v * scales[b][:, :, None]
                    vectors.append(v.transpose(1, 2).reshape(-1, x.shape[1]))
        sources = torch.cat(vectors)
        nb = _neighbours_on(nb, sources.device, sources.dtype)
        mixed = torch.einsum("vc,roc->rvo", sources, self.N[index(nb.relations, sources.device)])
        contributions = mixed[nb.relation, nb.src] * nb.weight[:, None]
        return sources.new_zeros(nb.n_targets, self.out_channels).index_add(0, nb.dst, contributions)


def _scaled(means: torch.Tensor, scales: Sequence[torch.Tensor] | None, b: int) -> torch.Tensor:
    return means if scales is None else means * scales[b]


@lru_cache(maxsize=256)
def _neighbours_on(nb: Neighbours, device: torch.device, dtype: torch.dtype) -> Neighbours:
    return nb.to(device, dtype)


def _combine(a: torch.Tensor, x: torch.Tensor, const: torch.Tensor | None, terms: list[torch.Tensor]) -> torch.Tensor:
    """A·x + const + broadcast terms of a bucket, folding small terms into larger ones before the
    full-size adds. ``a`` is (C_out, C_in) or per member (B, C_out, C_in)."""
    acc: list[torch.Tensor] = []
    for term in sorted(terms, key=lambda t: -t.numel()):
        for i, big in enumerate(acc):
            if all(s == 1 or s == b for s, b in zip(term.shape, big.shape)):
                acc[i] = big + term
                break
        else:
            acc.append(term)
    n, flat = x.shape[0], x.reshape(x.shape[0], x.shape[1], -1)
    if a.dim() == 2:
        a = a.expand(n, -1, -1)
    y = torch.bmm(a, flat) if const is None else torch.baddbmm(const.unsqueeze(-1), a, flat)
    y = y.reshape(n, a.shape[1], *x.shape[2:])
    for term in acc:
        y.add_(term)
    return y


@lru_cache(maxsize=1024)
def _index(values: tuple[int, ...], device: torch.device) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.long, device=device)


def index(values: Sequence[int], device: torch.device) -> torch.Tensor:
    """A small index tensor made once per device, not on every step."""
    return _index(tuple(values), device)


def stack(plan: BucketPlan, xs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Per-tensor features (C, *shape) stacked per bucket into (B, C, *canonical shape)."""
    out = []
    for bucket in plan.buckets:
        m = bucket.members
        x = xs[m[0]].unsqueeze(0) if len(m) == 1 else torch.stack([xs[i] for i in m])
        out.append(to_canonical(x, bucket.plan, lead=2))
    return out


def unstack(plan: BucketPlan, ys: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Inverse of :func:`stack`: a list of (C, *shape) in the weight space's tensor order."""
    out: list[torch.Tensor | None] = [None] * len(plan.order)
    for bucket, y in zip(plan.buckets, ys):
        for i, t in zip(bucket.members, from_canonical(y, bucket.plan, bucket.shape).unbind(0)):
            out[i] = t
    return out  # type: ignore[return-value]


def per_bucket(
    plan: BucketPlan, *values: torch.Tensor | None
) -> list[list[torch.Tensor] | None]:
    """Per-tensor rows (T, ...) of each value split into per-bucket (B, ...) tensors."""
    return [
        None if v is None else [v[index(bucket.members, v.device)] for bucket in plan.buckets]
        for v in values
    ]
