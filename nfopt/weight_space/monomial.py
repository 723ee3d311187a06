"""Monomial symmetries of weight space: permutations, and per-neuron sign flips or positive scalings.

A hidden neuron followed by an odd activation (tanh, sin) can have its sign flipped, and one
followed by a positively homogeneous activation (ReLU, LeakyReLU) can be scaled by any c > 0,
without changing the network's function, provided its incoming weights and bias are multiplied
by the factor and its outgoing weights divided by it. A :class:`MonomialSpec` adds this to a
permutation labelling (:class:`~nfopt.weight_space.WeightSpaceSpec`): which neuron sets admit
sign flips or scalings, and, per tensor axis, the *exponent* with which an axis's factor enters
an element (+1 on the axis that indexes a neuron's incoming weights or bias, -1 on the axis that
indexes its outgoing weights, 0 on fixed axes). A group element is a permutation and a factor
vector per set; it acts on an element by permuting and then multiplying by the product over the
element's labelled axes of factor ** exponent.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property

import torch

from .spec import Label, WeightSpaceSpec

SYMMETRIES: tuple[str, ...] = ("perm", "sign", "scale")
"""What a neuron set admits: permutations only, also sign flips, or also positive scalings."""


@dataclass(frozen=True)
class MonomialElement:
    """One group element: a permutation (LongTensor) and a factor vector per neuron set."""

    perm: Mapping[Label, torch.Tensor]
    factors: Mapping[Label, torch.Tensor]


@dataclass(frozen=True)
class MonomialSpec:
    """A weight space with the sign-flip and scaling symmetries its neuron sets admit.

    ``symmetries`` pairs neuron sets with ``"sign"`` or ``"scale"``; a set not named admits
    permutations only. ``exponents`` has one tuple per tensor, one entry per axis: +1 or -1 on a
    labelled axis, 0 on a fixed one. Only exponents on sets that admit a symmetry matter.
    """

    space: WeightSpaceSpec
    symmetries: tuple[tuple[Label, str], ...] = ()
    exponents: tuple[tuple[int, ...], ...] | None = None
    _by_set: dict = field(init=False, compare=False, hash=False, repr=False)

    def __post_init__(self) -> None:
        if not isinstance(self.space, WeightSpaceSpec):
            raise TypeError(f"space must be a WeightSpaceSpec, got {type(self.space).__name__}")
        by_set: dict[Label, str] = {}
        for label, symmetry in dict(self.symmetries).items():
            if label not in self.space.set_sizes:
                raise ValueError(f"neuron set {label!r} is not in the weight space")
            if symmetry not in SYMMETRIES:
                raise ValueError(f"neuron set {label!r}: unknown symmetry {symmetry!r}; expected one of {SYMMETRIES}")
            if symmetry != "perm":
                by_set[label] = symmetry
        blocked = [t.name or "?" for t in self.space.tensors if t.blocks > 1 and t.axes[0] in by_set]
        if blocked:
            raise ValueError(
                f"tensor {blocked[0]}: the set of its blocked first axis is claimed to admit sign flips or "
                "scalings, which act on its blocks differently (an LSTM's gates); it admits permutations only"
            )
        object.__setattr__(self, "symmetries", tuple(by_set.items()))
        object.__setattr__(self, "_by_set", by_set)
        exponents = self.exponents
        if exponents is None:
            exponents = tuple(default_exponents(t.axes) for t in self.space.tensors)
        exponents = tuple(tuple(int(e) for e in row) for row in exponents)
        if len(exponents) != len(self.space.tensors):
            raise ValueError(f"{len(exponents)} exponent tuples for {len(self.space.tensors)} tensors")
        for row, t in zip(exponents, self.space.tensors):
            if len(row) != len(t.axes):
                raise ValueError(f"tensor {t.name or '?'}: {len(row)} exponents for {len(t.axes)} axes")
            for e, label in zip(row, t.axes):
                allowed = (0,) if label is None else (1, -1)
                if e not in allowed:
                    raise ValueError(
                        f"tensor {t.name or '?'}: exponent {e} on a {'fixed' if label is None else 'labelled'} "
                        f"axis; expected one of {allowed}"
                    )
        object.__setattr__(self, "exponents", exponents)
        object.__setattr__(self, "_hash", hash((self.space, self.symmetries, exponents)))

    def __hash__(self) -> int:  # computed once: specs key the layers' plan cache
        return self._hash

    @classmethod
    def permutations_only(cls, space: WeightSpaceSpec) -> MonomialSpec:
        """The spec whose group is the permutation group of ``space``: no set admits more."""
        return cls(space)

    def split_blocks(self) -> MonomialSpec:
        """:meth:`WeightSpaceSpec.split_blocks`, with each block keeping its tensor's exponents."""
        space = self.space.split_blocks()
        if space is self.space:
            return self
        exponents = tuple(row for row, b in zip(self.exponents, self.space.blocks) for _ in range(b))
        return MonomialSpec(space, self.symmetries, exponents)

    def only(self, *symmetries: str) -> MonomialSpec:
        """The spec keeping only these symmetries (e.g. ``"sign"``): a subgroup."""
        kept = tuple((label, symmetry) for label, symmetry in self.symmetries if symmetry in symmetries)
        return MonomialSpec(self.space, kept, self.exponents)

    def symmetry(self, label: Label) -> str:
        """``"perm"``, ``"sign"`` or ``"scale"``: what ``label`` admits beyond permutations."""
        if label not in self.space.set_sizes:
            raise KeyError(f"neuron set {label!r} is not in the weight space")
        return self._by_set.get(label, "perm")

    @cached_property
    def characters(self) -> tuple[tuple[tuple[Label, int], ...], ...]:
        """Per tensor, the (set, exponent) pairs of its axes whose set admits signs or scalings.

        An element of tensor t is multiplied by prod over these pairs of factor[set] ** exponent;
        an empty tuple means the tensor only permutes.
        """
        return tuple(
            tuple((label, e) for label, e in zip(t.axes, row) if label is not None and label in self._by_set)
            for t, row in zip(self.space.tensors, self.exponents)
        )

    def factor_group(self, index: int) -> str:
        """What multiplies tensor ``index``'s elements: ``"none"``, ``"sign"``, ``"scale"`` or ``"both"``.

        Decides which activations commute with the group on that tensor: any; odd ones; positively
        homogeneous ones; only the identity.
        """
        symmetries = {self._by_set[label] for label, _ in self.characters[index]}
        if not symmetries:
            return "none"
        return symmetries.pop() if len(symmetries) == 1 else "both"

    def random_element(
        self, generator: torch.Generator | None = None, log10_scale: float = 3.0
    ) -> MonomialElement:
        """A random group element: uniform permutations, uniform signs, and scalings log-uniform
        in [10**-log10_scale, 10**log10_scale]."""
        perm = self.space.random_permutation(generator)
        factors = {}
        for label, n in self.space.set_sizes.items():
            symmetry = self._by_set.get(label, "perm")
            if symmetry == "sign":
                factors[label] = torch.randint(0, 2, (n,), generator=generator).double() * 2 - 1
            elif symmetry == "scale":
                u = torch.rand(n, generator=generator, dtype=torch.float64) * 2 - 1
                factors[label] = torch.exp(u * (log10_scale * math.log(10.0)))
            else:
                factors[label] = torch.ones(n, dtype=torch.float64)
        return MonomialElement(perm, factors)

    def act(self, tensors: Sequence[torch.Tensor], g: MonomialElement, leading: int = 0) -> list[torch.Tensor]:
        """Apply ``g`` to tensors of this space (``leading`` channel axes ride along)."""
        permuted = self.space.permute(tensors, g.perm, leading)
        out = []
        for x, t, row in zip(permuted, self.space.tensors, self.exponents):
            for ax, (label, e) in enumerate(zip(t.axes, row)):
                if label is None or label not in self._by_set:
                    continue
                shape = [1] * x.dim()
                shape[ax + leading] = -1
                x = x * g.factors[label].to(x).pow(e).reshape(shape)
            out.append(x)
        return out


def as_monomial(spec: WeightSpaceSpec | MonomialSpec) -> MonomialSpec:
    """A plain weight space as the monomial spec whose group is its permutations; others unchanged."""
    return spec if isinstance(spec, MonomialSpec) else MonomialSpec(spec)


def batch(specs: Sequence[WeightSpaceSpec | MonomialSpec]) -> WeightSpaceSpec | MonomialSpec:
    """:meth:`WeightSpaceSpec.batch` for plain or monomial specs (a monomial one if any is)."""
    space = WeightSpaceSpec.batch([as_monomial(s).space for s in specs])
    if all(isinstance(s, WeightSpaceSpec) for s in specs):
        return space
    monos = [as_monomial(s) for s in specs]
    symmetries = tuple(((k, label), symmetry) for k, m in enumerate(monos) for label, symmetry in m.symmetries)
    return MonomialSpec(space, symmetries, tuple(e for m in monos for e in m.exponents))


def sign_scale_invariants(
    spec: WeightSpaceSpec | MonomialSpec, xs: Sequence[torch.Tensor], leading: int = 1
) -> list[torch.Tensor]:
    """Features made invariant to the spec's sign flips and scalings, still equivariant to permutations.

    Scalings are undone set by set: the RMS n[j] (per leading index) of the elements that carry
    neuron j's factor and no other factor still to be undone scales like that factor (to the
    power of their exponent e), so multiplying every element by n ** (-exponent / e) cancels it.
    Sets are taken in an order that makes this possible (input to output in a feed-forward
    network). Signs are then dropped (absolute value). Tensors that only permute come back as
    they are.
    """
    mono = as_monomial(spec)
    xs = list(xs)
    pending = [label for label, symmetry in mono.symmetries if symmetry == "scale"]
    while pending:
        for label in pending:
            ready = [
                (t, a)
                for t, a in mono.space.set_members[label]
                if not any(o in pending for i, o in enumerate(mono.space.tensors[t].axes) if i != a)
            ]
            if ready:
                break
        else:
            raise ValueError(f"cannot undo the scalings of sets {pending}: each element carries two of their factors")
        ref = 1 if any(mono.exponents[t][a] == 1 for t, a in ready) else -1
        total, count = 0.0, 0
        for t, a in ready:
            if mono.exponents[t][a] == ref:
                dims = tuple(d for d in range(leading, xs[t].dim()) if d != a + leading)
                total = total + (xs[t].square().sum(dims) if dims else xs[t].square())  # sum(()) sums all
                count += math.prod(mono.space.tensors[t].shape) // mono.space.tensors[t].shape[a]
        norm = (total / count).sqrt().clamp_min(torch.finfo(xs[0].dtype).tiny)  # (*leading, n) ~ factor ** ref
        for t, a in mono.space.set_members[label]:
            shape = [*norm.shape[:-1]] + [1] * (xs[t].dim() - leading)
            shape[leading + a] = -1
            xs[t] = xs[t] * norm.reshape(shape).pow(-mono.exponents[t][a] * ref)
        pending.remove(label)
    return [x.abs() if mono.factor_group(i) in ("sign", "both") else x for i, x in enumerate(xs)]


def default_exponents(axes: Sequence[Label]) -> tuple[int, ...]:
    """+1 on the first labelled axis (a layer's outputs), -1 on a second (its inputs), 0 on fixed."""
    out, seen = [], 0
    for label in axes:
        if label is None:
            out.append(0)
        else:
            out.append(1 if seen == 0 else -1)
            seen += 1
    return tuple(out)
