"""NF-layer stacks and the invariant head."""

from __future__ import annotations

import pytest
import torch

from nfopt.nfn import NFN, InvariantPool
from nfopt.weight_space import TensorSpec, WeightSpaceSpec

from .weight_spaces import cnn_spec, mlp_spec, random_features, random_spec

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
def test_pool_is_invariant_and_sees_the_input(spec):
    pool = InvariantPool(3)
    xs = random_features(spec, 3)
    perm = spec.random_permutation(torch.Generator().manual_seed(1))
    v = pool(spec, xs)
    assert v.shape == (pool.out_features,)
    assert torch.allclose(pool(spec, spec.permute(xs, perm, leading=1)), v, atol=1e-12)
    shifted = [x + 1.0 for x in xs]
    assert not torch.allclose(pool(spec, shifted), v)


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
    with pytest.raises(ValueError, match="does not fit the weight space"):
        WeightSpaceSpec.independent([(2, 3)]).check_tensors([torch.zeros(3, 2)])
    with pytest.raises(ValueError, match="neuron set 's' has size 3"):
        WeightSpaceSpec((TensorSpec((3,), ("s",)), TensorSpec((4,), ("s",))))
    with pytest.raises(ValueError, match="2 axis labels for a tensor of shape"):
        TensorSpec((3,), ("a", "b"))
    with pytest.raises(ValueError, match="unknown activation"):
        NFN(3, 4, 2, activation="swish")
    with pytest.raises(ValueError, match="at least one layer"):
        NFN(3, 4, 2, n_layers=0)
