"""NF-layer stacks and the invariant head."""

from __future__ import annotations

import pytest
import torch

import nfopt.nn.nfn
from nfopt.nn.nfn import NFN, InvariantPool
from nfopt.weight_space import KINDS

from ..weight_spaces import (
    cnn_spec,
    mlp_spec,
    monomial_cnn_spec,
    monomial_equivariance_error,
    monomial_mlp_spec,
    random_features,
    random_monomial_spec,
    random_spec,
)

SPACES = [mlp_spec([4, 5, 3]), cnn_spec([2, 3, 3]), random_spec(11), random_spec(12)]


def nfn(**kw) -> NFN:
    torch.manual_seed(0)
    return NFN(3, 6, 2, n_layers=3, context_channels=2, **kw).double()


@pytest.mark.parametrize("spec", SPACES)
def test_stack_is_equivariant(spec):
    net = nfn()
    xs = random_features(spec, 3)
    ctx = torch.randn(len(spec), 2, dtype=torch.float64)
    perm = spec.random_permutation(torch.Generator().manual_seed(0))
    lhs = net(spec, spec.permute(xs, perm, leading=1), ctx)
    rhs = spec.permute(net(spec, xs, ctx), perm, leading=1)
    for a, b in zip(lhs, rhs):
        assert torch.allclose(a, b, atol=1e-12)


@pytest.mark.parametrize("spec", SPACES)
def test_pool_is_the_per_kind_mean_of_tensor_means_and_invariant(spec):
    pool = InvariantPool(3)
    xs = random_features(spec, 3)
    expected = []
    for kind in KINDS:  # kinds a space lacks contribute zeros
        means = [x.reshape(3, -1).mean(1) for x, t in zip(xs, spec.tensors) if t.kind == kind]
        expected.append(torch.stack(means).mean(0) if means else torch.zeros(3, dtype=torch.float64))
    v = pool(spec, xs)
    assert torch.allclose(v, torch.cat(expected), rtol=1e-12, atol=1e-14)
    perm = spec.random_permutation(torch.Generator().manual_seed(1))
    assert torch.allclose(pool(spec, spec.permute(xs, perm, leading=1)), v, atol=1e-12)


def test_zero_last_outputs_zero_and_still_learns():
    spec = SPACES[0]
    net = nfn(zero_last=True)
    ctx = torch.randn(len(spec), 2, dtype=torch.float64)
    ys = net(spec, random_features(spec, 3), ctx)
    assert all(torch.count_nonzero(y) == 0 for y in ys)
    sum((y * torch.randn_like(y)).sum() for y in ys).backward()
    assert net.layers[-1].A.grad.abs().sum() > 0


def test_gradients_reach_every_layer():
    spec = SPACES[1]
    net = nfn()
    ys = net(spec, random_features(spec, 3), torch.randn(len(spec), 2, dtype=torch.float64))
    sum((y * torch.randn_like(y)).sum() for y in ys).backward()
    for layer in net.layers:
        assert layer.A.grad.abs().sum() > 0 and layer.N.grad.abs().sum() > 0


def test_bad_input():
    spec = SPACES[0]
    xs = random_features(spec, 3)
    with pytest.raises(ValueError, match="expected 4 features"):
        nfn()(spec, xs[:2])
    with pytest.raises(ValueError, match="feature w0: 2 channels, expected 3"):
        nfn()(spec, random_features(spec, 2))
    with pytest.raises(ValueError, match=r"feature b0: shape \(3, 4\) does not fit"):
        nfn()(spec, [xs[0], xs[1][:, :4], *xs[2:]])
    with pytest.raises(ValueError, match="feature w0: complex tensors"):
        nfn()(spec, [xs[0].to(torch.complex128), *xs[1:]])
    with pytest.raises(ValueError, match="feature w0: sparse tensors"):
        nfn()(spec, [xs[0].to_sparse(), *xs[1:]])
    with pytest.raises(ValueError, match="unknown activation"):
        NFN(3, 4, 2, activation="swish")
    with pytest.raises(ValueError, match="at least one layer"):
        NFN(3, 4, 2, n_layers=0)


MONOMIAL_SPACES = [
    monomial_mlp_spec([4, 5, 3], "sign"),
    monomial_mlp_spec([4, 5, 6, 3], "scale"),
    monomial_cnn_spec([2, 3, 3], "scale"),
    random_monomial_spec(3),
    random_monomial_spec(4),
]


@pytest.mark.parametrize("spec", MONOMIAL_SPACES)
def test_stack_is_monomial_equivariant(spec):
    """Nonlinearities are chosen per tensor (tanh where signs flip, ReLU where scales act)."""
    net = nfn()
    xs = random_features(spec.space, 3)
    ctx = torch.randn(len(spec.space), 2, dtype=torch.float64)
    element = spec.random_element(torch.Generator().manual_seed(0), log10_scale=3.0)
    assert monomial_equivariance_error(lambda x: net(spec, x, ctx), spec, xs, element) < 1e-12


def test_a_nonlinearity_that_ignores_signs_breaks_the_stack():
    spec = MONOMIAL_SPACES[0]
    net = nfn()
    xs = random_features(spec.space, 3)
    ctx = torch.randn(len(spec.space), 2, dtype=torch.float64)
    element = spec.random_element(torch.Generator().manual_seed(0))
    assert monomial_equivariance_error(lambda x: net(spec, x, ctx), spec, xs, element) < 1e-12
    nfopt.nn.nfn.EQUIVARIANT_ACTIVATIONS["sign"], saved = torch.relu_, nfopt.nn.nfn.EQUIVARIANT_ACTIVATIONS["sign"]
    try:
        assert monomial_equivariance_error(lambda x: net(spec, x, ctx), spec, xs, element) > 1e-3
    finally:
        nfopt.nn.nfn.EQUIVARIANT_ACTIVATIONS["sign"] = saved


@pytest.mark.parametrize("spec", MONOMIAL_SPACES)
def test_pool_is_monomial_invariant(spec):
    pool = InvariantPool(3)
    xs = random_features(spec.space, 3)
    v = pool(spec, xs)
    g = torch.Generator().manual_seed(1)
    for _ in range(3):
        moved = spec.act(xs, spec.random_element(g, log10_scale=3.0), leading=1)
        assert torch.allclose(pool(spec, moved), v, rtol=1e-10, atol=1e-12)
        assert not torch.allclose(pool(spec.space, moved), pool(spec.space, xs))  # the plain pool is not
    assert not torch.allclose(pool(spec, [x + 1.0 for x in xs]), v)
