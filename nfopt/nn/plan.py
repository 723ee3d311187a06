"""The plan of a weight space: everything an NF-layer needs to know about it, computed once.

For each tensor: its kind (which NF-layer weights apply), the axis order that brings it to the
canonical layout (labelled axes first, fixed axes merged), the pooled subsets it takes, and for
each labelled axis the neighbour relations it reads from other tensors on the same neuron set.
For a :class:`~nfopt.weight_space.MonomialSpec` only the terms whose factors match at both ends
are kept. Plans are cached per spec, so a step of the optimizer does no Python work on them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import torch

from ..weight_space import AXIS_TYPES, KINDS, MonomialSpec, TensorSpec, WeightSpaceSpec, as_monomial

KIND_INDEX = {k: i for i, k in enumerate(KINDS)}
SUBSET_SLOTS = {(k, s): i for i, (k, s) in enumerate((k, s) for k in KINDS for s in k.subsets())}
AXIS_TYPE_INDEX = {t: i for i, t in enumerate(AXIS_TYPES)}
N_RELATIONS = len(AXIS_TYPES) ** 2


@dataclass(frozen=True)
class TensorPlan:
    """How one tensor is brought to canonical layout and which weights apply to it."""

    kind: int  # the tensor's kind, as an index into KINDS: which of a layer's weights apply
    perm: tuple[int, ...] | None  # axis order (after the channel axis) that puts labelled axes first
    canonical: tuple[int, ...]
    subsets: tuple[tuple[tuple[int, ...], int], ...]  # (canonical axes pooled, B slot)
    # per labelled canonical axis: ((relation index, ((tensor, canonical axis), ...)), ...)
    neighbours: tuple[tuple[tuple[int, tuple[tuple[int, int], ...]], ...], ...]
    factor_group: str  # what multiplies the elements: "none", "sign", "scale" or "both"


@dataclass(frozen=True)
class Plan:
    """A weight space as the NF-layer reads it: a plan per tensor and what the pooled terms share."""

    tensors: tuple[TensorPlan, ...]
    pooled_axes: tuple[tuple[int, int], ...]  # every (tensor, canonical axis) some neighbour reads
    invariant: tuple[int, ...]  # tensors whose means are invariants: they feed the global term
    constants: bool  # whether every tensor takes the per-tensor constant terms (bias, context, global)
    constant_mask: tuple[float, ...]  # per tensor, 1.0 where it takes them (its factors are trivial)


def _axis_order(t: TensorSpec) -> tuple[int, ...] | None:
    order = t.labelled_axes + t.fixed_axes
    return None if order == tuple(range(len(t.shape))) else order


@lru_cache(maxsize=256)
def plan_for(spec: WeightSpaceSpec | MonomialSpec) -> Plan:
    """Everything about a weight space that the layer needs, computed once per spec."""
    mono = as_monomial(spec)
    space = mono.space
    moving = {label for label, _ in mono.symmetries}
    canon_axis: dict[tuple[int, int], int] = {}
    for ti, t in enumerate(space.tensors):
        for ci, ax in enumerate(t.labelled_axes):
            canon_axis[(ti, ax)] = ci

    def still(ti: int, axes: Sequence[int]) -> bool:
        """Whether these labelled axes of tensor ti only permute (so means over them are equivariant)."""
        return all(space.tensors[ti].axes[ax] not in moving for ax in axes)

    def others_still(ti: int, ax: int) -> bool:
        return still(ti, [a for a in space.tensors[ti].labelled_axes if a != ax])

    plans = []
    pooled: set[tuple[int, int]] = set()
    for ti, t in enumerate(space.tensors):
        kind = t.kind
        neighbours = []
        for ci, ax in enumerate(t.labelled_axes):
            own_type = AXIS_TYPE_INDEX[(kind, ci)]
            label = t.axes[ax]
            groups: dict[int, list[tuple[int, int]]] = {}
            for tj, axj in space.set_members[label]:
                if (tj, axj) == (ti, ax) or not (others_still(ti, ax) and others_still(tj, axj)):
                    continue
                if mono.symmetry(label) == "scale" and mono.exponents[ti][ax] != mono.exponents[tj][axj]:
                    continue
                cj = canon_axis[(tj, axj)]
                other_type = AXIS_TYPE_INDEX[(space.tensors[tj].kind, cj)]
                groups.setdefault(own_type * len(AXIS_TYPES) + other_type, []).append((tj, cj))
                pooled.add((tj, cj))
            neighbours.append(tuple((r, tuple(m)) for r, m in sorted(groups.items())))
        plans.append(
            TensorPlan(
                kind=KIND_INDEX[kind],
                perm=_axis_order(t),
                canonical=t.canonical_shape(),
                subsets=tuple(
                    (s, SUBSET_SLOTS[(kind, s)])
                    for s in kind.subsets()
                    if still(ti, [t.labelled_axes[c] for c in s])
                ),
                neighbours=tuple(neighbours),
                factor_group=mono.factor_group(ti),
            )
        )
    invariant = tuple(i for i, p in enumerate(plans) if p.factor_group == "none")
    mask = tuple(float(i in invariant) for i in range(len(plans)))
    return Plan(tuple(plans), tuple(sorted(pooled)), invariant, len(invariant) == len(plans), mask)


@dataclass(frozen=True)
class Bucket:
    """Tensors that one batched computation serves: same shape, axis order, kind and terms.

    Their features are stacked to ``(B, C, *shape)``; ``plan`` (the first member's) holds for all.
    ``sources`` and ``targets`` name, per canonical axis, the first row of the bucket's pooled and
    neighbour vectors in :class:`Neighbours`' flat buffers (``-1`` where no member needs them).
    """

    members: tuple[int, ...]
    shape: tuple[int, ...]
    plan: TensorPlan
    constant: bool  # whether the members take the per-tensor constant terms
    sources: tuple[int, ...]
    targets: tuple[int, ...]
    components: tuple[int, ...] | None = None  # each member's weight space, in a batch of spaces


@dataclass(frozen=True, eq=False)  # holds tensors: equal only to itself
class Neighbours:
    """Every neighbour term of a weight space as one gather-and-scatter over neuron vectors.

    Pooled vectors of all buckets' source axes are stacked into ``n_sources`` rows (one row per
    neuron of each member tensor's axis); neighbour vectors of all target axes into ``n_targets``
    rows. Pair ``i`` adds ``weight[i]`` times row ``rows[i]`` of the table of sources mixed by
    every present relation (row ``source·len(relations) + relation``) to row ``dst[i]``: the mean
    over a relation's member axes, mixed by that relation's matrix.
    """

    n_sources: int
    n_targets: int
    relations: tuple[int, ...]  # relation ids present
    rows: torch.Tensor  # (P,)
    dst: torch.Tensor  # (P,)
    weight: torch.Tensor  # (P,)

    def to(self, device: torch.device, dtype: torch.dtype) -> Neighbours:
        """The indices on ``device`` and the weights in ``dtype``."""
        return dataclasses.replace(
            self, rows=self.rows.to(device), dst=self.dst.to(device), weight=self.weight.to(device=device, dtype=dtype)
        )


@dataclass(frozen=True, eq=False)
class BucketPlan:
    """A weight space grouped into buckets, with the indices the batched layer needs."""

    buckets: tuple[Bucket, ...]
    order: tuple[int, ...]  # tensor indices in bucket order
    invariant_rows: tuple[int, ...]  # rows (in bucket order) of tensors that feed the global term
    neighbours: Neighbours | None
    invariant_components: tuple[int, ...] | None = None  # in a batch of spaces: each row's space
    component_counts: tuple[float, ...] | None = None  # invariant rows per space (at least 1)


@lru_cache(maxsize=256)
def bucket_plan_for(spec: WeightSpaceSpec | MonomialSpec) -> BucketPlan:
    """Group a weight space's tensors into buckets and index their neighbour terms, once per spec."""
    plan = plan_for(spec)
    space = as_monomial(spec).space
    groups: dict[tuple, list[int]] = {}
    for ti, (t, p) in enumerate(zip(space.tensors, plan.tensors)):
        key = (t.shape, p.kind, p.perm, p.subsets, p.factor_group, tuple(bool(n) for n in p.neighbours))
        groups.setdefault(key, []).append(ti)
    members = [tuple(m) for m in groups.values()]
    order = tuple(ti for m in members for ti in m)
    where = {ti: (b, i) for b, m in enumerate(members) for i, ti in enumerate(m)}
    pooled = set(plan.pooled_axes)
    n_sources = n_targets = 0
    source_rows: dict[tuple[int, int], int] = {}
    buckets = []
    for b, m in enumerate(members):
        p = plan.tensors[m[0]]
        sources, targets = [], []
        for ax, size in enumerate(p.canonical[: len(p.neighbours)]):
            if any((ti, ax) in pooled for ti in m):
                source_rows[(b, ax)] = n_sources
                sources.append(n_sources)
                n_sources += len(m) * size
            else:
                sources.append(-1)
            if p.neighbours[ax]:
                targets.append(n_targets)
                n_targets += len(m) * size
            else:
                targets.append(-1)
        components = None if space.components is None else tuple(space.components[ti] for ti in m)
        buckets.append(
            Bucket(m, space.tensors[m[0]].shape, p, p.factor_group == "none", tuple(sources), tuple(targets), components)
        )
    neighbours = None
    if n_targets:
        relations = sorted({r for p in plan.tensors for axis in p.neighbours for r, _ in axis})
        local = {r: i for i, r in enumerate(relations)}
        rel, src, dst, weight = [], [], [], []
        for bucket in buckets:
            for i, ti in enumerate(bucket.members):
                for ax, axis in enumerate(plan.tensors[ti].neighbours):
                    size = bucket.plan.canonical[ax]
                    for r, tensor_axes in axis:
                        for tj, cj in tensor_axes:
                            bj, j = where[tj]
                            first = source_rows[(bj, cj)] + j * size
                            rel += [local[r]] * size
                            src += range(first, first + size)
                            dst += range(bucket.targets[ax] + i * size, bucket.targets[ax] + (i + 1) * size)
                            weight += [1.0 / len(tensor_axes)] * size
        rows = [s * len(relations) + r for s, r in zip(src, rel)]
        neighbours = Neighbours(
            n_sources, n_targets, tuple(relations), torch.tensor(rows), torch.tensor(dst),
            torch.tensor(weight, dtype=torch.float64),
        )
    invariant = set(plan.invariant)
    rows = tuple(row for row, ti in enumerate(order) if ti in invariant)
    if space.components is None:
        return BucketPlan(tuple(buckets), order, rows, neighbours)
    row_components = tuple(space.components[order[row]] for row in rows)
    counts = tuple(float(max(row_components.count(c), 1)) for c in range(max(space.components) + 1))
    return BucketPlan(tuple(buckets), order, rows, neighbours, row_components, counts)


def to_canonical(x: torch.Tensor, p: TensorPlan, lead: int = 1) -> torch.Tensor:
    """(*lead axes, *shape) -> (*lead axes, *canonical shape): channels (and a batch) stay first."""
    if p.perm is not None:
        x = x.permute(*range(lead), *(a + lead for a in p.perm))
    return x.reshape(*x.shape[:lead], *p.canonical)


def from_canonical(y: torch.Tensor, p: TensorPlan, shape: tuple[int, ...]) -> torch.Tensor:
    """Inverse of :func:`to_canonical`, given the tensor's own ``shape``."""
    lead = y.dim() - len(p.canonical)
    if p.perm is None:
        return y.reshape(*y.shape[:lead], *shape)
    y = y.reshape(*y.shape[:lead], *(shape[a] for a in p.perm))
    inverse = sorted(range(len(p.perm)), key=lambda i: p.perm[i])
    return y.permute(*range(lead), *(i + lead for i in inverse))


@lru_cache(maxsize=64)
def _cached_constant(values: tuple[float, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return torch.tensor(values, dtype=dtype, device=device)


def constant(values: Sequence[float], like: torch.Tensor) -> torch.Tensor:
    """A small constant tensor made once per dtype and device, not on every step."""
    return _cached_constant(tuple(values), like.dtype, like.device)
