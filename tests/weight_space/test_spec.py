"""Labelled weight spaces: validation, tensor kinds and canonical shapes, independent labels, group elements."""

from __future__ import annotations

import pytest
import torch

from nfopt.weight_space import KINDS, Kind, TensorSpec, WeightSpaceSpec, inverse_permutation

from ..weight_spaces import cnn_spec, every_relation_spec, mlp_spec, random_features, random_spec

SPACES = {
    "mlp": mlp_spec([3, 4, 2]),
    "cnn": cnn_spec([2, 3, 4]),
    "every_relation": every_relation_spec(),
    **{f"random{s}": random_spec(s) for s in range(4)},
}


def test_bad_specs_say_what_is_wrong():
    with pytest.raises(ValueError, match="2 axis labels for a tensor of shape"):
        TensorSpec((3,), ("a", "b"))
    with pytest.raises(ValueError, match="3 labelled axes; at most 2"):
        TensorSpec((2, 2, 2), ("a", "b", "c"), "t")
    with pytest.raises(ValueError, match="neuron set 's' has size 3 on tensor a but size 4 on axis 0 of tensor b"):
        WeightSpaceSpec((TensorSpec((3,), ("s",), "a"), TensorSpec((4,), ("s",), "b")))
    with pytest.raises(TypeError, match="tensor 1: expected a TensorSpec"):
        WeightSpaceSpec((TensorSpec((3,), ("s",)), (3,)))
    with pytest.raises(ValueError, match="1 names for 2 tensors"):
        WeightSpaceSpec.independent([(2,), (3,)], names=["a"])


def test_one_set_may_label_axes_of_one_size_only():
    """The sizes of a set are checked across tensors and within one (a square matrix)."""
    assert WeightSpaceSpec((TensorSpec((3, 3), ("s", "s")),)).set_sizes == {"s": 3}
    with pytest.raises(ValueError, match="neuron set 's' has size 3 on tensor 0 but size 4 on axis 1 of tensor 0"):
        WeightSpaceSpec((TensorSpec((3, 4), ("s", "s")),))


def test_kinds_and_canonical_shapes():
    """Labelled axes come first, in order, then every fixed axis merged into one: a conv kernel of
    any size is one kind."""
    for k in (1, 3, 5):
        conv = TensorSpec((5, 4, k, k), ("out", "in", None, None))
        assert conv.kind == Kind(2, True) and conv.canonical_shape() == (5, 4, k * k)
    fixed_first = TensorSpec((3, 7, 2), (None, "a", None))
    assert fixed_first.labelled_axes == (1,) and fixed_first.fixed_axes == (0, 2)
    assert fixed_first.kind == Kind(1, True) and fixed_first.canonical_shape() == (7, 6)
    assert TensorSpec((4,), ("a",)).kind == Kind(1, False) and TensorSpec((4,), ("a",)).canonical_shape() == (4,)
    assert TensorSpec((), ()).kind == Kind(0, False) and TensorSpec((), ()).canonical_shape() == ()
    assert TensorSpec((2, 3), (None, None)).kind == Kind(0, True)
    assert TensorSpec((2, 3, 4), ("a", None, "b")).numel == 24
    assert Kind(2, True).subsets() == ((0,), (1,), (0, 1))
    assert Kind(1, False).subsets() == ((0,),) and Kind(0, True).subsets() == ()
    assert set(KINDS) == {Kind(n, f) for n in range(3) for f in (False, True)}
    assert all(t.kind in KINDS for spec in SPACES.values() for t in spec.tensors)


def test_set_sizes_and_members():
    spec = mlp_spec([3, 4, 2])  # w0 (s1, s0), b0 (s1), w1 (s2, s1), b1 (s2)
    assert spec.set_sizes == {"s0": 3, "s1": 4, "s2": 2}
    assert spec.set_members == {"s0": ((0, 1),), "s1": ((0, 0), (1, 0), (2, 1)), "s2": ((2, 0), (3, 0))}
    assert len(spec) == 4


@pytest.mark.parametrize("name", sorted(SPACES))
def test_independent_gives_every_tensor_its_own_sets(name):
    shapes = [t.shape for t in SPACES[name].tensors]
    spec = WeightSpaceSpec.independent(shapes)
    assert [t.shape for t in spec.tensors] == shapes
    for i, t in enumerate(spec.tensors):
        assert t.labelled_axes == tuple(range(min(len(t.shape), 2)))  # the first two axes; the rest fixed
        for ax in t.labelled_axes:
            assert spec.set_members[t.axes[ax]] == ((i, ax),)  # no other axis, of any tensor, on its set
    named = WeightSpaceSpec.independent([torch.zeros(2, 3, 4)], names=["conv"])
    assert named.tensors == (TensorSpec((2, 3, 4), ("conv:0", "conv:1", None), "conv"),)


def test_equal_specs_are_equal_and_hash_alike():
    """Specs key the layers' plan cache: equal specs must find the same entry."""
    assert mlp_spec([3, 4, 2]) == mlp_spec([3, 4, 2]) and hash(mlp_spec([3, 4, 2])) == hash(mlp_spec([3, 4, 2]))
    assert mlp_spec([3, 4, 2]) != mlp_spec([3, 5, 2])


def test_check_tensors_names_the_tensor_that_does_not_fit():
    spec = WeightSpaceSpec.independent([(2, 3), (4,)], names=["w", "b"])
    ok = [torch.zeros(2, 3), torch.zeros(4)]
    spec.check_tensors(ok)
    spec.check_tensors([x[None] for x in ok], leading=1)
    cases = [
        ([ok[0]], "expected 2 tensors for this weight space, got 1"),
        ([torch.zeros(3, 2), ok[1]], r"tensor w: shape \(3, 2\) does not fit the weight space, which expects \(2, 3\)"),
        ([ok[0], [0.0] * 4], "tensor b: expected a torch.Tensor, got list"),
        ([ok[0].to(torch.complex64), ok[1]], "tensor w: complex tensors are not supported"),
        ([ok[0], ok[1].to_sparse()], "tensor b: sparse tensors are not supported"),
    ]
    for tensors, match in cases:
        with pytest.raises((ValueError, TypeError), match=match):
            spec.check_tensors(tensors)
    with pytest.raises(ValueError, match=r"expects \(4,\) after 1 channel axis"):
        spec.check_tensors([ok[0][None], ok[1]], leading=1)


def test_permute_moves_every_axis_of_a_set_and_nothing_else():
    spec = WeightSpaceSpec(
        (
            TensorSpec((3, 2, 2), ("h", "in", None), "w"),
            TensorSpec((3,), ("h",), "b"),
            TensorSpec((4, 3), ("out", "h"), "v"),
        )
    )
    w, b, v = (torch.randn(2, *t.shape) for t in spec.tensors)  # a leading channel axis rides along
    p = torch.tensor([2, 0, 1])
    pw, pb, pv = spec.permute([w, b, v], {"h": p}, leading=1)  # sets not named stay in place
    assert torch.equal(pw, w[:, p]) and torch.equal(pb, b[:, p]) and torch.equal(pv, v[:, :, p])
    assert torch.equal(inverse_permutation({"h": p})["h"], torch.tensor([1, 2, 0]))


def test_a_blocked_axis_holds_its_set_once_per_block():
    """An LSTM-like weight: its rows are 4 blocks of the set h; a permutation of h moves the rows
    of every block alike, and the set's size is a block's."""
    spec = WeightSpaceSpec((TensorSpec((8, 3), ("h", "in"), "w", blocks=4), TensorSpec((5, 2), ("out", "h"), "v")))
    assert spec.set_sizes == {"h": 2, "in": 3, "out": 5}
    w, v = torch.randn(8, 3), torch.randn(5, 2)
    p = torch.tensor([1, 0])
    pw, pv = spec.permute([w, v], {"h": p})
    assert torch.equal(pw, w.reshape(4, 2, 3)[:, p].reshape(8, 3)) and torch.equal(pv, v[:, p])
    assert WeightSpaceSpec.batch([spec]).tensors[0].blocks == 4
    assert spec.split_blocks().tensors[:4] == tuple(TensorSpec((2, 3), ("h", "in"), f"w[{i}]") for i in range(4))
    with pytest.raises(ValueError, match="holds 4 blocks; NF-layers read the blocks as tensors of their own"):
        spec.tensors[0].kind
    with pytest.raises(ValueError, match="3 blocks need a labelled first axis whose size they divide"):
        TensorSpec((8, 3), ("h", "in"), "w", blocks=3)
    with pytest.raises(ValueError, match="2 blocks need a labelled first axis"):
        TensorSpec((8, 3), (None, "in"), "w", blocks=2)
    with pytest.raises(ValueError, match="blocks must be a positive int"):
        TensorSpec((8, 3), ("h", "in"), "w", blocks=0)


@pytest.mark.parametrize("name", sorted(SPACES))
def test_random_permutation_is_one_permutation_per_set(name):
    spec = SPACES[name]
    perm = spec.random_permutation(torch.Generator().manual_seed(1))
    assert set(perm) == set(spec.set_sizes)
    for label, p in perm.items():
        assert sorted(p.tolist()) == list(range(spec.set_sizes[label]))
    again = spec.random_permutation(torch.Generator().manual_seed(1))
    assert all(torch.equal(perm[k], again[k]) for k in perm)


@pytest.mark.parametrize("name", sorted(SPACES))
def test_permute_then_inverse_is_the_identity_and_a_wrong_inverse_is_not(name):
    spec = SPACES[name]
    xs = random_features(spec, 2)
    perm = spec.random_permutation(torch.Generator().manual_seed(0))
    back = spec.permute(spec.permute(xs, perm, leading=1), inverse_permutation(perm), leading=1)
    assert all(torch.equal(a, b) for a, b in zip(back, xs))
    # A cycle of length n > 2 is not its own inverse: applying it twice must not come back.
    cycle = {label: torch.roll(torch.arange(n), 1) for label, n in spec.set_sizes.items()}
    assert any(n > 2 for n in spec.set_sizes.values())
    twice = spec.permute(spec.permute(xs, cycle, leading=1), cycle, leading=1)
    assert not all(torch.equal(a, b) for a, b in zip(twice, xs))
    undone = spec.permute(spec.permute(xs, cycle, leading=1), inverse_permutation(cycle), leading=1)
    assert all(torch.equal(a, b) for a, b in zip(undone, xs))


def test_a_batch_renames_sets_apart_and_marks_components() -> None:
    a = WeightSpaceSpec((TensorSpec((3, 2), ("h", "x"), "w"), TensorSpec((3,), ("h",), "b")))
    b = WeightSpaceSpec((TensorSpec((4, 2), ("h", "x"), "w"),))
    both = WeightSpaceSpec.batch([a, b])
    assert both.components == (0, 0, 1)
    assert [t.axes for t in both.tensors] == [((0, "h"), (0, "x")), ((0, "h"),), ((1, "h"), (1, "x"))]
    assert both.set_sizes[(0, "h")] == 3 and both.set_sizes[(1, "h")] == 4  # "h" is two sets now
    assert both != WeightSpaceSpec(both.tensors) and hash(both) != hash(WeightSpaceSpec(both.tensors))
    with pytest.raises(ValueError, match="cannot hold another batch"):
        WeightSpaceSpec.batch([both])
    with pytest.raises(ValueError, match="2 components for 3 tensors"):
        WeightSpaceSpec(both.tensors, (0, 1))
