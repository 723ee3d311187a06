"""The shared NF-layer: its documented map, equivariance, coupling that really exists, width and depth sharing."""

from __future__ import annotations

import pytest
import torch

from nfopt.labelling import label_model
from nfopt.nn.layer import NFLayer
from nfopt.nn.plan import SUBSET_SLOTS
from nfopt.weight_space import KINDS, TensorSpec, WeightSpaceSpec

from ..weight_spaces import (
    cnn_spec,
    every_relation_spec,
    mlp_spec,
    monomial_cnn_spec,
    monomial_equivariance_error,
    monomial_mlp_spec,
    random_features,
    random_monomial_spec,
    random_spec,
    relation,
)
from ..zoo import ZOO

SPACES = {
    "mlp": mlp_spec([5, 4, 6, 3]),
    "mlp_deep": mlp_spec([3, 4, 4, 4, 4, 2]),
    "cnn": cnn_spec([2, 3, 4]),
    "every_relation": every_relation_spec(),
    **{f"random{s}": random_spec(s) for s in range(6)},
}


def layer(cin=3, cout=4, ctx=2, pooled=True) -> NFLayer:
    torch.manual_seed(0)
    return NFLayer(cin, cout, context_channels=ctx, pooled=pooled).double()


def max_equivariance_error(f, spec, xs, perm) -> float:
    lhs = f(spec.permute(xs, perm, leading=1))
    rhs = spec.permute(f(xs), perm, leading=1)
    return max((a - b).abs().max().item() for a, b in zip(lhs, rhs)) if lhs else 0.0


@pytest.mark.parametrize("name", sorted(SPACES))
def test_equivariant_to_every_permutation_of_every_set(name):
    spec = SPACES[name]
    nf = layer()
    xs = random_features(spec, 3)
    ctx = torch.randn(len(spec), 2, dtype=torch.float64)
    g = torch.Generator().manual_seed(1)
    for _ in range(3):
        perm = spec.random_permutation(g)
        assert max_equivariance_error(lambda x: nf(spec, x, ctx), spec, xs, perm) < 1e-12


def test_outputs_actually_change_under_permutation():
    """Equivariance must not hold trivially: the permuted output differs from the unpermuted one."""
    spec = SPACES["mlp"]
    xs = random_features(spec, 3)
    ys = layer()(spec, xs, torch.zeros(len(spec), 2, dtype=torch.float64))
    perm = spec.random_permutation(torch.Generator().manual_seed(3))
    moved = spec.permute(ys, perm, leading=1)
    assert any((a - b).abs().max() > 1e-3 for a, b in zip(moved, ys))


def broken_permutation(spec: WeightSpaceSpec, tensor: int, axis: int, seed: int = 0) -> list:
    """A function applying a permutation to one axis of one tensor only, breaking its coupling."""
    n = spec.tensors[tensor].shape[axis]
    p = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    while torch.equal(p, torch.arange(n)):
        p = torch.randperm(n)

    def apply(xs):
        out = list(xs)
        out[tensor] = out[tensor].index_select(axis + 1, p)
        return out

    return apply


@pytest.mark.parametrize("tensor,axis", [(0, 0), (1, 0), (2, 1)])
def test_broken_coupling_fails_the_check(tensor, axis):
    """Permuting one tensor's axis but not the others sharing its set is no symmetry: the pooled
    and neighbour terms see it. The per-element ablation cannot, which shows where it comes from."""
    spec = SPACES["mlp"]
    xs = random_features(spec, 3)
    ctx = torch.zeros(len(spec), 2, dtype=torch.float64)
    apply = broken_permutation(spec, tensor, axis)
    for pooled, expect_equivariant in ((True, False), (False, True)):
        nf = layer(pooled=pooled)
        lhs = nf(spec, apply(xs), ctx)
        rhs = apply(nf(spec, xs, ctx))
        err = max((a - b).abs().max().item() for a, b in zip(lhs, rhs))
        assert (err < 1e-12) == expect_equivariant, (pooled, err)


def test_neighbour_terms_cross_tensors():
    """Changing one tensor's features changes a coupled neighbour's output, not an uncoupled one's."""
    spec = WeightSpaceSpec(
        (
            TensorSpec((3, 2), ("h", "in"), "w0"),
            TensorSpec((4, 3), ("out", "h"), "w1"),
            TensorSpec((5,), ("alone",), "x"),
        )
    )
    nf = layer(ctx=0)
    with torch.no_grad():
        nf.G.zero_()  # the global term couples everything; look at the neighbour terms alone
    xs = random_features(spec, 3)
    ys = nf(spec, xs)
    xs2 = [xs[0] + torch.randn_like(xs[0]), xs[1], xs[2]]
    ys2 = nf(spec, xs2)
    assert (ys2[1] - ys[1]).abs().max() > 1e-6
    assert torch.equal(ys2[2], ys[2])


def documented_map(nf: NFLayer, spec: WeightSpaceSpec, xs: list[torch.Tensor], ctx: torch.Tensor) -> list[torch.Tensor]:
    """The module docstring's map, term by term, on each tensor's own axes (no canonical layout):
    Y_t = A_k X_t + sum_S B_{k,S} mean_S(X_t) + sum_a N(a) + G_k g + E_k ctx_t + bias_k."""

    def mix(w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return torch.einsum("oc,c...->o...", w, x)

    def vector(ti: int, ax: int) -> torch.Tensor:
        """Tensor ti's features averaged over every axis but ``ax``: (C, n)."""
        dims = tuple(d for d in range(1, xs[ti].dim()) if d != ax + 1)
        return xs[ti].mean(dims) if dims else xs[ti]

    g = torch.stack([x.reshape(x.shape[0], -1).mean(1) for x in xs]).mean(0)
    out = []
    for ti, (t, x) in enumerate(zip(spec.tensors, xs)):
        k = KINDS.index(t.kind)
        per_tensor = nf.bias[k] + nf.E[k] @ ctx[ti] + nf.G[k] @ g
        y = mix(nf.A[k], x) + per_tensor.reshape(-1, *[1] * len(t.shape))
        for s in t.kind.subsets():
            y = y + mix(nf.B[SUBSET_SLOTS[(t.kind, s)]], x.mean(tuple(t.labelled_axes[c] + 1 for c in s), keepdim=True))
        for c, ax in enumerate(t.labelled_axes):
            heard: dict[int, list[torch.Tensor]] = {}  # relation -> vectors from every other axis on this set
            for tj, other in enumerate(spec.tensors):
                for cj, axj in enumerate(other.labelled_axes):
                    if (tj, axj) != (ti, ax) and other.axes[axj] == t.axes[ax]:
                        heard.setdefault(relation((t.kind, c), (other.kind, cj)), []).append(vector(tj, axj))
            broadcast = [1] * x.dim()
            broadcast[0], broadcast[ax + 1] = -1, t.shape[ax]
            for r, vectors in heard.items():
                y = y + (nf.N[r] @ torch.stack(vectors).mean(0)).reshape(broadcast)
        out.append(y)
    return out


WIDTHS_DEPTHS_AND_KERNELS = {
    **SPACES,
    **{f"mlp{'_'.join(map(str, w))}": mlp_spec(w) for w in ([3, 2], [3, 8, 2], [7, 16, 16, 16, 1])},
    **{f"cnn_kernel{k}": cnn_spec([2, 3], kernel=k) for k in (1, 5)},
}


def test_one_layer_computes_its_documented_map_on_every_width_depth_and_kernel():
    """One layer instance, one set of weights, applied to every space, computes the docstring's map."""
    nf = layer()
    with torch.no_grad():  # the bias starts at zero; make it visible
        nf.bias.normal_()
    for name, spec in WIDTHS_DEPTHS_AND_KERNELS.items():
        xs = random_features(spec, 3)
        ctx = torch.randn(len(spec), 2, dtype=torch.float64)
        for y, expected in zip(nf(spec, xs, ctx), documented_map(nf, spec, xs, ctx), strict=True):
            assert torch.allclose(y, expected, rtol=1e-10, atol=1e-12), name


def test_means_make_it_width_invariant():
    """Duplicating every hidden neuron duplicates the output: no term grows with the width."""
    narrow, wide = mlp_spec([3, 4, 2]), mlp_spec([3, 8, 2])
    xs = random_features(narrow, 3)
    w0, b0, w1, b1 = xs
    dup = [w0.repeat(1, 2, 1), b0.repeat(1, 2), w1.repeat(1, 1, 2), b1]
    nf = layer(ctx=0)
    small, big = nf(narrow, xs), nf(wide, dup)
    assert torch.allclose(big[0], small[0].repeat(1, 2, 1), atol=1e-12)
    assert torch.allclose(big[3], small[3], atol=1e-12)


def test_gradients_reach_every_weight():
    """On a space with every relation and subset (see the plan's tests), every weight has a gradient."""
    spec = every_relation_spec()
    nf = layer()
    ys = nf(spec, random_features(spec, 3), torch.randn(len(spec), 2, dtype=torch.float64))
    sum((y * torch.randn_like(y)).sum() for y in ys).backward()
    for name, p in nf.named_parameters():
        flat = p.grad.reshape(p.shape[0], -1)
        assert (flat.abs().sum(1) > 0).all(), f"{name} has slices no gradient reaches"


def test_conv_kernels_of_any_size_share_weights():
    nf = layer(ctx=0)
    for k in (1, 3, 5):
        spec = cnn_spec([2, 3], kernel=k)
        xs = random_features(spec, 3)
        perm = spec.random_permutation(torch.Generator().manual_seed(k))
        assert max_equivariance_error(lambda x: nf(spec, x), spec, xs, perm) < 1e-12


def test_bad_input():
    with pytest.raises(ValueError, match="channels must be positive"):
        NFLayer(0, 3)
    with pytest.raises(ValueError, match="expects a context"):
        layer(ctx=2)(SPACES["mlp"], random_features(SPACES["mlp"], 3))


@pytest.mark.parametrize("name", ["mlp", "cnn", "every_relation", "random3"])
def test_scale_is_the_same_as_scaling_the_inputs(name):
    spec = SPACES[name]
    nf = layer()
    xs = random_features(spec, 3)
    ctx = torch.randn(len(spec), 2, dtype=torch.float64)
    scale = torch.rand(len(spec), 3, dtype=torch.float64) + 0.5
    folded = nf(spec, xs, ctx, scale)
    direct = nf(spec, [x * s.reshape(-1, *[1] * (x.dim() - 1)) for x, s in zip(xs, scale)], ctx)
    for a, b in zip(folded, direct):
        assert torch.allclose(a, b, atol=1e-12)


@pytest.mark.parametrize("name", sorted(ZOO))
def test_equivariant_on_inferred_labellings(name):
    """On every zoo model's inferred labelling: the layer commutes with its claimed symmetries."""
    model, example = ZOO[name]()
    labelling = label_model(model, (example,))
    spec = labelling.params
    nf = layer(ctx=0)
    xs = random_features(spec, 3)
    g = torch.Generator().manual_seed(0)
    for _ in range(2):
        perm = labelling.random_permutation(g)
        assert max_equivariance_error(lambda x: nf(spec, x), spec, xs, perm) < 1e-12


MONOMIAL_SPACES = {
    "mlp_sign": monomial_mlp_spec([5, 4, 6, 3], "sign"),
    "mlp_scale": monomial_mlp_spec([5, 4, 6, 3], "scale"),
    "cnn_sign": monomial_cnn_spec([2, 3, 4], "sign"),
    "cnn_scale": monomial_cnn_spec([2, 3, 4], "scale"),
    **{f"random{s}": random_monomial_spec(s) for s in range(8)},
}


@pytest.mark.parametrize("name", sorted(MONOMIAL_SPACES))
def test_equivariant_to_signs_and_scales(name):
    """Given a monomial spec, the layer commutes with permutations, sign flips and scalings over
    six orders of magnitude."""
    spec = MONOMIAL_SPACES[name]
    nf = layer()
    xs = random_features(spec.space, 3)
    ctx = torch.randn(len(spec.space), 2, dtype=torch.float64)
    g = torch.Generator().manual_seed(2)
    for _ in range(3):
        element = spec.random_element(g, log10_scale=3.0)
        assert monomial_equivariance_error(lambda x: nf(spec, x, ctx), spec, xs, element) < 1e-12


@pytest.mark.parametrize("name", ["mlp_sign", "mlp_scale", "cnn_sign", "cnn_scale"])
def test_permutation_layer_is_not_monomial_equivariant(name):
    """The same weights applied with the permutation-only plan break under signs or scales, so the
    check above can fail."""
    spec = MONOMIAL_SPACES[name]
    nf = layer()
    xs = random_features(spec.space, 3)
    ctx = torch.randn(len(spec.space), 2, dtype=torch.float64)
    element = spec.random_element(torch.Generator().manual_seed(2), log10_scale=1.0)
    assert monomial_equivariance_error(lambda x: nf(spec.space, x, ctx), spec, xs, element) > 1e-3


def test_fewer_weights_act_under_the_monomial_group():
    """Weights that receive no gradient on a monomial spec are the ones its plan dropped."""
    spec = MONOMIAL_SPACES["mlp_scale"]
    used = {}
    for name, s in (("perm", spec.space), ("monomial", spec)):
        nf = layer(ctx=0)
        sum((y * torch.randn_like(y)).sum() for y in nf(s, random_features(spec.space, 3))).backward()
        used[name] = sum(int((p.grad != 0).sum()) for p in nf.parameters() if p.grad is not None)
    assert 0 < used["monomial"] < used["perm"]
