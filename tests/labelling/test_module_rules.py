"""What calls of torch.nn modules do to axis variables: each rule couples what it proves and pins
the rest; a module without a rule of its exact type pins what it touches."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import nn

from nfopt.labelling.permutation import invariance_error, label_model

from .labels import TOL, Axis, assert_couplings, label_of, randn


class FlippingLinear(nn.Linear):
    """A Linear whose forward does something else (and cannot be traced, so fx keeps it whole)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = super().forward(x)
        return y.flip(-1) if bool(y.sum() > -1e30) else y


class Cumsum(nn.Module):
    """An activation that mixes features."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.cumsum(-1)


class MaxPoolIndices(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.pool, self.head = nn.Conv2d(2, 4, 3), nn.MaxPool2d(2, return_indices=True), nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.pool(torch.relu(self.conv(x)))[0].mean((2, 3)))


class CrossAttention(nn.Module):
    """Attention with separate query, key and value projections of different widths."""

    def __init__(self) -> None:
        super().__init__()
        self.q, self.k, self.v = nn.Linear(5, 6), nn.Linear(5, 4), nn.Linear(5, 3)
        self.attn = nn.MultiheadAttention(6, 2, kdim=4, vdim=3, batch_first=True)
        self.head = nn.Linear(6, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.attn(self.q(x), self.k(x), self.v(x), need_weights=False)[0])


class Encoder(nn.Module):
    """A pre-norm transformer layer whose feed-forward activation mixes features."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(3, 6)
        self.layer = nn.TransformerEncoderLayer(6, 2, 8, dropout=0.0, activation=Cumsum(), batch_first=True,
                                                norm_first=True)
        self.head = nn.Linear(6, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.layer(self.proj(x)))


class Recurrent(nn.Module):
    """An nn.RNN read by a head: at its last time step (``read="output"``), from its final state
    (``"state"``), or started from a given initial state (``"given_state"``)."""

    def __init__(self, layers: int = 1, read: str = "output", bidirectional: bool = False,
                 nonlinearity: str = "tanh") -> None:
        super().__init__()
        self.read = read
        self.rnn = nn.RNN(5, 6, num_layers=layers, batch_first=True, bidirectional=bidirectional,
                          nonlinearity=nonlinearity)
        self.head = nn.Linear(12 if bidirectional else 6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.read == "given_state":
            out, _ = self.rnn(x, torch.ones(self.rnn.num_layers, x.shape[0], 6, dtype=x.dtype))
            return self.head(out[:, -1])
        out, h = self.rnn(x)
        return self.head(h[-1] if self.read == "state" else out[:, -1])


class Gated(nn.Module):
    """An LSTM or GRU (``kind``) of two layers between a Linear and a head, started from zeros or
    from a given initial state."""

    def __init__(self, kind: type[nn.RNNBase], bidirectional: bool = False, given_state: bool = False) -> None:
        super().__init__()
        self.inp = nn.Linear(5, 6)
        self.rnn = kind(6, 4, num_layers=2, batch_first=True, bidirectional=bidirectional)
        self.head = nn.Linear(8 if bidirectional else 4, 3)
        self.given_state = given_state

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.tanh(self.inp(x))
        if self.given_state:
            h = torch.ones(2, x.shape[0], 4, dtype=x.dtype)
            return self.head(self.rnn(x, (h, h) if isinstance(self.rnn, nn.LSTM) else h)[0][:, -1])
        return self.head(self.rnn(x)[0][:, -1])


def _rnn_axes(layer: int) -> list[Axis]:
    """A layer's hidden axes: its input weights' and biases' rows, both axes of its recurrent weights."""
    return [(f"rnn.weight_ih_l{layer}", 0), (f"rnn.weight_hh_l{layer}", 0), (f"rnn.weight_hh_l{layer}", 1),
            (f"rnn.bias_ih_l{layer}", 0), (f"rnn.bias_hh_l{layer}", 0)]


def mlp(middle: nn.Module, width: int = 6) -> nn.Module:
    return nn.Sequential(nn.Linear(5, width), middle, nn.Linear(width, 3))


VECTORS, IMAGES, SIGNALS = randn(4, 5), randn(2, 2, 6, 6), randn(2, 2, 8)

CASES: dict[str, tuple[Callable[[], nn.Module], torch.Tensor, list[list[Axis]], list[Axis]]] = {
    # case: (model, input, groups sharing one coupled set, axes in no coupled set)
    "prelu_per_channel": (
        lambda: mlp(nn.PReLU(6)), VECTORS, [[("0.weight", 0), ("0.bias", 0), ("1.weight", 0), ("2.weight", 1)]], [],
    ),
    "rms_norm": (
        lambda: mlp(nn.RMSNorm(6)), VECTORS, [[("0.weight", 0), ("1.weight", 0), ("2.weight", 1)]], [],
    ),
    "layer_norm_without_bias": (
        lambda: mlp(nn.LayerNorm(6, bias=False)), VECTORS, [[("0.weight", 0), ("1.weight", 0), ("2.weight", 1)]], [],
    ),
    "unflatten_keeping_the_axis": (
        lambda: nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Unflatten(1, (1, 6)), nn.Flatten(), nn.Linear(6, 3)),
        VECTORS, [[("0.weight", 0), ("4.weight", 1)]], [],
    ),
    "unflatten_splitting_the_axis_pins": (
        lambda: nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Unflatten(1, (2, 3)), nn.Flatten(), nn.Linear(6, 3)),
        VECTORS, [], [("0.weight", 0), ("4.weight", 1)],
    ),
    "subclass_is_not_trusted": (
        lambda: nn.Sequential(nn.Linear(5, 6), nn.Tanh(), FlippingLinear(6, 7), nn.Tanh(), nn.Linear(7, 3)),
        VECTORS, [], [("0.weight", 0), ("2.weight", 1), ("2.weight", 0), ("2.bias", 0), ("4.weight", 1)],
    ),
    "conv_transpose": (
        lambda: nn.Sequential(nn.ConvTranspose2d(2, 4, 3), nn.Tanh(), nn.Conv2d(4, 3, 3)),
        IMAGES, [[("0.weight", 1), ("0.bias", 0), ("2.weight", 1)]], [("0.weight", 0), ("2.weight", 0)],
    ),
    "instance_norm": (
        lambda: nn.Sequential(nn.Conv1d(2, 4, 3), nn.InstanceNorm1d(4, affine=True), nn.Tanh(), nn.Conv1d(4, 3, 3)),
        SIGNALS, [[("0.weight", 0), ("0.bias", 0), ("1.weight", 0), ("1.bias", 0), ("3.weight", 1)]], [],
    ),
    "group_norm_of_one_channel_per_group": (
        lambda: nn.Sequential(nn.Conv2d(2, 4, 3), nn.GroupNorm(4, 4), nn.Tanh(), nn.Conv2d(4, 3, 3)),
        IMAGES, [[("0.weight", 0), ("1.weight", 0), ("1.bias", 0), ("3.weight", 1)]], [],
    ),
    "max_pool_returning_indices_pins": (
        MaxPoolIndices, IMAGES, [], [("conv.weight", 0), ("conv.bias", 0), ("head.weight", 1)],
    ),
    "attention_with_separate_projections": (
        CrossAttention, randn(2, 4, 5),
        [[("q.weight", 0), ("attn.q_proj_weight", 1)], [("k.weight", 0), ("attn.k_proj_weight", 1)],
         [("v.weight", 0), ("v.bias", 0), ("attn.v_proj_weight", 1)],
         [("attn.out_proj.weight", 0), ("attn.out_proj.bias", 0), ("head.weight", 1)]],
        [("attn.q_proj_weight", 0), ("attn.k_proj_weight", 0), ("attn.v_proj_weight", 0), ("attn.in_proj_bias", 0)],
    ),
    "rnn_read_at_its_last_step": (
        Recurrent, randn(2, 4, 5), [[*_rnn_axes(0), ("head.weight", 1)]], [("rnn.weight_ih_l0", 1)],
    ),
    "rnn_relu_of_two_layers_read_from_its_final_state": (
        lambda: Recurrent(layers=2, read="state", nonlinearity="relu"), randn(2, 4, 5),
        [[*_rnn_axes(0), *_rnn_axes(1), ("rnn.weight_ih_l1", 1), ("head.weight", 1)]], [("rnn.weight_ih_l0", 1)],
    ),
    "rnn_from_a_given_initial_state_pins": (
        lambda: Recurrent(read="given_state"), randn(2, 4, 5), [], [*_rnn_axes(0), ("head.weight", 1)],
    ),
    "bidirectional_rnn_couples_its_inputs_only": (
        lambda: Recurrent(bidirectional=True), randn(2, 4, 5), [],
        [*_rnn_axes(0), ("rnn.weight_ih_l0", 1), ("rnn.weight_ih_l0_reverse", 1), ("head.weight", 1)],
    ),
    **{
        f"{kind.__name__.lower()}_couples_its_gate_blocks": (
            lambda kind=kind: Gated(kind), randn(2, 4, 5),
            [[("inp.weight", 0), ("inp.bias", 0), ("rnn.weight_ih_l0", 1)],
             [*_rnn_axes(0), *_rnn_axes(1), ("rnn.weight_ih_l1", 1), ("head.weight", 1)]],
            [],
        )
        for kind in (nn.LSTM, nn.GRU)
    },
    **{
        f"{kind.__name__.lower()}_from_a_given_initial_state_pins": (
            lambda kind=kind: Gated(kind, given_state=True), randn(2, 4, 5),
            [[("inp.weight", 0), ("inp.bias", 0), ("rnn.weight_ih_l0", 1)]], [*_rnn_axes(0), ("head.weight", 1)],
        )
        for kind in (nn.LSTM, nn.GRU)
    },
    **{
        f"{kind.__name__.lower()}_bidirectional_couples_its_inputs_only": (
            lambda kind=kind: Gated(kind, bidirectional=True), randn(2, 4, 5),
            [[("inp.weight", 0), ("inp.bias", 0), ("rnn.weight_ih_l0", 1), ("rnn.weight_ih_l0_reverse", 1)]],
            [("rnn.weight_ih_l0", 0), ("rnn.weight_hh_l0", 0), ("rnn.weight_hh_l0", 1), ("rnn.weight_ih_l1", 1),
             ("head.weight", 1)],
        )
        for kind in (nn.LSTM, nn.GRU)
    },
    "encoder_layer_with_a_mixing_activation": (
        Encoder, randn(2, 4, 3),
        [[("proj.weight", 0), ("layer.norm1.weight", 0), ("layer.self_attn.in_proj_weight", 1),
          ("layer.linear2.weight", 0), ("layer.norm2.bias", 0), ("head.weight", 1)]],
        [("layer.linear1.weight", 0), ("layer.linear1.bias", 0), ("layer.linear2.weight", 1)],
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_rule_couples_what_it_proves(case: str) -> None:
    build, x, groups, alone = CASES[case]
    torch.manual_seed(0)
    model = build().double()
    with torch.no_grad():
        for t in model.parameters():
            t.add_(torch.rand_like(t))  # norms start constant, so a wrong permutation of them would not show
    lab = label_model(model, (x,))
    assert_couplings(lab, groups, alone, what=case)
    assert invariance_error(model, lab, (x,), generator=torch.Generator().manual_seed(0)) < TOL


@pytest.mark.parametrize("kind", [nn.LSTM, nn.GRU, nn.RNN])
def test_recurrent_weights_are_read_as_gate_blocks(kind: type[nn.RNNBase]) -> None:
    """The rows of an LSTM's (GRU's) input and recurrent weights and biases are 4 (3) blocks of the
    hidden set, an RNN's one; the recurrent weights' columns and other tensors are not blocked."""
    lab = label_model((Gated(kind) if kind is not nn.RNN else Recurrent()).double(), (randn(2, 4, 5),))
    gates = {nn.LSTM: 4, nn.GRU: 3, nn.RNN: 1}[kind]
    blocks = {t.name: t.blocks for t in lab.params.tensors}
    assert {n: b for n, b in blocks.items() if n.startswith("rnn.")} == {
        n: gates for n in blocks if n.startswith("rnn.")
    }
    assert all(b == 1 for n, b in blocks.items() if not n.startswith("rnn."))
    model_hidden = 6 if kind is nn.RNN else 4
    assert lab.params.set_sizes[label_of(lab, "rnn.weight_ih_l0", 0)] == model_hidden
