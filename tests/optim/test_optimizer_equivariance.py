"""Equivariance of behaviour: training a model whose hidden neurons are permuted gives the permuted
trajectory, with bare parameters and with the model handed over."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from nfopt import NFNOptimizer
from nfopt.labelling import label_model, permute_model_
from nfopt.labelling.monomial import act_model_, label_monomial
from nfopt.weight_space import inverse_permutation

from ..rules import open_rule


class Residual(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.inp = nn.Linear(5, width)
        self.block = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, 2 * width), nn.GELU(), nn.Linear(2 * width, width))
        self.out = nn.Linear(width, 3)

    def forward(self, x):
        h = self.inp(x)
        h = h + self.block(h)
        return self.out(torch.relu(h))


class TransformerBlock(nn.Module):
    def __init__(self, d: int = 8) -> None:
        super().__init__()
        self.embed = nn.Linear(5, d)
        self.layer = nn.TransformerEncoderLayer(d, nhead=2, dim_feedforward=12, dropout=0.0, batch_first=True)
        self.head = nn.Linear(d, 3)

    def forward(self, x):
        return self.head(self.layer(self.embed(x)).mean(1))


class Recurrent(nn.Module):
    """A two-layer RNN read from its final state: recurrent weights with one set on both axes."""

    def __init__(self) -> None:
        super().__init__()
        self.rnn = nn.RNN(5, 6, num_layers=2, batch_first=True)
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        return self.head(self.rnn(x)[1][-1])


class Gated(nn.Module):
    """An LSTM or GRU of two layers read at its last step: weights whose rows are gate blocks."""

    def __init__(self, kind: type[nn.RNNBase]) -> None:
        super().__init__()
        self.rnn = kind(5, 6, num_layers=2, batch_first=True)
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        return self.head(self.rnn(x)[0][:, -1])


MODELS = {
    "mlp": (lambda: nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 7), nn.ReLU(), nn.Linear(7, 3)), (16, 5)),
    "cnn_bn": (
        lambda: nn.Sequential(
            # No conv bias before BatchNorm: its gradient is rounding noise (~1e-17), and Adam's
            # direction m/(sqrt(v)+eps) turns noise into O(0.1) values that differ between the
            # twins by rounding, not by any failure of equivariance.
            nn.Conv2d(5, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU(),
            nn.Conv2d(4, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 3),
        ),
        (8, 5, 6, 6),
    ),
    "residual": (lambda: Residual(6), (16, 5)),
    "transformer": (TransformerBlock, (8, 4, 5)),
    "rnn": (Recurrent, (8, 4, 5)),
    "lstm": (lambda: Gated(nn.LSTM), (8, 4, 5)),
    "gru": (lambda: Gated(nn.GRU), (8, 4, 5)),
}


def batches(shape, n):
    g = torch.Generator().manual_seed(7)
    return [(torch.randn(*shape, generator=g, dtype=torch.float64), torch.randint(0, 3, (shape[0],), generator=g)) for _ in range(n)]


def train(model, opt, data):
    model.train()
    for x, y in data:
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()


def flat(model):
    floats = [b for b in model.buffers() if b.is_floating_point()]
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()] + [b.reshape(-1) for b in floats])


@pytest.mark.parametrize(
    "handed_over,config",
    [(False, {}), (True, {}), (True, {"gate_floor": 0.3}), (True, {"features": {"polar": True}}),
     (True, {"tensor_log_scale": 2.0})],
)
@pytest.mark.parametrize("name", sorted(MODELS))
def test_permuted_model_trains_to_the_permuted_trajectory(name, handed_over, config):
    """Permuting a model's hidden neurons permutes its trajectory under a rule whose NFN is far
    from Adam: bare and handed the model, with the gate, reading the polar factor of the
    momentum (which commutes with permutations of rows and columns), and with a per-tensor step
    factor (of RMS ratios, which permutations leave as they are)."""
    build, shape = MODELS[name]
    torch.manual_seed(0)
    model = build().double()
    data = batches(shape, 50)
    labelling = label_model(model, (data[0][0],))
    assert labelling.coupled_sets, "the test needs a labelling that couples something"
    perm = labelling.random_permutation(torch.Generator().manual_seed(1))
    twin = copy.deepcopy(model)
    permute_model_(twin, labelling, perm)
    assert (flat(twin) - flat(model)).abs().max() > 1e-3  # the twin really is permuted

    def optimizer(m):
        rule = open_rule(**config)
        if handed_over:
            return NFNOptimizer.for_model(m, rule=rule, example_inputs=(data[0][0],))
        return NFNOptimizer(m.parameters(), rule=rule)

    train(model, optimizer(model), data)
    train(twin, optimizer(twin), data)
    permute_model_(twin, labelling, inverse_permutation(perm))
    a, b = flat(model), flat(twin)
    assert (a - b).abs().max() / a.abs().max() < 1e-7


def test_handing_over_the_model_changes_the_updates():
    """With the model, the NFN couples layers: the trajectory differs from the bare-parameter one."""
    build, shape = MODELS["mlp"]
    torch.manual_seed(0)
    a = build().double()
    b = copy.deepcopy(a)
    data = batches(shape, 5)
    train(a, NFNOptimizer(a.parameters(), rule=open_rule()), data)
    train(b, NFNOptimizer.for_model(b, rule=open_rule()), data)
    assert (flat(a) - flat(b)).abs().max() > 1e-6


@pytest.mark.parametrize(
    "sign_flips,config",
    [(True, {}), (False, {}), (True, {"gate_floor": 0.3}), (True, {"features": {"polar": True}}),
     (True, {"tensor_log_scale": 2.0})],
)
def test_sign_flipped_tanh_model_trains_to_the_flipped_trajectory(sign_flips, config):
    """A rule meta-trained with sign flips, handed a tanh model, commutes with flipping hidden
    neurons (as Adam does), with the gate too, reading the momentum's polar factor (which flips
    with the weights), and with a per-tensor step factor; a permutation-only rule does not, so
    the check can fail."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 7), nn.Tanh(), nn.Linear(7, 3)).double()
    data = batches((16, 5), 30)
    labelling = label_monomial(model, (data[0][0],))
    assert {symmetry for _, symmetry in labelling.params.symmetries} == {"sign"}
    element = labelling.random_element(torch.Generator().manual_seed(1))
    twin = copy.deepcopy(model)
    act_model_(twin, labelling, element)
    for m in (model, twin):
        train(m, NFNOptimizer.for_model(m, rule=open_rule(sign_flips=sign_flips, **config), example_inputs=(data[0][0],)), data)
    act_model_(model, labelling, element)
    a, b = flat(model), flat(twin)
    error = ((a - b).abs().max() / a.abs().max()).item()
    assert error < 1e-7 if sign_flips else error > 1e-4
