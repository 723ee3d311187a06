"""Weight spaces for tests: coupled MLP and CNN spaces, random labellings, and one with every relation."""

from __future__ import annotations

import random

import torch

from nfopt.weight_space import AXIS_TYPES, Kind, MonomialElement, MonomialSpec, TensorSpec, WeightSpaceSpec


def mlp_spec(widths: list[int]) -> WeightSpaceSpec:
    """An MLP's weight space, hidden neurons coupled layer to layer; inputs and outputs their own sets."""
    tensors = []
    for i, (n_in, n_out) in enumerate(zip(widths[:-1], widths[1:])):
        tensors.append(TensorSpec((n_out, n_in), (f"s{i + 1}", f"s{i}"), f"w{i}"))
        tensors.append(TensorSpec((n_out,), (f"s{i + 1}",), f"b{i}"))
    return WeightSpaceSpec(tuple(tensors))


def cnn_spec(channels: list[int], kernel: int = 3, classes: int = 4) -> WeightSpaceSpec:
    """Convs (out, in, k, k) with biases, then a linear head after global pooling (coupled)."""
    tensors = []
    for i, (c_in, c_out) in enumerate(zip(channels[:-1], channels[1:])):
        tensors.append(TensorSpec((c_out, c_in, kernel, kernel), (f"c{i + 1}", f"c{i}", None, None), f"conv{i}"))
        tensors.append(TensorSpec((c_out,), (f"c{i + 1}",), f"conv{i}.b"))
    last = f"c{len(channels) - 1}"
    tensors.append(TensorSpec((classes, channels[-1]), ("out", last), "head"))
    tensors.append(TensorSpec((classes,), ("out",), "head.b"))
    return WeightSpaceSpec(tuple(tensors))


def random_spec(seed: int, n_tensors: int = 7) -> WeightSpaceSpec:
    """Random tensors over a few shared sets, with fixed axes, squares and axis orders of all sorts."""
    rng = random.Random(seed)
    sizes = {f"r{i}": rng.randint(2, 5) for i in range(4)}
    tensors = []
    for ti in range(n_tensors):
        ndim = rng.randint(0, 4)
        axes, shape = [], []
        for _ in range(ndim):
            labelled = sum(a is not None for a in axes)
            if labelled < 2 and rng.random() < 0.75:
                label = rng.choice(sorted(sizes))
                axes.append(label)
                shape.append(sizes[label])
            else:
                axes.append(None)
                shape.append(rng.randint(1, 3))
        tensors.append(TensorSpec(tuple(shape), tuple(axes), f"t{ti}"))
    return WeightSpaceSpec(tuple(tensors))


def every_relation_spec(n: int = 3) -> WeightSpaceSpec:
    """Two tensors of every kind, every labelled axis on one set: every weight of a layer is used."""
    s = "s"
    tensors = [
        TensorSpec((), (), "scalar"),
        TensorSpec((2,), (None,), "fixed"),
    ]
    for copy in range(2):
        tensors += [
            TensorSpec((n,), (s,), f"v{copy}"),
            TensorSpec((n, 2), (s, None), f"vf{copy}"),
            TensorSpec((n, n), (s, s), f"m{copy}"),
            TensorSpec((n, n, 2, 2), (s, s, None, None), f"mf{copy}"),
        ]
    return WeightSpaceSpec(tuple(tensors))


def relation(own: tuple[Kind, int], other: tuple[Kind, int]) -> int:
    """The index of the NF-layer's neighbour relation that carries axis type ``other`` to ``own``
    (an axis type is a kind and one of its labelled axes)."""
    return AXIS_TYPES.index(own) * len(AXIS_TYPES) + AXIS_TYPES.index(other)


def random_features(spec: WeightSpaceSpec, channels: int, seed: int = 0, dtype=torch.float64) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(channels, *t.shape, generator=g, dtype=dtype) for t in spec.tensors]


def monomial_mlp_spec(widths: list[int], symmetry: str) -> MonomialSpec:
    """An MLP's weight space whose hidden sets admit ``symmetry`` (tanh: "sign", ReLU: "scale")."""
    space = mlp_spec(widths)
    return MonomialSpec(space, tuple((f"s{i}", symmetry) for i in range(1, len(widths) - 1)))


def monomial_cnn_spec(channels: list[int], symmetry: str) -> MonomialSpec:
    """:func:`cnn_spec` with the hidden channel sets admitting ``symmetry``."""
    space = cnn_spec(channels)
    return MonomialSpec(space, tuple((f"c{i}", symmetry) for i in range(1, len(channels))))


def random_monomial_spec(seed: int) -> MonomialSpec:
    """:func:`random_spec` with random sets flipping or scaling and random exponents."""
    space = random_spec(seed)
    rng = random.Random(seed)
    symmetries = tuple((label, rng.choice(("perm", "sign", "scale"))) for label in sorted(space.set_sizes))
    exponents = tuple(tuple(0 if a is None else rng.choice((1, -1)) for a in t.axes) for t in space.tensors)
    return MonomialSpec(space, symmetries, exponents)


def factor_magnitudes(spec: MonomialSpec, g: MonomialElement) -> list[torch.Tensor]:
    """Per tensor, |factor| of each element after acting with ``g``: the scale of equivariance errors."""
    ones = [torch.ones(1, *t.shape, dtype=torch.float64) for t in spec.space.tensors]
    return [f.abs()[0] for f in spec.act(ones, g, leading=1)]


def monomial_equivariance_error(f, spec: MonomialSpec, xs: list[torch.Tensor], g: MonomialElement) -> float:
    """max |f(g·x) - g·f(x)|, each element relative to its factor, over the largest |f(x)|."""
    ys = f(xs)
    lhs = f(spec.act(xs, g, leading=1))
    rhs = spec.act(ys, g, leading=1)
    top = max(y.abs().max().item() for y in ys)
    return max(((a - b).abs() / m).max().item() for a, b, m in zip(lhs, rhs, factor_magnitudes(spec, g))) / top
