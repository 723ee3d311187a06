"""Monomial specs: validation, random group elements, their action, and sign/scale invariants."""

from __future__ import annotations

import pytest
import torch

from nfopt.weight_space import MonomialSpec, as_monomial, sign_scale_invariants
from nfopt.weight_space import TensorSpec, WeightSpaceSpec

from ..weight_spaces import mlp_spec, monomial_cnn_spec, monomial_mlp_spec, random_features, random_monomial_spec


def test_a_blocked_set_admits_permutations_only():
    """Sign flips of an LSTM's hidden neurons act on its gate blocks differently (the tanh gate
    flips, the sigmoid gates do not), which exponents per axis cannot say: such a claim is refused."""
    space = WeightSpaceSpec((TensorSpec((8, 3), ("h", "in"), "w", blocks=4), TensorSpec((5, 2), ("out", "h"), "v")))
    with pytest.raises(ValueError, match="tensor w: the set of its blocked first axis"):
        MonomialSpec(space, (("h", "sign"),))
    signed = MonomialSpec(space, (("in", "sign"),), ((1, -1), (1, 1)))
    assert signed.split_blocks().exponents == ((1, -1),) * 4 + ((1, 1),)


def test_bad_specs_say_what_is_wrong():
    space = mlp_spec([3, 4, 2])
    with pytest.raises(ValueError, match="not in the weight space"):
        MonomialSpec(space, (("nope", "sign"),))
    with pytest.raises(ValueError, match="unknown symmetry"):
        MonomialSpec(space, (("s1", "rotate"),))
    with pytest.raises(ValueError, match="exponent 2 on a labelled axis"):
        MonomialSpec(space, (("s1", "sign"),), ((2, -1), (1,), (1, -1), (1,)))
    with pytest.raises(ValueError, match="3 exponent tuples for 4 tensors"):
        MonomialSpec(space, (), ((1, -1), (1,), (1, -1)))
    with pytest.raises(TypeError, match="WeightSpaceSpec"):
        MonomialSpec([1, 2])


def test_default_exponents_and_characters():
    spec = MonomialSpec(
        WeightSpaceSpec((TensorSpec((4, 3, 2), ("a", "b", None), "conv"), TensorSpec((4,), ("a",), "bias"))),
        (("a", "scale"), ("b", "perm")),
    )
    assert spec.exponents == ((1, -1, 0), (1,))
    assert spec.characters == ((("a", 1),), (("a", 1),))
    assert spec.symmetry("a") == "scale" and spec.symmetry("b") == "perm"
    assert spec.symmetries == (("a", "scale"),)
    assert spec.factor_group(0) == "scale"
    assert as_monomial(spec.space) == MonomialSpec.permutations_only(spec.space)
    assert hash(spec) == hash(MonomialSpec(spec.space, (("a", "scale"),)))


def test_random_elements_draw_from_each_sets_group():
    spec = MonomialSpec(mlp_spec([3, 50, 50, 2]), (("s1", "sign"), ("s2", "scale")))
    g = spec.random_element(torch.Generator().manual_seed(0), log10_scale=2.0)
    assert set(g.factors["s1"].tolist()) == {-1.0, 1.0}
    s2 = g.factors["s2"].log10()
    assert s2.min() > -2 and s2.max() < 2 and s2.max() - s2.min() > 2  # spread over orders of magnitude
    assert torch.equal(g.factors["s0"], torch.ones(3)) and torch.equal(g.factors["s3"], torch.ones(2))
    assert sorted(g.perm["s1"].tolist()) == list(range(50))


def test_act_multiplies_incoming_and_divides_outgoing_weights():
    spec = monomial_mlp_spec([2, 3, 2], "scale")
    w0, b0, w1, b1 = (torch.randn(*t.shape, dtype=torch.float64) for t in spec.space.tensors)
    g = spec.random_element(torch.Generator().manual_seed(1))
    d, p = g.factors["s1"], g.perm["s1"]
    v0, c0, v1, c1 = spec.act([w0, b0, w1, b1], g)
    q0, q2 = g.perm["s0"], g.perm["s2"]
    assert torch.allclose(v0, d[:, None] * w0[p][:, q0])
    assert torch.allclose(c0, d * b0[p])
    assert torch.allclose(v1, w1[q2][:, p] / d[None, :])
    assert torch.allclose(c1, b1[q2])


@pytest.mark.parametrize(
    "spec",
    [monomial_mlp_spec([3, 4, 5, 2], "scale"), monomial_mlp_spec([3, 4, 2], "sign"), monomial_cnn_spec([2, 3, 4], "scale")]
    + [random_monomial_spec(s) for s in range(12)],
)
def test_invariants_are_invariant_and_permute_along(spec):
    xs = random_features(spec.space, 2)
    base = sign_scale_invariants(spec, xs)
    g = spec.random_element(torch.Generator().manual_seed(3), log10_scale=3.0)
    moved = sign_scale_invariants(spec, spec.act(xs, g, leading=1))
    for a, b in zip(spec.space.permute(base, g.perm, leading=1), moved):
        assert torch.allclose(a, b, rtol=1e-9, atol=1e-12)


def test_invariants_of_an_mlp_by_hand():
    """Scalings: each hidden neuron's incoming weights and bias are divided by their RMS and its outgoing
    weights multiplied by it. Sign flips: absolute values. Tensors that only permute stay as they are."""
    xs = random_features(mlp_spec([2, 3, 2]), 2)
    w0, b0, w1, b1 = xs
    rms = ((w0.square().sum(2) + b0.square()) / 3).sqrt()  # (channel, neuron of s1): 2 weights and a bias each
    expected = [w0 / rms[:, :, None], b0 / rms, w1 * rms[:, None, :], b1]
    for got, want in zip(sign_scale_invariants(monomial_mlp_spec([2, 3, 2], "scale"), xs), expected, strict=True):
        assert torch.allclose(got, want, rtol=1e-12, atol=0)
    signs = sign_scale_invariants(monomial_mlp_spec([2, 3, 2], "sign"), xs)
    assert all(torch.equal(got, want) for got, want in zip(signs, [w0.abs(), b0.abs(), w1.abs(), b1], strict=True))


def test_invariants_refuse_scalings_they_cannot_undo():
    space = WeightSpaceSpec((TensorSpec((3, 3), ("a", "a"), "square"),))
    with pytest.raises(ValueError, match="cannot undo the scalings"):
        sign_scale_invariants(MonomialSpec(space, (("a", "scale"),)), [torch.randn(1, 3, 3)])
