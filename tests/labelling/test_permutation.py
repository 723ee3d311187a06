"""The permutation labelling API: inferred coupled sets are symmetries of the model, found where
expected, given by hand, applied and checked."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

from nfopt.labelling.permutation import (
    ModelLabelling,
    invariance_error,
    label_explicit,
    label_model,
    permute_model_,
)
from nfopt.weight_space import WeightSpaceSpec

from ..zoo import ZOO
from .labels import TOL, Axis, assert_couplings, inferred, label_of

EXPECTED: dict[str, tuple[list[list[Axis]], list[Axis]]] = {
    # model: (groups of axes that must share one coupled set, axes that must be in no coupled set)
    "mlp1": ([], [("0.weight", 0), ("0.weight", 1), ("0.bias", 0)]),
    "mlp2_tanh": (
        [[("0.weight", 0), ("0.bias", 0), ("2.weight", 1)]], [("0.weight", 1), ("2.weight", 0), ("2.bias", 0)]
    ),
    "mlp4_mixed": (
        [[("0.weight", 0), ("0.bias", 0), ("2.weight", 1)],
         [("2.weight", 0), ("2.bias", 0), ("4.weight", 1)],
         [("4.weight", 0), ("4.bias", 0), ("6.weight", 1)]],
        [("6.weight", 0)],
    ),
    "mlp_layernorm": ([[("0.weight", 0), ("0.bias", 0), ("1.weight", 0), ("1.bias", 0), ("3.weight", 1)]], []),
    "mlp_batchnorm": (
        [[("fc1.weight", 0), ("bn.weight", 0), ("bn.running_mean", 0), ("bn.running_var", 0), ("fc2.weight", 1)]], []
    ),
    "resnet_mlp": (
        [[("fc_in.weight", 0), ("fc_in.bias", 0), ("blocks.0.2.weight", 0), ("blocks.1.0.weight", 1),
          ("blocks.1.2.bias", 0), ("head.weight", 1)],
         [("blocks.0.0.weight", 0), ("blocks.0.0.bias", 0), ("blocks.0.2.weight", 1)]],
        [("fc_in.weight", 1)],
    ),
    "cnn_flatten": (
        [[("0.weight", 0), ("0.bias", 0), ("1.weight", 0), ("1.running_mean", 0), ("1.running_var", 0),
          ("4.weight", 1)]],
        [("4.weight", 0), ("4.bias", 0), ("5.weight", 0), ("5.running_mean", 0), ("9.weight", 1)],
    ),
    "cnn_global_pool": (
        [[("0.weight", 0), ("1.weight", 0), ("1.running_var", 0), ("3.weight", 1)],
         [("3.weight", 0), ("3.bias", 0), ("7.weight", 1)]],
        [],
    ),
    "conv1d_net": (
        [[("conv1.weight", 0), ("conv1.bias", 0), ("conv2.weight", 1)],
         [("conv2.weight", 0), ("conv2.bias", 0), ("head.weight", 1)]],
        [],
    ),
    "resnet_cnn": (
        [[("stem.weight", 0), ("stem.bias", 0), ("conv1.weight", 1), ("conv2.weight", 0), ("bn2.weight", 0),
          ("bn2.running_mean", 0), ("head.weight", 1)],
         [("conv1.weight", 0), ("bn1.weight", 0), ("bn1.running_var", 0), ("conv2.weight", 1)]],
        [],
    ),
    "groupnorm_cnn": (
        [[("0.weight", 0), ("0.bias", 0), ("1.weight", 0), ("1.bias", 0), ("3.weight", 1)],
         [("6.weight", 0), ("7.weight", 0), ("7.bias", 0), ("11.weight", 1)]],
        [("3.weight", 0), ("4.weight", 0), ("4.bias", 0), ("6.weight", 1)],
    ),
    "depthwise_cnn": (
        [[("0.weight", 0), ("2.weight", 0), ("2.bias", 0), ("3.weight", 0), ("3.running_mean", 0), ("5.weight", 1)]],
        [("5.weight", 0), ("7.weight", 0), ("7.weight", 1), ("11.weight", 1)],
    ),
    "transformer": (
        [[("proj.weight", 0), ("proj.bias", 0), ("pos", 1), ("layer.self_attn.in_proj_weight", 1),
          ("layer.self_attn.out_proj.weight", 0), ("layer.self_attn.out_proj.bias", 0), ("layer.linear1.weight", 1),
          ("layer.linear2.weight", 0), ("layer.linear2.bias", 0), ("layer.norm1.weight", 0), ("layer.norm2.bias", 0),
          ("head.weight", 1)],
         [("layer.linear1.weight", 0), ("layer.linear1.bias", 0), ("layer.linear2.weight", 1)]],
        [("pos", 0), ("layer.self_attn.in_proj_weight", 0), ("layer.self_attn.in_proj_bias", 0),
         ("layer.self_attn.out_proj.weight", 1)],
    ),
    "transformer_stack": (
        [[("proj.weight", 0), ("encoder.layers.0.norm1.weight", 0), ("encoder.layers.0.linear2.weight", 0),
          ("encoder.layers.1.self_attn.in_proj_weight", 1), ("encoder.layers.1.linear2.bias", 0),
          ("encoder.norm.weight", 0), ("head.weight", 1)],
         [("encoder.layers.0.linear1.weight", 0), ("encoder.layers.0.linear2.weight", 1)],
         [("encoder.layers.1.linear1.bias", 0), ("encoder.layers.1.linear2.weight", 1)]],
        [],
    ),
    "attention_block": (
        [[("proj.weight", 0), ("attn.in_proj_weight", 1), ("attn.out_proj.weight", 0), ("attn.out_proj.bias", 0),
          ("norm.weight", 0), ("head.weight", 1)]],
        [("attn.in_proj_weight", 0), ("attn.bias_k", 1), ("attn.out_proj.weight", 1)],
    ),
    "embedding": (
        [[("emb.weight", 1), ("fc.weight", 1)], [("fc.weight", 0), ("fc.bias", 0), ("head.weight", 1)]],
        [("emb.weight", 0)],
    ),
    "weight_tying": ([[("emb.weight", 1), ("fc.weight", 0), ("fc.weight", 1), ("fc.bias", 0)]], [("emb.weight", 0)]),
    "shared_layer": (
        [[("fc_in.weight", 0), ("shared.weight", 0), ("shared.weight", 1), ("shared.bias", 0), ("head.weight", 1)]], []
    ),
    "unused_frozen": (
        [[("fc1.weight", 0), ("fc1.bias", 0), ("fc2.weight", 1)]],
        [("unused.weight", 0), ("unused.weight", 1), ("spare", 0)],
    ),
    "weird": (
        [[("fc2.weight", 0), ("fc2.bias", 0), ("fc3.weight", 1)]],
        [("fc1.weight", 0), ("fc2.weight", 1), ("fc3.weight", 0), ("fc4.weight", 1)],
    ),
    "untraceable_part": (
        [[("fc2.weight", 0), ("fc2.bias", 0), ("fc3.weight", 1)]], [("fc1.weight", 0), ("fc2.weight", 1)]
    ),
    "untraceable_root": (
        [[("body.0.weight", 0), ("body.0.bias", 0), ("body.2.weight", 1)]], [("body.2.weight", 0), ("head.1.weight", 1)]
    ),
    "train_only_flip": (
        [[("fc2.weight", 0), ("fc2.bias", 0), ("fc3.weight", 1)]], [("fc1.weight", 0), ("fc2.weight", 1)]
    ),
}


def axes_of(lab: ModelLabelling) -> dict[str, tuple]:
    """The labelling as label_explicit takes it."""
    return {t.name: t.axes for t in lab.params.tensors + lab.buffers.tensors}


def test_every_zoo_model_has_expectations() -> None:
    assert sorted(EXPECTED) == sorted(ZOO)


# ---- inferred labellings are symmetries of the model --------------------------------------------


@pytest.mark.parametrize("shaped", [True, False], ids=["example_inputs", "no_inputs"])
@pytest.mark.parametrize("name", sorted(ZOO))
def test_inferred_labelling_leaves_outputs_unchanged(name: str, shaped: bool) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the untraceable root warns without inputs
        model, x, lab = inferred(name, shaped)
    for seed in range(3):
        err = invariance_error(model, lab, (x,), trials=2, generator=torch.Generator().manual_seed(seed))
        assert err < TOL, f"{name}: a permutation of the inferred coupled sets changed the output by {err:.2e}"


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_inferred_couplings_are_the_expected_ones(name: str) -> None:
    _, _, lab = inferred(name)
    assert_couplings(lab, *EXPECTED[name], what=name)


def test_without_inputs_shape_free_couplings_remain() -> None:
    """Without shapes, what needs none still couples; a flatten or BatchNorm1d does not."""
    _, _, lab = inferred("mlp4_mixed", shaped=False)
    assert len(lab.coupled_sets) == 3
    _, _, lab = inferred("cnn_global_pool", shaped=False)
    assert label_of(lab, "3.weight", 0) not in lab.coupled_sets  # the flatten cannot be checked
    assert label_of(lab, "0.weight", 0) == label_of(lab, "3.weight", 1) in lab.coupled_sets
    _, _, lab = inferred("mlp_batchnorm", shaped=False)
    assert label_of(lab, "bn.weight", 0) not in lab.coupled_sets


def test_random_permutation_covers_buffers_and_only_coupled_sets() -> None:
    model, x, lab = inferred("cnn_flatten")
    perm = lab.random_permutation(torch.Generator().manual_seed(0))
    assert set(perm) == set(lab.coupled_sets) == {label_of(lab, "1.running_mean", 0)}
    permuted = copy.deepcopy(model)
    permute_model_(permuted, lab, perm)
    p = perm[label_of(lab, "1.running_mean", 0)]
    assert not torch.equal(p, torch.arange(len(p)))
    assert torch.equal(permuted[1].running_mean, model[1].running_mean[p])
    assert torch.equal(permuted[0].weight, model[0].weight[p])
    assert torch.equal(permuted[4].weight, model[4].weight[:, p])
    assert torch.equal(permuted[9].weight, model[9].weight)


# ---- the check has teeth ------------------------------------------------------------------------


def _couple(lab: ModelLabelling, axes: list[Axis], label: str = "wrong") -> dict[str, tuple]:
    """The labelling's axes with the given ones moved to one new set."""
    out = axes_of(lab)
    for name, axis in axes:
        labels = list(out[name])
        labels[axis] = label
        out[name] = tuple(labels)
    return out


WRONG_COUPLINGS = {
    "flatten_ignored": ("cnn_flatten", [("4.weight", 0), ("4.bias", 0), ("5.weight", 0), ("5.bias", 0),
                                        ("5.running_mean", 0), ("5.running_var", 0)]),
    "across_groupnorm_groups": ("groupnorm_cnn", [("3.weight", 0), ("3.bias", 0), ("4.weight", 0), ("4.bias", 0),
                                                 ("6.weight", 1)]),
    "across_flip": ("weird", [("fc1.weight", 0), ("fc1.bias", 0), ("fc2.weight", 1)]),
    "output_classes": ("mlp2_tanh", [("2.weight", 0), ("2.bias", 0)]),
    "packed_qkv_rows": ("transformer", [("layer.self_attn.in_proj_weight", 0), ("layer.self_attn.in_proj_bias", 0)]),
}


@pytest.mark.parametrize("case", sorted(WRONG_COUPLINGS))
def test_wrong_coupling_changes_outputs(case: str) -> None:
    name, axes = WRONG_COUPLINGS[case]
    model, x, lab = inferred(name)
    wrong = label_explicit(model, _couple(lab, axes))
    assert "wrong" in wrong.coupled_sets
    assert invariance_error(model, wrong, (x,), generator=torch.Generator().manual_seed(0)) > 1e-3


def test_buffers_left_out_of_a_coupling_change_outputs() -> None:
    model, x, lab = inferred("cnn_flatten")
    params_only = label_explicit(model, {t.name: t.axes for t in lab.params.tensors})
    assert invariance_error(model, params_only, (x,), generator=torch.Generator().manual_seed(0)) > 1e-3


# ---- independent labels -------------------------------------------------------------------------


def test_independent_labelling_shares_no_set() -> None:
    model, _ = ZOO["resnet_cnn"]()
    named = list(model.named_parameters())
    lab = ModelLabelling(WeightSpaceSpec.independent([p for _, p in named], [n for n, _ in named]))
    assert lab.coupled_sets == {} and lab.random_permutation() == {}
    assert all(len(axes) == 1 for axes in lab.params.set_members.values())


def test_nothing_to_couple_gives_the_independent_labelling() -> None:
    model, x, lab = inferred("mlp1")
    named = list(model.named_parameters())
    assert lab.params == WeightSpaceSpec.independent([p for _, p in named], [n for n, _ in named])


@pytest.mark.parametrize("name", sorted(ZOO))
def test_every_parameter_and_buffer_listed_in_order(name: str) -> None:
    model, x, lab = inferred(name)
    assert [(t.name, t.shape) for t in lab.params.tensors] == [(n, tuple(p.shape)) for n, p in model.named_parameters()]
    assert [t.name for t in lab.buffers.tensors] == [n for n, _ in model.named_buffers()]
    assert label_model(model, (x,)).params == lab.params


def test_labelling_leaves_the_model_as_it_was() -> None:
    model, x = ZOO["cnn_flatten"]()
    model.train()
    state = copy.deepcopy(model.state_dict())
    label_model(model, (x,))
    assert all(m.training for m in model.modules())
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_tied_parameter_listed_once() -> None:
    model, _, lab = inferred("weight_tying")
    assert [t.name for t in lab.params.tensors] == ["emb.weight", "fc.weight", "fc.bias"]
    assert model.out.weight is model.emb.weight


# ---- explicit labellings and bad input ----------------------------------------------------------


@pytest.mark.parametrize("name", ["mlp4_mixed", "cnn_flatten"])
def test_explicit_labelling_round_trips(name: str) -> None:
    model, x, lab = inferred(name)
    assert label_explicit(model, axes_of(lab)) == lab


def test_explicit_labelling_fills_in_independent_labels() -> None:
    model, x = ZOO["mlp2_tanh"]()
    lab = label_explicit(model, {"0.weight": ("h", "in"), "0.bias": ("h",), "2.weight": ("out", "h")})
    assert lab.coupled_sets == {"h": 7}
    assert label_of(lab, "2.bias", 0) == "2.bias:0"
    assert invariance_error(model, lab, (x,)) < TOL


@pytest.mark.parametrize(
    ("axes", "match"),
    [
        ({"0.wieght": ("a", "b")}, "no parameter or buffer named '0.wieght'"),
        ({"0.weight": ("a",)}, "1 axis labels for a tensor of shape"),
        ({"0.weight": ("a", "b"), "2.weight": ("a", "c")}, "neuron set .a. has size 7"),
        ({"0.bias": ("2.weight:0",)}, "reserved"),
        ({"0.weight": "ab"}, "a sequence of labels"),
    ],
)
def test_explicit_labelling_errors(axes: dict, match: str) -> None:
    model, _ = ZOO["mlp2_tanh"]()
    with pytest.raises(ValueError, match=match):
        label_explicit(model, axes)


def test_explicit_labelling_too_many_labelled_axes() -> None:
    model, _ = ZOO["cnn_flatten"]()
    with pytest.raises(ValueError, match="at most 2 are supported"):
        label_explicit(model, {"0.weight": ("a", "b", "c", None)})


@pytest.mark.parametrize(
    "param",
    [
        nn.Parameter(torch.randn(3, 3).to_sparse(), requires_grad=False),
        nn.Parameter(torch.randn(3, 3, dtype=torch.cfloat)),
    ],
    ids=["sparse", "complex"],
)
def test_sparse_or_complex_parameters_are_refused(param: nn.Parameter) -> None:
    model = nn.Linear(3, 3)
    model.extra = param
    with pytest.raises(ValueError, match="parameter extra is"):
        label_model(model)
    with pytest.raises(ValueError, match="parameter extra is"):
        label_explicit(model, {})


def test_label_model_needs_a_module() -> None:
    with pytest.raises(TypeError, match="needs an nn.Module"):
        label_model([torch.zeros(3)])  # type: ignore[arg-type]


def test_permute_model_refuses_what_does_not_fit() -> None:
    model, _, lab = inferred("mlp2_tanh")
    h = label_of(lab, "0.weight", 0)
    with pytest.raises(ValueError, match="no neuron set 'nope'"):
        permute_model_(model, lab, {"nope": torch.arange(3)})
    with pytest.raises(ValueError, match="LongTensor of shape \\(7,\\)"):
        permute_model_(model, lab, {h: torch.arange(6)})
    with pytest.raises(ValueError, match="not a permutation"):
        permute_model_(model, lab, {h: torch.zeros(7, dtype=torch.long)})
    other, _ = ZOO["mlp4_mixed"]()
    with pytest.raises(ValueError, match="does not fit the model's parameters"):
        permute_model_(other, lab, {})
    wider = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3))
    with pytest.raises(ValueError, match="does not fit the weight space"):
        permute_model_(wider, lab, {})


class _Recurrent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb, self.rnn, self.head = nn.Embedding(20, 16), nn.LSTMCell(16, 32), nn.Linear(32, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, _ = self.rnn(self.emb(x).mean(1))
        return self.head(h)


def test_modules_it_does_not_understand_are_named_in_one_warning() -> None:
    """A module with parameters that the inference reads as opaque (an LSTM cell) is named, with how
    many tensors that leaves coupled to nothing; a model it understands whole warns nothing."""
    with pytest.warns(UserWarning, match=r"does not understand 1 module\(s\) with parameters: rnn \(LSTMCell\).* 7 of 7") as caught:
        label_model(_Recurrent(), (torch.randint(0, 20, (2, 7)),))
    assert len(caught) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        label_model(nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)))


class _Untraceable(nn.Module):
    """Blocks in a ModuleList under a forward with data-dependent control flow (fx cannot trace it)."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 6)) for _ in range(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x) if x.sum() > -1e9 else x
        return x


def test_an_untraceable_model_is_labelled_by_the_blocks_in_its_containers_and_says_so() -> None:
    """A ModuleList is no unit of its own: the blocks in it are, so each block's hidden neurons are
    coupled (and a random group element leaves the outputs unchanged); one warning names the
    untraceable model whose submodules were labelled apart, and how many tensors couple to nothing."""
    torch.manual_seed(0)
    model, x = _Untraceable().double(), torch.randn(3, 6, dtype=torch.float64)
    with pytest.warns(UserWarning, match=r"cannot trace 1 module\(s\) with parameters: <model> \(_Untraceable\).* 2 of 8") as caught:
        lab = label_model(model, (x,))
    assert len(caught) == 1
    for b in range(2):
        hidden = label_of(lab, f"blocks.{b}.0.weight", 0)
        assert hidden is not None
        assert label_of(lab, f"blocks.{b}.0.bias", 0) == hidden == label_of(lab, f"blocks.{b}.2.weight", 1)
    assert label_of(lab, "blocks.0.0.weight", 0) != label_of(lab, "blocks.1.0.weight", 0)
    assert invariance_error(model, lab, (x,)) < TOL
