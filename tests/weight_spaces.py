"""Weight spaces for tests: coupled MLP and CNN spaces, random labellings, and one with every relation."""

from __future__ import annotations

import random

import torch

from nfopt.weight_space import TensorSpec, WeightSpaceSpec


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


def random_features(spec: WeightSpaceSpec, channels: int, seed: int = 0, dtype=torch.float64) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(channels, *t.shape, generator=g, dtype=dtype) for t in spec.tensors]
