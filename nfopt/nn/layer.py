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

import torch
from torch import nn

from ..weight_space import KINDS, MonomialSpec, WeightSpaceSpec
from .plan import N_RELATIONS, SUBSET_SLOTS, constant, from_canonical, plan_for, to_canonical


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


def _mix(w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Channel mixing of a (C_in, *rest) tensor by a (C_out, C_in) matrix."""
    return (w @ x.reshape(x.shape[0], -1)).reshape(w.shape[0], *x.shape[1:])


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
        plan = plan_for(spec)
        xc = [to_canonical(x, p) for x, p in zip(xs, plan.tensors)]
        kinds = [p.kind for p in plan.tensors]
        # Per-tensor constant terms: bias, context, global mean.
        const = self.bias[kinds]  # (T, C_out)
        if self.context_channels:
            if context is None:
                raise ValueError(f"this layer expects a context of {self.context_channels} channels per tensor")
            const = const + torch.einsum("toc,tc->to", self.E[kinds], context)
        if self.pooled:
            pooled = [_Pooled(x) for x in xc]
            if plan.invariant:
                means = torch.stack([pooled[i].mean(tuple(range(1, xc[i].dim()))).reshape(-1) for i in plan.invariant])
                if scale is not None:
                    means = means * (scale if plan.constants else torch.stack([scale[i] for i in plan.invariant]))
                const = const + torch.einsum("toc,c->to", self.G[kinds], means.mean(0))
            vectors = {}
            for ti, ax in plan.pooled_axes:
                x = xc[ti]
                v = pooled[ti].mean(tuple(d for d in range(1, x.dim()) if d != ax + 1)).reshape(x.shape[0], -1)
                vectors[(ti, ax)] = v if scale is None else v * scale[ti, :, None]
        if not plan.constants:
            const = const * constant(plan.constant_mask, const)[:, None]
        out = []
        for ti, (x, p) in enumerate(zip(xc, plan.tensors)):
            s = None if scale is None else scale[ti]
            terms: list[torch.Tensor] = []
            if self.pooled:
                for axes, slot in p.subsets:
                    b = self.B[slot] if s is None else self.B[slot] * s
                    terms.append(_mix(b, pooled[ti].mean(tuple(a + 1 for a in axes))))
                for ax, relations in enumerate(p.neighbours):
                    nb = None
                    for r, members in relations:
                        v = vectors[members[0]] if len(members) == 1 else torch.stack(
                            [vectors[m] for m in members]
                        ).mean(0)
                        term = self.N[r] @ v
                        nb = term if nb is None else nb + term
                    if nb is not None:
                        shape = [1] * x.dim()
                        shape[0], shape[ax + 1] = nb.shape
                        terms.append(nb.reshape(shape))
            a = self.A[p.kind] if s is None else self.A[p.kind] * s
            y = self._combine(a, x, const[ti], terms)
            out.append(from_canonical(y, p, tuple(xs[ti].shape[1:])))
        return out

    @staticmethod
    def _combine(
        a: torch.Tensor, x: torch.Tensor, const: torch.Tensor, terms: list[torch.Tensor]
    ) -> torch.Tensor:
        """A·x + const + broadcast terms, folding small terms into larger ones before the full add."""
        acc: list[torch.Tensor] = []
        for term in sorted(terms, key=lambda t: -t.numel()):
            for i, big in enumerate(acc):
                if all(s == 1 or s == b for s, b in zip(term.shape, big.shape)):
                    acc[i] = big + term
                    break
            else:
                acc.append(term)
        y = torch.addmm(const.unsqueeze(1), a, x.reshape(x.shape[0], -1)).reshape(a.shape[0], *x.shape[1:])
        for term in acc:
            y.add_(term)
        return y
