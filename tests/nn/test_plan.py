"""The plan of a weight space: kinds, pooled subsets and neighbour relations per tensor, the terms a
monomial spec drops, canonical layouts, and the caches that keep a step free of Python work."""

from __future__ import annotations

import pytest
import torch

from nfopt.nn.plan import N_RELATIONS, SUBSET_SLOTS, bucket_plan_for, constant, from_canonical, plan_for, to_canonical
from nfopt.weight_space import KINDS, Kind

from ..weight_spaces import (
    cnn_spec,
    every_relation_spec,
    mlp_spec,
    monomial_mlp_spec,
    random_features,
    random_spec,
    relation,
)


def test_plan_of_an_mlp_layer_by_hand():
    """w0 (s1, s0), b0 (s1), w1 (s2, s1), b1 (s2): every term an NF-layer takes, written out."""
    plan = plan_for(mlp_spec([3, 4, 2]))
    matrix, vector = Kind(2, False), Kind(1, False)
    assert [p.kind for p in plan.tensors] == [KINDS.index(matrix), KINDS.index(vector)] * 2
    assert [p.subsets for p in plan.tensors] == [
        (((0,), SUBSET_SLOTS[(matrix, (0,))]), ((1,), SUBSET_SLOTS[(matrix, (1,))]), ((0, 1), SUBSET_SLOTS[(matrix, (0, 1))])),
        (((0,), SUBSET_SLOTS[(vector, (0,))]),),
    ] * 2
    rows, cols, entries = (matrix, 0), (matrix, 1), (vector, 0)
    # per tensor, per labelled axis: {relation: the (tensor, canonical axis) pairs it averages}
    assert [[dict(relations) for relations in p.neighbours] for p in plan.tensors] == [
        # w0's rows (s1) hear b0 and w1's columns; its columns (s0) are on a set nothing else has
        [{relation(rows, entries): ((1, 0),), relation(rows, cols): ((2, 1),)}, {}],
        [{relation(entries, rows): ((0, 0),), relation(entries, cols): ((2, 1),)}],
        # w1's rows (s2) hear b1; its columns (s1) hear w0's rows and b0
        [{relation(rows, entries): ((3, 0),)}, {relation(cols, rows): ((0, 0),), relation(cols, entries): ((1, 0),)}],
        [{relation(entries, rows): ((2, 0),)}],
    ]
    assert plan.pooled_axes == ((0, 0), (1, 0), (2, 0), (2, 1), (3, 0))
    assert plan.invariant == (0, 1, 2, 3) and plan.constants and plan.constant_mask == (1.0,) * 4
    assert all(p.factor_group == "none" and p.perm is None for p in plan.tensors)


def test_neighbours_of_one_relation_are_grouped():
    """Two tensors of one kind on the same set are averaged into one term, not two."""
    plan = plan_for(every_relation_spec())
    v0 = plan.tensors[2]  # a vector on s; every_relation_spec has two tensors of every kind on s
    for r, members in v0.neighbours[0]:
        assert len(members) == (1 if r == relation((Kind(1, False), 0), (Kind(1, False), 0)) else 2)


def test_every_relation_spec_reads_every_relation_and_subset():
    """The space the layer's gradient test uses: every weight of an NF-layer has a term to act in."""
    plan = plan_for(every_relation_spec())
    assert {r for p in plan.tensors for rels in p.neighbours for r, _ in rels} == set(range(N_RELATIONS))
    assert {slot for p in plan.tensors for _, slot in p.subsets} == set(SUBSET_SLOTS.values())
    assert {p.kind for p in plan.tensors} == set(range(len(KINDS)))


def test_monomial_plan_drops_exactly_the_terms_that_would_break():
    """On a sign-flip MLP: no constant on hidden tensors, no means over hidden axes, neighbours
    only where the other axes are still; scaled sets also keep neighbours of one exponent only."""
    sign, scale = plan_for(monomial_mlp_spec([5, 4, 6, 3], "sign")), plan_for(monomial_mlp_spec([5, 4, 6, 3], "scale"))
    plain = plan_for(mlp_spec([5, 4, 6, 3]))
    # tensors: w0 (s1, s0) b0 (s1) w1 (s2, s1) b1 (s2) w2 (s3, s2) b2 (s3); s1, s2 flip or scale
    assert [p.factor_group for p in sign.tensors] == ["sign"] * 5 + ["none"]
    assert sign.invariant == (5,) and not sign.constants and plain.constants
    assert sign.constant_mask == (0.0,) * 5 + (1.0,)
    assert [len(p.subsets) for p in sign.tensors] == [1, 0, 0, 0, 1, 1]  # w0 over s0, w2 over s3, b2
    assert [len(p.subsets) for p in plain.tensors] == [3, 1, 3, 1, 3, 1]
    # b0 (s1, +1) hears w0's row sums (s1, +1) in both; w1's column sums (s1, -1) only under signs
    assert {m for r in sign.tensors[1].neighbours[0] for m in r[1]} == {(0, 0)}
    assert {m for r in scale.tensors[1].neighbours[0] for m in r[1]} == {(0, 0)}
    # b1 (s2, +1): w1 rows would need a mean over s1 (moving): nothing; w2 columns (s2, -1) over s3
    assert {m for r in sign.tensors[3].neighbours[0] for m in r[1]} == {(4, 1)}
    assert scale.tensors[3].neighbours[0] == ()


@pytest.mark.parametrize("spec", [cnn_spec([2, 3, 4]), every_relation_spec(), *(random_spec(s) for s in range(6))])
def test_canonical_layout_puts_labelled_axes_first_and_round_trips(spec):
    xs = random_features(spec, 2)
    for x, t, p in zip(xs, spec.tensors, plan_for(spec).tensors):
        canonical = to_canonical(x, p)
        order = [a + 1 for a in t.labelled_axes + t.fixed_axes]
        assert torch.equal(canonical, x.permute(0, *order).reshape(2, *t.canonical_shape()))
        assert torch.equal(from_canonical(canonical, p, t.shape), x)


def test_plans_and_constants_are_made_once():
    assert plan_for(mlp_spec([3, 4, 2])) is plan_for(mlp_spec([3, 4, 2]))  # equal specs share one plan
    like = torch.zeros(1, dtype=torch.float64)
    c = constant([1.0, 0.5], like)
    assert c is constant((1.0, 0.5), like) and c.dtype == torch.float64
    assert torch.equal(c, torch.tensor([1.0, 0.5], dtype=torch.float64))
    assert constant([1.0, 0.5], like.float()).dtype == torch.float32


def test_buckets_group_tensors_of_one_shape_and_terms_and_index_every_neighbour():
    """A deep MLP's hidden layers share one bucket per tensor shape; every neighbour pair the
    per-tensor plan lists appears in the flat index, with the weight of its relation's mean."""
    spec = mlp_spec([5, 8, 8, 8, 8, 3])
    plan, buckets = plan_for(spec), bucket_plan_for(spec)
    by_tensor = {ti: b for b in buckets.buckets for ti in b.members}
    assert sorted(buckets.order) == list(range(len(spec.tensors)))
    for b in buckets.buckets:
        for i in b.members:
            p = plan.tensors[i]
            assert spec.tensors[i].shape == b.shape
            assert (p.kind, p.perm, p.subsets, p.factor_group) == (b.plan.kind, b.plan.perm, b.plan.subsets, b.plan.factor_group)
    hidden = [i for i, t in enumerate(spec.tensors) if t.shape == (8, 8)]
    middle = [i for i in hidden if all(plan.tensors[i].neighbours)]
    assert len({id(by_tensor[i]) for i in middle}) == 1  # one bucket serves the middle layers
    nb = buckets.neighbours
    pairs = {(int(r), int(d)): float(w) for r, d, w in zip(nb.rows, nb.dst, nb.weight)}
    expected = sum(
        len(tensor_axes) * plan.tensors[ti].canonical[ax]
        for ti in range(len(spec.tensors))
        for ax, axis in enumerate(plan.tensors[ti].neighbours)
        for _, tensor_axes in axis
    )
    assert len(pairs) == len(nb.rows) == expected  # no pair lost or doubled
    assert int(nb.rows.max()) < nb.n_sources * len(nb.relations) and int(nb.dst.max()) < nb.n_targets
    assert all(0 < w <= 1 for w in pairs.values())


def test_buckets_of_a_monomial_spec_keep_flipping_and_still_tensors_apart():
    spec = monomial_mlp_spec([5, 4, 4, 3], "sign")
    plan, buckets = plan_for(spec), bucket_plan_for(spec)
    for b in buckets.buckets:
        assert len({plan.tensors[i].factor_group for i in b.members}) == 1
    assert {b.plan.factor_group for b in buckets.buckets} == {"none", "sign"}  # flipping and still tensors both present
