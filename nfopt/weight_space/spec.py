"""Weight-space structure: which axes of which tensors move together under neuron permutations.

A network's parameters are tensors. Every axis of every tensor carries a label: the name of a
*neuron set* (the axis is indexed by the neurons of that set) or ``None`` for a *fixed* axis
(conv kernel offsets, whose order means something). A group element is one permutation per
neuron set; it permutes every axis labelled with that set. A labelling is correct for a model
when every permutation it allows leaves the model's function unchanged.

A tensor's first axis may hold several *blocks* of its set's neurons one after another (an
LSTM's four gates, a GRU's three): a permutation of the set permutes each block alike. NF-layers
read such a tensor as its blocks, tensors of their own (:meth:`WeightSpaceSpec.split_blocks`).
"""

from __future__ import annotations

import itertools
from collections.abc import Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property

import torch

Label = Hashable
"""A neuron-set name, or ``None`` for a fixed axis."""

Permutation = Mapping[Label, torch.Tensor]
"""One group element: a permutation (a LongTensor of indices) for every neuron set."""


@dataclass(frozen=True)
class Kind:
    """What tensors share NF-layer weights: how many labelled axes, and whether fixed ones follow.

    Tensors are brought to a canonical layout (labelled axes first, in order, then all fixed axes
    merged into one), so a Linear weight, a conv kernel of any size and a bias each have one kind
    whatever their width, depth or kernel size.
    """

    n_labelled: int
    has_fixed: bool

    def subsets(self) -> tuple[tuple[int, ...], ...]:
        """Nonempty subsets of the labelled axes, the pooled terms of an NF-layer."""
        axes = range(self.n_labelled)
        return tuple(s for r in range(1, self.n_labelled + 1) for s in itertools.combinations(axes, r))


MAX_LABELLED_AXES = 2
KINDS: tuple[Kind, ...] = tuple(
    Kind(n, f) for n in range(MAX_LABELLED_AXES + 1) for f in (False, True)
)
"""Every kind an NF-layer holds weights for."""

AXIS_TYPES: tuple[tuple[Kind, int], ...] = tuple((k, a) for k in KINDS for a in range(k.n_labelled))
"""Every (kind, labelled axis) pair; neighbour relations are keyed by a pair of these."""


@dataclass(frozen=True)
class TensorSpec:
    """The shape of one tensor and the label of each of its axes.

    ``blocks``: how many blocks of its set's neurons the first axis holds, one after another (an
    LSTM's gates: block i of an axis of size 4·n is gate i); 1 for a plain axis.
    """

    shape: tuple[int, ...]
    axes: tuple[Label, ...]
    name: str = ""
    blocks: int = 1

    def __post_init__(self) -> None:
        object.__setattr__(self, "shape", tuple(int(s) for s in self.shape))
        object.__setattr__(self, "axes", tuple(self.axes))
        if isinstance(self.blocks, bool) or not isinstance(self.blocks, int) or self.blocks < 1:
            raise ValueError(f"tensor {self.name or '?'}: blocks must be a positive int, got {self.blocks!r}")
        if self.blocks > 1 and not (self.shape and self.axes and self.axes[0] is not None and self.shape[0] % self.blocks == 0):
            raise ValueError(
                f"tensor {self.name or '?'} of shape {self.shape}: {self.blocks} blocks need a labelled first "
                f"axis whose size they divide"
            )
        if len(self.shape) != len(self.axes):
            raise ValueError(
                f"tensor {self.name or '?'}: {len(self.axes)} axis labels for a tensor of shape "
                f"{self.shape} ({len(self.shape)} axes)"
            )
        if len(self.labelled_axes) > MAX_LABELLED_AXES:
            raise ValueError(
                f"tensor {self.name or '?'} of shape {self.shape}: {len(self.labelled_axes)} "
                f"labelled axes; at most {MAX_LABELLED_AXES} are supported (label the others None)"
            )

    @property
    def labelled_axes(self) -> tuple[int, ...]:
        return tuple(i for i, a in enumerate(self.axes) if a is not None)

    @property
    def fixed_axes(self) -> tuple[int, ...]:
        return tuple(i for i, a in enumerate(self.axes) if a is None)

    @property
    def kind(self) -> Kind:
        self._check_unblocked()
        return Kind(len(self.labelled_axes), bool(self.fixed_axes))

    def set_size(self, axis: int) -> int:
        """The size of the neuron set (or fixed range) that indexes ``axis``: a block's, on a
        blocked first axis."""
        return self.shape[axis] // self.blocks if axis == 0 else self.shape[axis]

    def split(self) -> tuple[TensorSpec, ...]:
        """The tensor's blocks, as tensors of their own (itself when it has one)."""
        if self.blocks == 1:
            return (self,)
        shape = (self.shape[0] // self.blocks, *self.shape[1:])
        return tuple(TensorSpec(shape, self.axes, f"{self.name}[{i}]") for i in range(self.blocks))

    def _check_unblocked(self) -> None:
        if self.blocks > 1:
            raise ValueError(
                f"tensor {self.name or '?'}: its first axis holds {self.blocks} blocks; NF-layers read "
                "the blocks as tensors of their own (WeightSpaceSpec.split_blocks)"
            )

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    @classmethod
    def independent(cls, shape: Sequence[int], name: str) -> TensorSpec:
        """Labels for a tensor nothing is known about: the first two axes sets of their own
        (named after the tensor), the rest fixed.

        Trailing axes of a 3+-D tensor are read as kernel offsets. Fixed axes are handled
        elementwise with shared weights, so an NF-layer stays equivariant to permuting them too.
        """
        return cls(tuple(shape), tuple(f"{name}:{i}" if i < MAX_LABELLED_AXES else None for i in range(len(shape))), name)

    def canonical_shape(self) -> tuple[int, ...]:
        """Shape in the canonical layout of :class:`Kind`."""
        self._check_unblocked()
        out = [self.shape[i] for i in self.labelled_axes]
        if self.fixed_axes:
            fixed = 1
            for i in self.fixed_axes:
                fixed *= self.shape[i]
            out.append(fixed)
        return tuple(out)


@dataclass(frozen=True)
class WeightSpaceSpec:
    """The labelled weight space of a list of tensors (in a fixed order).

    ``components`` (one per tensor, or None for one space) marks tensors of independent weight
    spaces side by side (:meth:`batch`): an NF-layer's global term pools within a component only.
    """

    tensors: tuple[TensorSpec, ...]
    components: tuple[int, ...] | None = None
    set_sizes: dict = field(init=False, compare=False, hash=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "tensors", tuple(self.tensors))
        if self.components is not None:
            object.__setattr__(self, "components", tuple(int(c) for c in self.components))
            if len(self.components) != len(self.tensors):
                raise ValueError(f"{len(self.components)} components for {len(self.tensors)} tensors")
        sizes: dict[Label, int] = {}
        owner: dict[Label, str] = {}
        for idx, t in enumerate(self.tensors):
            if not isinstance(t, TensorSpec):
                raise TypeError(f"tensor {idx}: expected a TensorSpec, got {type(t).__name__}")
            for ax, label in enumerate(t.axes):
                if label is None:
                    continue
                n = t.set_size(ax)
                if label in sizes and sizes[label] != n:
                    raise ValueError(
                        f"neuron set {label!r} has size {sizes[label]} on {owner[label]} but size {n} "
                        f"on axis {ax} of tensor {t.name or idx} (shape {t.shape})"
                    )
                sizes.setdefault(label, n)
                owner.setdefault(label, f"tensor {t.name or idx}")
        object.__setattr__(self, "set_sizes", sizes)
        object.__setattr__(self, "_hash", hash((self.tensors, self.components)))

    def __hash__(self) -> int:  # computed once: specs key caches on every optimizer step
        return self._hash

    def __len__(self) -> int:
        return len(self.tensors)

    @classmethod
    def independent(
        cls, shapes: Iterable[Sequence[int] | torch.Tensor], names: Iterable[str] | None = None
    ) -> WeightSpaceSpec:
        """The fallback labelling for bare tensors: no axis shares a set with another tensor's."""
        shapes = [tuple(s.shape) if isinstance(s, torch.Tensor) else tuple(s) for s in shapes]
        names = list(names) if names is not None else [str(i) for i in range(len(shapes))]
        if len(names) != len(shapes):
            raise ValueError(f"{len(names)} names for {len(shapes)} tensors")
        return cls(tuple(TensorSpec.independent(s, n) for s, n in zip(shapes, names)))

    @classmethod
    def batch(cls, spaces: Sequence[WeightSpaceSpec]) -> WeightSpaceSpec:
        """Independent weight spaces side by side, so that one NFN call serves them all: space
        k's sets are renamed ``(k, set)`` (no set is shared between spaces) and its tensors are
        component k (no global term pools across them). What an NFN computes on the batch is
        what it computes on each space alone."""
        tensors, components = [], []
        for k, space in enumerate(spaces):
            if space.components is not None:
                raise ValueError("a batch of weight spaces cannot hold another batch")
            for t in space.tensors:
                axes = tuple(None if a is None else (k, a) for a in t.axes)
                tensors.append(TensorSpec(t.shape, axes, f"{k}.{t.name}", t.blocks))
                components.append(k)
        return cls(tuple(tensors), tuple(components))

    @cached_property
    def blocks(self) -> tuple[int, ...]:
        """Each tensor's number of blocks (1 for a plain tensor)."""
        return tuple(t.blocks for t in self.tensors)

    def split_blocks(self) -> WeightSpaceSpec:
        """The space with each blocked tensor replaced by its blocks, in order (itself when no
        tensor is blocked): what an NF-layer reads, since a block is a tensor like any other."""
        if all(b == 1 for b in self.blocks):
            return self
        tensors = tuple(part for t in self.tensors for part in t.split())
        components = None if self.components is None else tuple(
            c for c, b in zip(self.components, self.blocks) for _ in range(b)
        )
        return WeightSpaceSpec(tensors, components)

    @cached_property
    def set_members(self) -> dict[Label, tuple[tuple[int, int], ...]]:
        """For each neuron set, the (tensor index, axis) pairs it labels."""
        out: dict[Label, list[tuple[int, int]]] = {label: [] for label in self.set_sizes}
        for ti, t in enumerate(self.tensors):
            for ax, label in enumerate(t.axes):
                if label is not None:
                    out[label].append((ti, ax))
        return {k: tuple(v) for k, v in out.items()}

    def check_tensors(self, tensors: Sequence[torch.Tensor], leading: int = 0, what: str = "tensor") -> None:
        """Raise a ValueError naming the first tensor that does not fit this space.

        ``leading`` extra axes (feature channels) may come before each tensor's own shape.
        """
        if len(tensors) != len(self.tensors):
            raise ValueError(f"expected {len(self.tensors)} {what}s for this weight space, got {len(tensors)}")
        for i, (x, t) in enumerate(zip(tensors, self.tensors)):
            if not isinstance(x, torch.Tensor):
                raise TypeError(f"{what} {t.name or i}: expected a torch.Tensor, got {type(x).__name__}")
            if x.layout != torch.strided:
                raise ValueError(f"{what} {t.name or i}: sparse tensors are not supported (layout {x.layout})")
            if x.is_complex():
                raise ValueError(f"{what} {t.name or i}: complex tensors are not supported (dtype {x.dtype})")
            if x.dim() != len(t.shape) + leading or tuple(x.shape[leading:]) != t.shape:
                extra = f" after {leading} channel axis" if leading else ""
                raise ValueError(
                    f"{what} {t.name or i}: shape {tuple(x.shape)} does not fit the weight space, "
                    f"which expects {t.shape}{extra}"
                )

    def random_permutation(self, generator: torch.Generator | None = None) -> dict[Label, torch.Tensor]:
        """Draw a uniformly random group element: one permutation per neuron set."""
        return {label: torch.randperm(n, generator=generator) for label, n in self.set_sizes.items()}

    def permute(
        self, tensors: Sequence[torch.Tensor], perm: Permutation, leading: int = 0
    ) -> list[torch.Tensor]:
        """Apply a group element to tensors of this space.

        ``leading`` axes before each tensor's own shape (feature channels) ride along unpermuted.
        """
        out = []
        for x, t in zip(tensors, self.tensors):
            for ax, label in enumerate(t.axes):
                if label is not None and label in perm:
                    x = x.index_select(ax + leading, _blockwise(perm[label], t.blocks if ax == 0 else 1).to(x.device))
            out.append(x)
        return out


def _blockwise(perm: torch.Tensor, blocks: int) -> torch.Tensor:
    """A permutation of ``n`` neurons applied to each of ``blocks`` blocks of them in a row."""
    if blocks == 1:
        return perm
    return (perm + len(perm) * torch.arange(blocks)[:, None]).reshape(-1)


def inverse_permutation(perm: Permutation) -> dict[Label, torch.Tensor]:
    """The inverse group element."""
    return {label: torch.argsort(p) for label, p in perm.items()}
