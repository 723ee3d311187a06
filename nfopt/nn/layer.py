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
from dataclasses import dataclass
from functools import lru_cache
from typing import Protocol

import torch
from torch import nn

from ..weight_space import KINDS, MonomialSpec, WeightSpaceSpec
from .plan import N_RELATIONS, SUBSET_SLOTS, BucketPlan, Neighbours, bucket_plan_for, constant, from_canonical, to_canonical


class Means(Protocol):
    """Where a layer reads the means of a bucket's features: ``mean(dims)`` with keepdim."""

    def mean(self, dims: Sequence[int]) -> torch.Tensor: ...


class Pooled:
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
        pooled = [Pooled(x) for x in xs] if self.pooled else None
        parts = self.terms(plan, pooled, [x.shape for x in xs], contexts, scales)
        return [apply(part, x) for part, x in zip(parts, xs)]

    def needed_means(self, plan: BucketPlan, b: int) -> list[tuple[int, ...]]:
        """The dims of bucket b's stacked features (B, C, *canonical) that :meth:`terms` averages over."""
        if not self.pooled:
            return []
        bucket = plan.buckets[b]
        ndim = 2 + len(bucket.plan.canonical)
        dims = [tuple(a + 2 for a in axes) for axes, _ in bucket.plan.subsets]
        dims += [tuple(d for d in range(2, ndim) if d != ax + 2) for ax, first in enumerate(bucket.sources) if first >= 0]
        if plan.invariant_rows:
            dims.append(tuple(range(2, ndim)))
        return dims

    def terms(
        self,
        plan: BucketPlan,
        pooled: Sequence[Means] | None,
        shapes: Sequence[torch.Size],
        contexts: Sequence[torch.Tensor] | None = None,
        scales: Sequence[torch.Tensor] | None = None,
    ) -> list[Terms]:
        """Everything but the per-element channel mixing, per bucket, from the means of its
        features (``pooled[b].mean(dims)`` for the dims of :meth:`needed_means`): the mixing
        matrix (scaled per member), the per-member constant and the broadcast terms.

        ``scales[b]`` None means that bucket b's means are of features already scaled, and its
        mixing matrix is left for the caller to scale."""
        if self.context_channels and contexts is None:
            raise ValueError(f"this layer expects a context of {self.context_channels} channels per tensor")
        pooled = pooled if self.pooled else None
        g = None
        if pooled is not None and plan.invariant_rows:
            means = torch.cat([
                _scaled(p.mean(tuple(range(2, len(shape)))).reshape(shape[0], shape[1]), scales, b)
                for b, (p, shape) in enumerate(zip(pooled, shapes))
            ])
            rows = means[index(plan.invariant_rows, means.device)]
            if plan.invariant_components is None:
                g = rows.mean(0)
            else:  # a batch of weight spaces: each pools its own tensors
                sums = rows.new_zeros(len(plan.component_counts), rows.shape[1])
                g = sums.index_add(0, index(plan.invariant_components, rows.device), rows)
                g = g / constant(plan.component_counts, rows)[:, None]
        targets = self._neighbours(plan, pooled, shapes, scales) if pooled is not None and plan.neighbours else None
        out = []
        # each weight of a kind or slot taken apart once (one op), not indexed per bucket
        A, bias, B = self.A.unbind(0), self.bias.unbind(0), self.B.unbind(0) if pooled is not None else None
        E = self.E.unbind(0) if self.context_channels else None
        G = self.G.unbind(0) if g is not None else None
        shared: dict[int, torch.Tensor] = {}  # a kind's constant where it is one for the whole space
        for b, (bucket, shape) in enumerate(zip(plan.buckets, shapes)):
            p, k = bucket.plan, bucket.plan.kind
            s = None if scales is None or scales[b] is None else scales[b][:, None, :]  # (B, 1, C_in)
            n, c_in = shape[0], shape[1]
            const = None
            if bucket.constant:
                if g is not None and g.dim() == 1:
                    if k not in shared:
                        shared[k] = torch.addmv(bias[k], G[k], g)
                    const = shared[k].expand(n, -1)
                else:
                    const = bias[k].expand(n, -1)
                    if g is not None:
                        const = const + g[index(bucket.components, g.device)] @ G[k].T
                if self.context_channels:
                    const = torch.addmm(const, contexts[b], E[k].T)
            terms: list[torch.Tensor] = []
            if pooled is not None:
                for axes, slot in p.subsets:
                    m = pooled[b].mean(tuple(a + 2 for a in axes))
                    w = B[slot].expand(n, -1, -1) if s is None else B[slot] * s
                    # bmm, not @: matmul of batched operands dispatches several views around it;
                    # the constant joins the first product (no full-size pass of its own)
                    kept, m = m.shape[2:], m.reshape(n, c_in, -1)
                    if const is None:
                        y = torch.bmm(w, m)
                    else:
                        y, const = torch.baddbmm(const.unsqueeze(-1), w, m), None
                    terms.append(y.view(n, -1, *kept))
                for ax, first in enumerate(bucket.targets):
                    if first >= 0:
                        size = p.canonical[ax]
                        view = [n, self.out_channels] + [1] * (len(shape) - 2)
                        view[ax + 2] = size
                        terms.append(targets[first : first + n * size].reshape(n, size, -1).transpose(1, 2).reshape(view))
            a = A[k] if s is None else A[k] * s
            folded = _fold(terms)
            if const is not None and folded:  # the constant joins a broadcast term: no full-size pass of its own
                folded[0] = folded[0] + const.reshape(n, -1, *[1] * (len(shape) - 2))
                const = None
            out.append(Terms(a, const, folded))
        return out

    def _neighbours(
        self, plan: BucketPlan, pooled: Sequence[Means], shapes: Sequence[torch.Size], scales: Sequence[torch.Tensor] | None
    ) -> torch.Tensor:
        """Every neighbour vector of the weight space, as rows of one (n_targets, C_out) tensor."""
        nb = plan.neighbours
        vectors = []
        for b, (bucket, shape) in enumerate(zip(plan.buckets, shapes)):
            for ax, first in enumerate(bucket.sources):
                if first >= 0:
                    v = pooled[b].mean(tuple(d for d in range(2, len(shape)) if d != ax + 2))
                    v = v.reshape(shape[0], shape[1], -1)
                    if scales is not None and scales[b] is not None:
                        v = v * scales[b][:, :, None]
                    vectors.append(v.transpose(1, 2).reshape(-1, shape[1]))
        sources = torch.cat(vectors)
        nb = _neighbours_on(nb, sources.device, sources.dtype)
        weights = self.N[index(nb.relations, sources.device)]  # (R, C_out, C_in)
        mixed = sources @ weights.permute(2, 0, 1).reshape(weights.shape[2], -1)  # (V, R·C_out): one product
        # one flat row index: index_select's backward is an index_add, cheaper than advanced indexing's
        contributions = mixed.reshape(-1, self.out_channels).index_select(0, nb.rows) * nb.weight[:, None]
        return sources.new_zeros(nb.n_targets, self.out_channels).index_add(0, nb.dst, contributions)


def _scaled(means: torch.Tensor, scales: Sequence[torch.Tensor | None] | None, b: int) -> torch.Tensor:
    return means if scales is None or scales[b] is None else means * scales[b]


@lru_cache(maxsize=256)
def _neighbours_on(nb: Neighbours, device: torch.device, dtype: torch.dtype) -> Neighbours:
    return nb.to(device, dtype)


@dataclass(frozen=True)
class Terms:
    """A layer's map for one bucket once its pooled statistics are known: y = a·x + const + terms."""

    a: torch.Tensor  # (C_out, C_in), or per member (B, C_out, C_in)
    const: torch.Tensor | None  # (B, C_out)
    terms: list[torch.Tensor]  # broadcast against (B, C_out, *canonical), at most a few


def _fold(terms: list[torch.Tensor]) -> list[torch.Tensor]:
    """Broadcast terms summed at their small sizes: each smaller term joins a larger one it fits."""
    acc: list[torch.Tensor] = []
    for term in sorted(terms, key=lambda t: -t.numel()):
        for i, big in enumerate(acc):
            if all(s == 1 or s == b for s, b in zip(term.shape, big.shape)):
                acc[i] = big + term
                break
        else:
            acc.append(term)
    return acc


def apply(part: Terms, x: torch.Tensor, rows: slice | None = None) -> torch.Tensor:
    """A layer's output for stacked features ``x`` (B, C_in, *canonical), or for the chunk of them
    at ``rows`` of the first canonical axis (the broadcast terms are sliced to match)."""
    n, flat = x.shape[0], x.reshape(x.shape[0], x.shape[1], -1)
    a = part.a
    if n == 1:  # a plain matrix product is cheaper, and so is its backward
        a = a.reshape(a.shape[-2], a.shape[-1])
        y = torch.mm(a, flat[0]) if part.const is None else torch.addmm(part.const.reshape(-1, 1), a, flat[0])
    else:
        a = a.expand(n, -1, -1) if a.dim() == 2 else a
        y = torch.bmm(a, flat) if part.const is None else torch.baddbmm(part.const.unsqueeze(-1), a, flat)
    y = y.reshape(n, a.shape[-2], *x.shape[2:])
    for term in part.terms:
        y.add_(term if rows is None or term.shape[2] == 1 else term[:, :, rows])
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
