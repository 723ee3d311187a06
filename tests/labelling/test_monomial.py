"""Monomial labelling: sign and scaling symmetries inferred where they hold, and only there."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from nfopt.labelling.monomial import (
    MonomialLabelling,
    act_model_,
    label_monomial,
    monomial_invariance_error,
)
from nfopt.weight_space import MonomialElement, MonomialSpec

from ..zoo import ZOO

TOL = 1e-9


def seeded(build):
    """Run a builder seeded, returning its model and input in float64."""
    torch.manual_seed(0)
    model, x = build()
    return model.double(), x.double()


def symmetry_of(lab: MonomialLabelling, name: str, axis: int) -> str:
    """What the set of a parameter axis admits: "perm", "sign" or "scale" ("none" if uncoupled)."""
    label = next(t.axes[axis] for t in lab.params.space.tensors if t.name == name)
    return lab.params.symmetry(label) if label in lab.labelling.coupled_sets else "none"


def exponents_of(lab: MonomialLabelling, name: str) -> tuple[int, ...]:
    index = next(i for i, t in enumerate(lab.params.space.tensors) if t.name == name)
    return lab.params.exponents[index]


def error(model: nn.Module, lab: MonomialLabelling, x: torch.Tensor, seed: int = 0) -> float:
    return monomial_invariance_error(model, lab, (x,), generator=torch.Generator().manual_seed(seed))


def mlp(activation: nn.Module) -> tuple[nn.Module, torch.Tensor]:
    return nn.Sequential(nn.Linear(5, 7), activation, nn.Linear(7, 3)), torch.randn(6, 5)


# ---- activations between two layers -------------------------------------------------------------

ACTIVATIONS = {
    "tanh": (nn.Tanh(), "sign"),
    "softsign": (nn.Softsign(), "sign"),
    "hardtanh": (nn.Hardtanh(-0.5, 0.5), "sign"),
    "hardtanh_asymmetric": (nn.Hardtanh(-0.5, 1.0), "perm"),
    "relu": (nn.ReLU(), "scale"),
    "leaky_relu": (nn.LeakyReLU(0.2), "scale"),
    "prelu": (nn.PReLU(), "scale"),
    "identity": (nn.Identity(), "scale"),
    "dropout": (nn.Dropout(0.3), "scale"),
    "relu6": (nn.ReLU6(), "perm"),
    "gelu": (nn.GELU(), "perm"),
    "sigmoid": (nn.Sigmoid(), "perm"),
    "silu": (nn.SiLU(), "perm"),
    "elu": (nn.ELU(), "perm"),
}


@pytest.mark.parametrize("case", sorted(ACTIVATIONS))
def test_activation_decides_the_symmetry(case: str) -> None:
    activation, expected = ACTIVATIONS[case]
    model, x = seeded(lambda: mlp(activation))
    lab = label_monomial(model, (x,))
    assert symmetry_of(lab, "0.weight", 0) == expected
    assert symmetry_of(lab, "0.weight", 1) == symmetry_of(lab, "2.weight", 0) == "none"
    assert error(model, lab, x) < TOL


def test_tanh_mlp_signs_and_exponents() -> None:
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc1, self.fc2, self.fc3 = nn.Linear(5, 7), nn.Linear(7, 6), nn.Linear(6, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc3(F.hardtanh(torch.tanh(self.fc2(torch.sin(self.fc1(x)).neg()))))

    model, x = seeded(lambda: (Net(), torch.randn(6, 5)))
    lab = label_monomial(model)
    assert symmetry_of(lab, "fc1.weight", 0) == symmetry_of(lab, "fc2.weight", 0) == "sign"
    assert exponents_of(lab, "fc1.weight") == exponents_of(lab, "fc2.weight") == (1, -1)
    assert exponents_of(lab, "fc1.bias") == exponents_of(lab, "fc2.bias") == (1,)
    assert exponents_of(lab, "fc3.weight")[1] == -1
    assert error(model, lab, x) < TOL


def test_functional_layers_and_scalar_factors_admit_scaling() -> None:
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w1, self.b1 = nn.Parameter(torch.randn(7, 5)), nn.Parameter(torch.randn(7))
            self.w2 = nn.Parameter(torch.randn(3, 7))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = F.leaky_relu(F.linear(x, self.w1, self.b1), 0.1).relu() * -2.0
            return F.linear(F.dropout(h, 0.2, self.training) / 3, self.w2)

    model, x = seeded(lambda: (Net(), torch.randn(6, 5)))
    lab = label_monomial(model)
    assert symmetry_of(lab, "w1", 0) == "scale"
    assert exponents_of(lab, "w1") == exponents_of(lab, "w2") == (1, -1) and exponents_of(lab, "b1") == (1,)
    assert error(model, lab, x) < TOL


# ---- what stays permutations only ---------------------------------------------------------------


@pytest.mark.parametrize("name", ["mlp_batchnorm", "mlp_layernorm", "transformer", "weight_tying", "groupnorm_cnn"])
def test_norms_attention_and_tied_weights_stay_permutations(name: str) -> None:
    model, x = ZOO[name]()
    lab = label_monomial(model, (x,))
    assert lab.labelling.coupled_sets
    assert lab.params.symmetries == ()
    assert error(model, lab, x) < TOL


def test_mixed_mlp_scales_only_the_relu_layer() -> None:
    model, x = ZOO["mlp4_mixed"]()  # ReLU, GELU, SiLU
    lab = label_monomial(model, (x,))
    assert [symmetry_of(lab, f"{i}.weight", 0) for i in (0, 2, 4)] == ["scale", "perm", "perm"]
    assert error(model, lab, x) < TOL


def test_residual_stream_stays_permutations_but_block_hidden_units_scale() -> None:
    model, x = ZOO["resnet_mlp"]()
    lab = label_monomial(model, (x,))
    assert symmetry_of(lab, "fc_in.weight", 0) == "perm"
    assert symmetry_of(lab, "blocks.0.0.weight", 0) == symmetry_of(lab, "blocks.1.0.weight", 0) == "scale"
    assert error(model, lab, x) < TOL


def test_parameter_used_outside_its_layer_stays_permutations() -> None:
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(5, 7), nn.Linear(7, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc2(F.relu(self.fc1(x))) + self.fc1.weight.square().sum()

    model, x = seeded(lambda: (Net(), torch.randn(6, 5)))
    lab = label_monomial(model, (x,))
    assert symmetry_of(lab, "fc1.weight", 0) == "perm"


def test_reduction_over_the_channels_stays_permutations() -> None:
    """A max over the hidden units is permutation-invariant, but scaling them changes it."""

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(5, 7), nn.Linear(7, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = F.relu(self.fc1(x))
            return self.fc2(h) + h.amax(-1, keepdim=True)

    model, x = seeded(lambda: (Net(), torch.randn(6, 5)))
    lab = label_monomial(model, (x,))
    assert symmetry_of(lab, "fc1.weight", 0) == "perm"
    label = next(iter(lab.labelling.coupled_sets))
    claimed = MonomialLabelling(MonomialSpec(lab.labelling.params, ((label, "scale"),)), lab.labelling)
    assert error(model, claimed, x) > 1e-3


# ---- CNNs ---------------------------------------------------------------------------------------


def relu_cnn() -> tuple[nn.Module, torch.Tensor]:
    layers = [
        nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(4, 6, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 3),
    ]
    return nn.Sequential(*layers), torch.randn(3, 2, 8, 8)


class TanhCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(2, 4, 3), nn.Conv2d(4, 5, 3, padding=1)
        self.head = nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.avg_pool2d(torch.tanh(self.conv1(x)), 2)
        return self.head(torch.tanh(self.conv2(h)).mean(dim=(2, 3)))


def test_relu_cnn_scales_conv_channels() -> None:
    model, x = seeded(relu_cnn)
    lab = label_monomial(model, (x,))
    assert symmetry_of(lab, "0.weight", 0) == symmetry_of(lab, "3.weight", 0) == "scale"
    assert exponents_of(lab, "3.weight") == (1, -1, 0, 0)
    assert exponents_of(lab, "7.weight") == (1, -1)
    assert error(model, lab, x) < TOL


def test_relu_cnn_without_inputs_cannot_check_the_flatten() -> None:
    model, x = seeded(relu_cnn)
    lab = label_monomial(model)
    assert symmetry_of(lab, "0.weight", 0) == "scale"
    assert symmetry_of(lab, "3.weight", 0) == "none"
    assert error(model, lab, x) < TOL


def test_tanh_cnn_flips_conv_channels() -> None:
    model, x = seeded(lambda: (TanhCNN(), torch.randn(3, 2, 8, 8)))
    lab = label_monomial(model, (x,))
    assert symmetry_of(lab, "conv1.weight", 0) == symmetry_of(lab, "conv2.weight", 0) == "sign"
    assert error(model, lab, x) < TOL


def test_functional_pools_and_view_by_size_keep_scaling() -> None:
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv1, self.conv2, self.head = nn.Conv2d(2, 4, 3), nn.Conv2d(4, 5, 3), nn.Linear(5, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = F.max_pool2d(F.relu(self.conv1(x)), 2)
            h = F.adaptive_max_pool2d(F.relu(self.conv2(h)), 1)
            return self.head(h.view(h.size(0), -1))

    model, x = seeded(lambda: (Net(), torch.randn(3, 2, 10, 10)))
    lab = label_monomial(model, (x,))
    assert symmetry_of(lab, "conv1.weight", 0) == symmetry_of(lab, "conv2.weight", 0) == "scale"
    assert error(model, lab, x) < TOL


def test_batchnorm_cnn_stays_permutations() -> None:
    model, x = ZOO["cnn_global_pool"]()  # conv-BN-ReLU, then conv-ReLU-pool-head
    lab = label_monomial(model, (x,))
    assert symmetry_of(lab, "0.weight", 0) == "perm"
    assert symmetry_of(lab, "3.weight", 0) == "scale"
    assert error(model, lab, x) < TOL


@pytest.mark.parametrize("name", sorted(ZOO))
def test_inferred_symmetries_hold_on_the_zoo(name: str) -> None:
    model, x = ZOO[name]()
    lab = label_monomial(model, (x,))
    assert error(model, lab, x, seed=1) < TOL


# ---- the check has teeth ------------------------------------------------------------------------


def claim(lab: MonomialLabelling, name: str, symmetry: str, exponents: dict[str, tuple[int, ...]] | None = None):
    """The labelling with the set of ``name``'s axis 0 claimed to admit ``symmetry``."""
    space = lab.labelling.params
    label = next(t.axes[0] for t in space.tensors if t.name == name)
    rows = [exponents.get(t.name, row) if exponents else row for t, row in zip(space.tensors, lab.params.exponents)]
    return MonomialLabelling(MonomialSpec(space, ((label, symmetry),), tuple(rows)), lab.labelling)


@pytest.mark.parametrize(
    "activation, wrong", [(nn.Tanh(), "scale"), (nn.ReLU(), "sign"), (nn.GELU(), "scale"), (nn.GELU(), "sign")]
)
def test_wrong_claim_changes_outputs(activation: nn.Module, wrong: str) -> None:
    model, x = seeded(lambda: mlp(activation))
    lab = label_monomial(model, (x,))
    assert error(model, claim(lab, "0.weight", wrong), x) > 1e-3


def test_wrong_exponent_changes_outputs() -> None:
    model, x = seeded(lambda: mlp(nn.ReLU()))
    lab = label_monomial(model, (x,))
    assert error(model, claim(lab, "0.weight", "scale"), x) < TOL
    assert error(model, claim(lab, "0.weight", "scale", {"2.weight": (1, 1)}), x) > 1e-3
    assert error(model, claim(lab, "0.weight", "scale", {"0.bias": (-1,)}), x) > 1e-3


# ---- group elements -----------------------------------------------------------------------------


def test_random_element_moves_only_claimed_sets() -> None:
    model, x = ZOO["mlp4_mixed"]()  # sets: scale (ReLU), perm (GELU, SiLU), and uncoupled ends
    lab = label_monomial(model, (x,))
    g = lab.random_element(torch.Generator().manual_seed(0), log10_scale=3.0)
    assert set(g.perm) == set(lab.labelling.coupled_sets)
    assert set(g.factors) == set(lab.params.space.set_sizes)
    for label, f in g.factors.items():
        if lab.params.symmetry(label) == "scale":
            assert bool((f > 1e-3).all() and (f < 1e3).all()) and f.max() / f.min() > 10
        else:
            assert torch.equal(f, torch.ones_like(f)), f"set {label} is not claimed but its factors move"

    tanh_model, x = seeded(lambda: mlp(nn.Tanh()))
    signs = label_monomial(tanh_model).random_element(torch.Generator().manual_seed(0)).factors
    assert {float(v) for f in signs.values() for v in f} == {-1.0, 1.0}


def test_act_model_scales_parameters_and_only_permutes_buffers() -> None:
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc1, self.fc2, self.bn = nn.Linear(5, 7), nn.Linear(7, 4), nn.BatchNorm1d(4)
            self.head = nn.Linear(4, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.bn(self.fc2(F.relu(self.fc1(x)))))

    model, x = seeded(lambda: (Net(), torch.randn(6, 5)))
    model.bn.running_mean.normal_()
    lab = label_monomial(model, (x,))
    assert symmetry_of(lab, "fc1.weight", 0) == "scale" and symmetry_of(lab, "fc2.weight", 0) == "perm"
    g = lab.random_element(torch.Generator().manual_seed(0))
    moved = Net().double()
    moved.load_state_dict(model.state_dict())
    act_model_(moved, lab, g)
    hidden, out = (lab.labelling.params.tensors[i].axes[0] for i in (0, 2))  # fc1.weight, fc2.weight
    p, f = g.perm[hidden], g.factors[hidden]
    assert torch.allclose(moved.fc1.weight, model.fc1.weight[p] * f[:, None])
    assert torch.allclose(moved.fc2.weight, model.fc2.weight[g.perm[out]][:, p] / f)
    assert torch.equal(moved.bn.running_mean, model.bn.running_mean[g.perm[out]])
    assert error(model, lab, x) < TOL


def test_invalid_claims_and_factors_are_rejected() -> None:
    model, x = ZOO["mlp_batchnorm"]()
    lab = label_monomial(model, (x,))
    with pytest.raises(ValueError, match="buffer"):
        claim(lab, "fc1.weight", "scale")
    model, x = seeded(lambda: mlp(nn.Tanh()))
    lab = label_monomial(model, (x,))
    g = lab.random_element()
    label = next(iter(lab.params.symmetries))[0]
    with pytest.raises(ValueError, match="±1"):
        act_model_(model, lab, MonomialElement(g.perm, {**g.factors, label: torch.full((7,), 2.0)}))
