"""Tests of the reference NP/HNP layers: equivariance, invariance, coupling, gradients, counts, errors."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from nfopt.nn.reference import (
    HNPLinear,
    HNPPool,
    NetworkShape,
    NPLinear,
    NPPool,
    PointwiseActivation,
    WeightSpaceBatch,
    sequential_to_weight_space,
    weight_space_to_sequential_,
)

SHAPES = {
    "mlp1": NetworkShape((3, 2)),
    "mlp2": NetworkShape((3, 6, 2)),
    "mlp4": NetworkShape((2, 3, 4, 3, 2)),
    "cnn": NetworkShape((3, 4, 5, 2), kernels=((3, 3), (2, 2), ())),
}
LAYERS = {
    "np": lambda shape, c_in, c_out: NPLinear(shape, c_in, c_out),
    "np_io": lambda shape, c_in, c_out: NPLinear(shape, c_in, c_out, io_embed=True),
    "hnp": HNPLinear,
}
C_IN, C_OUT = 2, 3
TOL = 1e-10


def features(shape: NetworkShape, seed: int = 0, channels: int = C_IN) -> WeightSpaceBatch:
    g = torch.Generator().manual_seed(seed)
    return WeightSpaceBatch.randn(shape, 2, channels, dtype=torch.float64, generator=g)


def make_layer(variant: str, shape: NetworkShape) -> nn.Module:
    torch.manual_seed(0)
    return LAYERS[variant](shape, C_IN, C_OUT).double()


def nontrivial_perm(n: int, g: torch.Generator) -> torch.Tensor:
    while True:
        p = torch.randperm(n, generator=g)
        if n == 1 or not torch.equal(p, torch.arange(n)):
            return p


def perms_of(shape: NetworkShape, layers: range, seed: int = 1) -> dict[int, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {j: nontrivial_perm(shape.widths[j], g) for j in layers}


def hidden(shape: NetworkShape) -> range:
    return range(1, shape.num_layers)


def gap(a: WeightSpaceBatch, b: WeightSpaceBatch, skip: tuple[str, int] | None = None) -> float:
    """The largest difference between two weight spaces, leaving out the tensor ``skip`` names."""
    pairs = [
        (x, y)
        for group in ("weights", "biases")
        for i, (x, y) in enumerate(zip(getattr(a, group), getattr(b, group)))
        if (group, i) != skip
    ]
    return max((x - y).abs().max().item() for x, y in pairs)


def equivariance_gap(layer: nn.Module, x: WeightSpaceBatch, act, skip: tuple[str, int] | None = None) -> float:
    """How far ``layer`` is from commuting with ``act`` (a map on weight spaces) at ``x``."""
    return gap(layer(act(x)), act(layer(x)), skip)


@pytest.mark.parametrize("shape_name", SHAPES)
@pytest.mark.parametrize("variant", LAYERS)
def test_equivariant_to_hidden_permutations(variant: str, shape_name: str) -> None:
    shape = SHAPES[shape_name]
    layer, x = make_layer(variant, shape), features(shape)
    perms = perms_of(shape, hidden(shape))
    assert equivariance_gap(layer, x, lambda ws: ws.permute(perms)) < TOL
    if perms:  # the permutation really moves the output, so the check above is not vacuous
        assert gap(layer(x).permute(perms), layer(x)) > 1e-3


@pytest.mark.parametrize("shape_name", SHAPES)
def test_np_is_equivariant_to_input_and_output_permutations_and_hnp_is_not(shape_name: str) -> None:
    shape = SHAPES[shape_name]
    x = features(shape)
    perms = perms_of(shape, range(len(shape.widths)))
    assert equivariance_gap(make_layer("np", shape), x, lambda ws: ws.permute(perms)) < TOL
    for end in (0, shape.num_layers):
        for variant in ("np_io", "hnp"):  # these index the input and output neurons
            gap_ = equivariance_gap(make_layer(variant, shape), x, lambda ws: ws.permute({end: perms[end]}))
            assert gap_ > 1e-3, (variant, end)


@pytest.mark.parametrize("variant", LAYERS)
def test_kernel_offsets_are_indexed(variant: str) -> None:
    shape = SHAPES["cnn"]
    layer, x = make_layer(variant, shape), features(shape)
    flip = lambda ws: WeightSpaceBatch((ws.weights[0].flip(-1),) + ws.weights[1:], ws.biases)
    assert equivariance_gap(layer, x, flip) > 1e-3


def partial_permute(ws: WeightSpaceBatch, j: int, perm: torch.Tensor, skip: tuple[str, int]) -> WeightSpaceBatch:
    """Permute neuron layer j everywhere except in one tensor: a deliberately broken coupling."""
    out = ws.permute({j: perm})
    weights, biases = list(out.weights), list(out.biases)
    group, i = skip
    if group == "weights":
        weights[i] = ws.weights[i]
    else:
        biases[i] = ws.biases[i]
    return WeightSpaceBatch(tuple(weights), tuple(biases))


@pytest.mark.parametrize("shape_name", ["mlp4", "cnn"])
@pytest.mark.parametrize("variant", LAYERS)
def test_broken_coupling_breaks_equivariance(variant: str, shape_name: str) -> None:
    shape = SHAPES[shape_name]
    layer, x = make_layer(variant, shape), features(shape)
    for j in hidden(shape):
        perm = perms_of(shape, range(j, j + 1))[j]
        # neuron layer j indexes the rows of W_j (weights[j-1]), b_j (biases[j-1]), the columns of W_{j+1}
        for skip in (("weights", j - 1), ("biases", j - 1), ("weights", j)):
            broken = lambda ws: partial_permute(ws, j, perm, skip)
            # comparing only the other tensors' outputs shows the skipped one feeds them by set-j terms
            assert equivariance_gap(layer, x, broken, skip) > 1e-3, (j, skip)


@pytest.mark.parametrize("shape_name", SHAPES)
def test_pools(shape_name: str) -> None:
    shape = SHAPES[shape_name]
    x = features(shape)
    all_perms = perms_of(shape, range(len(shape.widths)))
    k = [math.prod(kernel) for kernel in shape.kernels]
    n_in, n_out = shape.widths[0], shape.widths[-1]
    reductions = {"mean": torch.mean, "max": torch.amax, "sum": torch.sum}
    for reduce, op in reductions.items():
        np_pool, hnp_pool = NPPool(shape, C_IN, reduce), HNPPool(shape, C_IN, reduce)
        out = np_pool(x)
        # NP: each weight over its two neuron axes (kernel offsets kept, channel-major), each bias over its one
        expected = [op(w, dim=(2, 3)).reshape(2, -1) for w in x.weights] + [op(b, dim=2) for b in x.biases]
        assert torch.allclose(out, torch.cat(expected, dim=1), rtol=1e-12, atol=1e-14)
        assert np_pool.out_features == C_IN * sum(ki + 1 for ki in k)
        assert torch.allclose(np_pool(x.permute(all_perms)), out, atol=TOL)
        out = hnp_pool(x)
        assert out.shape == (2, hnp_pool.out_features)
        assert torch.allclose(hnp_pool(x.permute({j: all_perms[j] for j in hidden(shape)})), out, atol=TOL)
        assert not torch.allclose(hnp_pool(x.permute({0: all_perms[0]})), out, atol=1e-3)
    if shape.num_layers >= 2:
        middle = sum(ki + 1 for ki in k[1:-1])
        assert hnp_pool.out_features == C_IN * (n_in * k[0] + 1 + middle + n_out * k[-1] + n_out)


@pytest.mark.parametrize("variant", ["np_io", "hnp"])
def test_gradients_reach_every_parameter(variant: str) -> None:
    shape = SHAPES["cnn"]
    pool_cls = NPPool if variant.startswith("np") else HNPPool
    torch.manual_seed(0)
    pool = pool_cls(shape, 4)
    make = lambda c_in, c_out: LAYERS[variant](shape, c_in, c_out)
    net = nn.Sequential(
        make(C_IN, 5), PointwiseActivation(torch.tanh), make(5, 4), pool, nn.Linear(pool.out_features, 1)
    )
    net.double()
    net(features(shape)).pow(2).sum().backward()
    params = dict(net.named_parameters())
    assert len(params) > 20
    for name, p in params.items():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def expected_params(tensors: list[tuple[int, set[int]]], c_in: int, c_out: int) -> int:
    """The module docstring's count, for tensors given as (m_t, sigma(t)) tables written by hand."""
    g = sum(m for m, _ in tensors)
    big_m = lambda j: sum(m for m, sets in tensors if j in sets)
    per_pair = sum(m * (g + sum(big_m(j) for j in sets) + (m if len(sets) == 2 else 0)) for m, sets in tensors)
    return c_in * c_out * per_pair + c_out * g


def np_table(shape: NetworkShape) -> list[tuple[int, set[int]]]:
    k = [math.prod(kernel) for kernel in shape.kernels]
    return [(k[i - 1], {i, i - 1}) for i in range(1, shape.num_layers + 1)] + [
        (1, {i}) for i in range(1, shape.num_layers + 1)
    ]


def hnp_table(shape: NetworkShape) -> list[tuple[int, set[int]]]:
    k = [math.prod(kernel) for kernel in shape.kernels]
    big_l, n_in, n_out = shape.num_layers, shape.widths[0], shape.widths[-1]
    weights = [(n_in * k[0], {1})] + [(k[i - 1], {i, i - 1}) for i in range(2, big_l)] + [(n_out * k[-1], {big_l - 1})]
    return weights + [(1, {i}) for i in range(1, big_l)] + [(n_out, set())]


def count(layer: nn.Module) -> int:
    return sum(p.numel() for p in layer.parameters())


@pytest.mark.parametrize("shape_name", ["mlp2", "mlp4", "cnn"])
def test_parameter_counts(shape_name: str) -> None:
    shape = SHAPES[shape_name]
    np_layer, hnp_layer = NPLinear(shape, C_IN, C_OUT), HNPLinear(shape, C_IN, C_OUT)
    assert count(np_layer) == expected_params(np_table(shape), C_IN, C_OUT)
    assert count(hnp_layer) == expected_params(hnp_table(shape), C_IN, C_OUT)
    assert count(hnp_layer) > count(np_layer)
    n_in, n_out, k0, k_last = shape.widths[0], shape.widths[-1], shape.kernels[0], shape.kernels[-1]
    embeddings = C_IN * (n_in * math.prod(k0) + n_out * math.prod(k_last) + n_out)
    assert count(NPLinear(shape, C_IN, C_OUT, io_embed=True)) == count(np_layer) + embeddings


def test_parameter_count_by_hand() -> None:
    # NP on widths (2, 3, 2), one channel: output W_1 gets 9 terms, W_2 10, b_1 7, b_2 6 (see module
    # docstring), plus one bias per output tensor.
    assert count(NPLinear(NetworkShape((2, 3, 2)), 1, 1)) == 9 + 10 + 7 + 6 + 4


def test_pointwise_activation() -> None:
    x = features(SHAPES["cnn"])
    y = PointwiseActivation(torch.relu)(x)
    assert all(torch.equal(a, b.clamp_min(0)) for a, b in zip(y.weights + y.biases, x.weights + x.biases))


def example_models() -> list[nn.Module]:
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(3, 6), nn.ReLU(), nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 2))
    cnn = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 5, 2), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(5, 2),
    )
    return [mlp.double(), cnn.double()]


@pytest.mark.parametrize("model", example_models(), ids=["mlp", "cnn"])
def test_sequential_round_trip_and_hidden_symmetry(model: nn.Module) -> None:
    x = torch.randn(4, 3, *((6, 6) if isinstance(model[0], nn.Conv2d) else ()), dtype=torch.float64)
    ws = sequential_to_weight_space(model)
    assert ws.batch_size == 1 and ws.channels == 1
    expected = model(x)
    # hidden permutations leave the function unchanged, so the layers' symmetry is the network's
    weight_space_to_sequential_(ws.permute(perms_of(ws.shape, hidden(ws.shape))), model)
    torch.testing.assert_close(model(x), expected)
    assert gap(sequential_to_weight_space(model), ws) > 1e-3
    # an input permutation is not a symmetry of the network
    weight_space_to_sequential_(ws.permute(perms_of(ws.shape, range(1))), model)
    assert not torch.allclose(model(x), expected, atol=1e-3)
    weight_space_to_sequential_(ws, model)
    assert gap(sequential_to_weight_space(model), ws) == 0
    assert NPLinear(ws.shape, 1, 2).double()(ws).channels == HNPLinear(ws.shape, 1, 2).double()(ws).channels == 2


def test_bad_containers_raise() -> None:
    w = lambda *s: torch.zeros(2, 1, *s)
    with pytest.raises(ValueError, match="at least one layer"):
        WeightSpaceBatch((), ())
    with pytest.raises(ValueError, match="2 weights but 1 biases"):
        WeightSpaceBatch((w(4, 3), w(2, 4)), (w(4),))
    with pytest.raises(ValueError, match=r"weights\[1\] takes 5 inputs but weights\[0\] has 4 outputs"):
        WeightSpaceBatch((w(4, 3), w(2, 5)), (w(4), w(2)))
    with pytest.raises(ValueError, match=r"biases\[0\] has 3 entries"):
        WeightSpaceBatch((w(4, 3),), (w(3),))
    with pytest.raises(ValueError, match=r"\(batch, channels\)"):
        WeightSpaceBatch((w(4, 3), torch.zeros(2, 2, 2, 4)), (w(4), w(2)))
    with pytest.raises(ValueError, match=r"\(batch, channels\)"):
        WeightSpaceBatch((w(4, 3),), (torch.zeros(3, 1, 4),))
    with pytest.raises(ValueError, match="expected \\(batch, channels, n_out, n_in"):
        WeightSpaceBatch((torch.zeros(2, 4, 3),), (w(4),))
    with pytest.raises(TypeError, match="torch.Tensor"):
        WeightSpaceBatch(([[0.0]],), (w(1),))
    with pytest.raises(ValueError, match="at least two neuron layers"):
        NetworkShape((3,))
    with pytest.raises(ValueError, match="positive"):
        NetworkShape((3, 0))
    with pytest.raises(ValueError, match="2 kernel shapes for a network of 1 layers"):
        NetworkShape((3, 2), kernels=((3,), ()))
    ws = features(SHAPES["mlp2"])
    with pytest.raises(ValueError, match="neuron layer 3 does not exist"):
        ws.permute({3: torch.arange(2)})
    with pytest.raises(ValueError, match="expected \\(6,\\)"):
        ws.permute({1: torch.arange(5)})


def test_layers_reject_mismatched_features() -> None:
    shape = SHAPES["mlp2"]
    modules = (NPLinear(shape, C_IN, C_OUT), HNPLinear(shape, C_IN, C_OUT), NPPool(shape, C_IN), HNPPool(shape, C_IN))
    for module in modules:
        with pytest.raises(ValueError, match="was built for"):
            module(features(SHAPES["mlp4"]))
        with pytest.raises(ValueError, match=f"expects {C_IN} input channels, got 1"):
            module(features(shape, channels=1))
        with pytest.raises(TypeError, match="expects a WeightSpaceBatch"):
            module(features(shape).weights)
    with pytest.raises(TypeError, match="float32 parameters but got features of dtype torch.float64"):
        HNPLinear(shape, C_IN, C_OUT)(features(shape))
    with pytest.raises(ValueError, match="reduce must be one of"):
        NPPool(shape, 1, reduce="median")
    with pytest.raises(ValueError, match="out_channels must be a positive integer"):
        NPLinear(shape, 1, 0)


def test_sequential_conversion_rejects_unsupported_models() -> None:
    with pytest.raises(ValueError, match="has no bias"):
        sequential_to_weight_space(nn.Sequential(nn.Linear(3, 4, bias=False)))
    with pytest.raises(ValueError, match="BatchNorm1d"):
        sequential_to_weight_space(nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2)))
    with pytest.raises(ValueError, match="without pooling"):
        sequential_to_weight_space(nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4 * 16, 2)))
    with pytest.raises(ValueError, match="grouped convolution"):
        sequential_to_weight_space(nn.Sequential(nn.Conv2d(4, 4, 3, groups=2)))
    with pytest.raises(ValueError, match="model has weight space"):
        weight_space_to_sequential_(features(SHAPES["mlp2"]), nn.Sequential(nn.Linear(3, 5), nn.Linear(5, 2)))
    with pytest.raises(IndexError, match="out of range"):
        weight_space_to_sequential_(features(SHAPES["mlp2"]), nn.Sequential(nn.Linear(3, 6), nn.Linear(6, 2)), index=2)
