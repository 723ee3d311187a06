"""Neural functional networks: stacks of NF-layers, and an invariant head that pools to a vector.

Both take a plain weight space (permutation symmetry) or a
:class:`~nfopt.weight_space.MonomialSpec` (sign flips and scalings too); for the latter, each
tensor's nonlinearity is one that commutes with the factors its elements are multiplied by.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from typing import Protocol

import torch
from torch import nn

from ..weight_space import KINDS, MonomialSpec, WeightSpaceSpec, as_monomial, sign_scale_invariants
from .layer import Means, NFLayer, Pooled, Terms, apply, per_bucket, stack, unstack
from .plan import BucketPlan, bucket_plan_for, plan_for

ACTIVATIONS = {"relu": torch.relu_, "gelu": nn.functional.gelu, "tanh": torch.tanh_}
"""Applied to fresh layer outputs, which nothing else holds, so in place where torch can."""


EQUIVARIANT_ACTIVATIONS = {"sign": torch.tanh_, "scale": torch.relu_, "both": None}
"""The nonlinearity for a tensor whose elements flip sign (odd), scale (positively homogeneous) or
both (none commutes with every nonzero factor: the identity)."""


def _activation(name: str):
    if name not in ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}; choose one of {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]


class NFN(nn.Module):
    """An equivariant network on weight space: NF-layers with a pointwise nonlinearity between them.

    The context vector (per-tensor invariants) enters the first layer only. ``zero_last`` closes
    the output so that a fresh network maps everything to zero. ``pooled_last=False`` makes the
    last layer per element (no pooled, neighbour or global term): the earlier layers still mix
    information across elements, and an optimizer step saves the pass over every element that
    would average the last layer's input.
    """

    def __init__(
        self,
        in_channels: int,
        hidden_channels: int,
        out_channels: int,
        n_layers: int = 2,
        context_channels: int = 0,
        pooled: bool = True,
        activation: str = "relu",
        zero_last: bool = False,
        pooled_last: bool = True,
    ) -> None:
        super().__init__()
        if n_layers < 1:
            raise ValueError(f"an NFN needs at least one layer, got n_layers={n_layers}")
        widths = [in_channels] + [hidden_channels] * (n_layers - 1) + [out_channels]
        self.layers = nn.ModuleList(
            NFLayer(i, o, context_channels if n == 0 else 0, pooled and (pooled_last or n < n_layers - 1))
            for n, (i, o) in enumerate(zip(widths[:-1], widths[1:]))
        )
        self._act = _activation(activation)
        if zero_last:
            self.layers[-1].zero_()

    def forward(
        self,
        spec: WeightSpaceSpec | MonomialSpec,
        xs: Sequence[torch.Tensor],
        context: torch.Tensor | None = None,
        scale: torch.Tensor | None = None,
    ) -> list[torch.Tensor]:
        """``context`` and ``scale`` go to the first layer (see :meth:`NFLayer.forward`)."""
        _check_features(spec, xs, self.layers[0].in_channels)
        plan = bucket_plan_for(spec)
        return unstack(plan, self.forward_buckets(plan, stack(plan, xs), *per_bucket(plan, context, scale)))

    def forward_buckets(
        self,
        plan: BucketPlan,
        xs: Sequence[torch.Tensor],
        contexts: Sequence[torch.Tensor] | None = None,
        scales: Sequence[torch.Tensor] | None = None,
    ) -> list[torch.Tensor]:
        """The network on features stacked per bucket (see :meth:`NFLayer.forward_buckets`)."""
        acts = self.activations(plan)
        for n, layer in enumerate(self.layers):
            xs = layer.forward_buckets(plan, xs, contexts, scales) if n == 0 else layer.forward_buckets(plan, xs)
            if n < len(self.layers) - 1:
                xs = [x if act is None else act(x) for act, x in zip(acts, xs)]
        return xs

    def forward_in_passes(
        self,
        plan: BucketPlan,
        passes: Sequence[BucketPasses],
        first_means: Sequence[Means],
        contexts: Sequence[torch.Tensor] | None,
        scales: Sequence[torch.Tensor] | None,
    ) -> None:
        """The network pass by pass over every bucket, so that no full-size hidden tensor need exist.

        ``first_means[b]`` holds the means of bucket b's features that the first layer needs;
        each later pooled layer costs one more pass (``passes[b].means``) to average its input,
        once the previous layers' terms of every bucket are known (neighbour terms read other
        buckets); a per-element layer costs none. ``passes[b].finish`` gets every layer's terms
        and consumes the output.
        """
        def stacked(channels: int) -> list[tuple[int, ...]]:
            return [(len(b.members), channels, *b.plan.canonical) for b in plan.buckets]

        first = self.layers[0]
        parts = [first.terms(plan, first_means, stacked(first.in_channels), contexts, scales)]
        for layer in self.layers[1:]:
            means = (
                [p.means([part[b] for part in parts], layer.needed_means(plan, b)) for b, p in enumerate(passes)]
                if layer.pooled else None
            )
            parts.append(layer.terms(plan, means, stacked(layer.in_channels)))
        for b, p in enumerate(passes):
            p.finish([part[b] for part in parts])

    def activations(self, plan: BucketPlan) -> list[Callable[[torch.Tensor], torch.Tensor] | None]:
        """The nonlinearity between layers for each bucket (see :data:`EQUIVARIANT_ACTIVATIONS`)."""
        return [
            self._act if b.plan.factor_group == "none" else EQUIVARIANT_ACTIVATIONS[b.plan.factor_group]
            for b in plan.buckets
        ]


class BucketPasses(Protocol):
    """How :meth:`NFN.forward_in_passes` runs one bucket's per-element work."""

    def means(self, parts: Sequence[Terms], dims: Sequence[tuple[int, ...]]) -> Means:
        """The layers of ``parts`` in turn (each but the network's last followed by its
        nonlinearity), and the means of the result over each of ``dims``."""
        ...

    def finish(self, parts: Sequence[Terms]) -> None:
        """The whole network, its output consumed."""
        ...


class ChunkPasses:
    """A bucket's passes in PyTorch ops over chunks of its rows.

    ``chunks()`` yields ``(rows, x)``: the stacked features (B, C_in, *canonical) at ``rows`` of
    the first canonical axis, the same chunks each time; ``None`` means the whole bucket, whose
    layer outputs are then kept from pass to pass instead of recomputed. ``consume(rows, y)``
    receives the output chunk by chunk.
    """

    def __init__(
        self,
        chunks: Callable[[], Iterable[tuple[slice | None, torch.Tensor]]],
        consume: Callable[[slice | None, torch.Tensor], None],
        activation: Callable[[torch.Tensor], torch.Tensor] | None,
        n_layers: int,
        shape: tuple[int, ...],
    ) -> None:
        """``shape`` is the stacked features' (B, C_in, *canonical)."""
        self._chunks, self._consume, self._act, self._n_layers, self._shape = chunks, consume, activation, n_layers, shape
        self._kept: tuple[int, torch.Tensor] | None = None  # a whole bucket's deepest output so far

    def _through(self, parts: Sequence[Terms], rows: slice | None, x: torch.Tensor) -> torch.Tensor:
        start = 0
        if rows is None and self._kept is not None:
            start, x = self._kept
        for n in range(start, len(parts)):
            x = apply(parts[n], x, rows)
            if n < self._n_layers - 1 and self._act is not None:
                x = self._act(x)
        if rows is None:
            self._kept = (len(parts), x)
        return x

    def means(self, parts: Sequence[Terms], dims: Sequence[tuple[int, ...]]) -> Means:
        acc = ChunkMeans(dims, (self._shape[0], parts[-1].a.shape[-2], *self._shape[2:]))
        for rows, x in self._chunks():
            acc.add(self._through(parts, rows, x), rows)
        return acc

    def finish(self, parts: Sequence[Terms]) -> None:
        for rows, x in self._chunks():
            self._consume(rows, self._through(parts, rows, x))


class ChunkMeans:
    """Means of a bucket's stacked tensor (B, C, *canonical) over given dims, from its chunks
    along the first canonical axis (dim 2): sums over dims that hold that axis, chunks of the rest."""

    def __init__(self, dims: Sequence[tuple[int, ...]], shape: tuple[int, ...]) -> None:
        self._shape = shape
        self._sums: dict[frozenset[int], torch.Tensor] = {}
        self._parts: dict[frozenset[int], list[torch.Tensor]] = {frozenset(d): [] for d in dims if 2 not in d}
        self._summed = {frozenset(d) for d in dims if 2 in d}
        self._means: dict[frozenset[int], torch.Tensor] | None = None

    def add(self, x: torch.Tensor, rows: slice | None) -> None:
        """Take the chunk ``x`` (the whole tensor where ``rows`` is None)."""
        pooled = Pooled(x)  # each mean reduced from a smaller one where it can
        for d in self._summed:
            part = pooled.mean(tuple(d)) * math.prod(x.shape[i] for i in d)
            self._sums[d] = part if d not in self._sums else self._sums[d] + part
        for d, parts in self._parts.items():
            parts.append(pooled.mean(tuple(d)))

    def mean(self, dims: Sequence[int]) -> torch.Tensor:
        key = frozenset(dims)
        if self._means is None:
            means = {d: torch.cat(parts, 2) if len(parts) > 1 else parts[0] for d, parts in self._parts.items()}
            for d, total in self._sums.items():
                means[d] = total / math.prod(self._shape[i] for i in d)
            self._means = means
        return self._means[key]


def _check_features(spec: WeightSpaceSpec | MonomialSpec, xs: Sequence[torch.Tensor], channels: int) -> None:
    """Features are dense real tensors of shape (channels, *shape), one per tensor of the spec."""
    space = as_monomial(spec).space
    space.check_tensors(xs, leading=1, what="feature")
    for i, (x, t) in enumerate(zip(xs, space.tensors)):
        if x.shape[0] != channels:
            raise ValueError(f"feature {t.name or i}: {x.shape[0]} channels, expected {channels}")


class InvariantPool(nn.Module):
    """Invariant summary of weight-space features: per kind, the mean over tensors of each tensor's
    mean, concatenated over kinds (zeros for kinds that are absent). For a monomial spec the
    features are first made sign- and scale-invariant (:func:`sign_scale_invariants`)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.channels = channels

    @property
    def out_features(self) -> int:
        return len(KINDS) * self.channels

    def forward(self, spec: WeightSpaceSpec | MonomialSpec, xs: Sequence[torch.Tensor]) -> torch.Tensor:
        _check_features(spec, xs, self.channels)
        xs = sign_scale_invariants(spec, xs)
        by_kind: list[list[torch.Tensor]] = [[] for _ in KINDS]
        for x, p in zip(xs, plan_for(spec).tensors):
            by_kind[p.kind].append(x.reshape(self.channels, -1).mean(1))
        zero = xs[0].new_zeros(self.channels)
        return torch.cat([torch.stack(m).mean(0) if m else zero for m in by_kind])
