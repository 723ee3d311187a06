"""What ATen operators do to axis variables, in the graphs ``torch.export`` gives of models that
torch.fx cannot trace: each rule couples what it proves and pins the rest."""

from __future__ import annotations

import warnings
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from nfopt.labelling.permutation import invariance_error, label_explicit, label_model

from .labels import GENERATOR, TOL, Axis, Net, assert_couplings, label_of, randn


class Untraceable(Net):
    """A :class:`Net` behind a check on the input's rank: fx cannot trace it (a proxy in an
    ``assert``), export can."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        assert x.dim() >= 2, "a batch of inputs"
        return self.compute(self, x)


def hidden(m: Untraceable, x: torch.Tensor, name: str = "w1") -> torch.Tensor:
    """``tanh(x @ w.T)``: hidden units whose set is ``name``'s axis 0."""
    return torch.tanh(F.linear(x, getattr(m, name)))


def attend(m: Untraceable, x: torch.Tensor, **kwargs: object) -> torch.Tensor:
    """Single-head attention with separate projections, then an output projection."""
    q, k, v = (F.linear(x, getattr(m, w)) for w in ("wq", "wk", "wv"))
    return F.linear(F.scaled_dot_product_attention(q, k, v, **kwargs), m.wo)


W1, W2 = ("w1", 0), ("w2", 1)
ATTENTION = {"wq": (6, 5), "wk": (6, 5), "wv": (6, 5), "wo": (3, 6)}
SEQUENCES = randn(2, 7, 5)

CASES: dict[str, tuple[Callable, dict, torch.Tensor, list[list[Axis]], list[Axis]]] = {
    # case: (forward, parameter shapes, input, groups sharing one coupled set, axes in no coupled set)
    "linear_and_layer_norm": (
        lambda m, x: F.linear(F.layer_norm(F.linear(x, m.w1, m.b1), (6,), m.g, m.b), m.w2),
        {"w1": (6, 5), "b1": (6,), "g": (6,), "b": (6,), "w2": (3, 6)}, randn(4, 5),
        [[W1, ("b1", 0), ("g", 0), ("b", 0), W2]], [("w1", 1), ("w2", 0)],
    ),
    "addmm_with_the_weight_stored_input_major": (  # Hugging Face's Conv1D: x @ w + b, w (in, out)
        lambda m, x: torch.addmm(m.b2, torch.tanh(torch.addmm(m.b1, x, m.w1)), m.w2),
        {"w1": (5, 6), "b1": (6,), "w2": (6, 3), "b2": (3,)}, randn(4, 5),
        [[("w1", 1), ("b1", 0), ("w2", 0)]], [("w1", 0), ("w2", 1), ("b2", 0)],
    ),
    "embedding_with_the_table_first": (
        lambda m, x: torch.tanh(F.embedding(x, m.table)).mean(1) @ m.w.T,
        {"table": (10, 6), "w": (3, 6)}, torch.randint(0, 10, (4, 3), generator=GENERATOR),
        [[("table", 1), ("w", 1)]], [("table", 0)],
    ),
    "split_along_features_pins_them": (
        lambda m, x: torch.mul(*hidden(m, x).split(6, dim=-1)) @ m.w2.T,
        {"w1": (12, 5), "w2": (3, 6)}, randn(4, 5), [], [W1, W2],
    ),
    "split_along_the_batch_keeps_features": (
        lambda m, x: torch.cat(hidden(m, x).split([1, 3]), dim=0) @ m.w2.T,
        {"w1": (6, 5), "w2": (3, 6)}, randn(4, 5), [[W1, W2]], [],
    ),
    "slice_of_the_batch_keeps_features": (
        lambda m, x: hidden(m, x)[1:] @ m.w2.T,
        {"w1": (6, 5), "w2": (3, 6)}, randn(4, 5), [[W1, W2]], [],
    ),
    "slice_of_features_pins_them": (
        lambda m, x: hidden(m, x)[:, 2:] @ m.w2.T,
        {"w1": (6, 5), "w2": (3, 4)}, randn(4, 5), [], [W1, W2],
    ),
    "select_of_a_position_keeps_features": (
        lambda m, x: hidden(m, x)[:, 0] @ m.w2.T,
        {"w1": (6, 5), "w2": (3, 6)}, randn(4, 2, 5), [[W1, W2]], [],
    ),
    "expand_keeps_the_axes_it_does_not_widen": (
        lambda m, x: hidden(m, x).unsqueeze(1).expand(4, 3, 6).mean(1) @ m.w2.T,
        {"w1": (6, 5), "w2": (3, 6)}, randn(4, 5), [[W1, W2]], [],
    ),
    "constant_shaped_like_a_value_leaves_it_free": (
        lambda m, x: (hidden(m, x) + torch.zeros_like(x).sum()) @ m.w2.T,
        {"w1": (6, 5), "w2": (3, 6)}, randn(4, 5), [[W1, W2]], [],
    ),
    "attention_contracts_queries_with_keys": (
        attend, ATTENTION, SEQUENCES,
        [[("wq", 0), ("wk", 0)], [("wv", 0), ("wo", 1)]], [("wq", 1), ("wk", 1), ("wv", 1), ("wo", 0)],
    ),
    "attention_with_a_causal_mask": (
        lambda m, x: attend(m, x, attn_mask=torch.ones(7, 7, dtype=torch.bool).tril()),
        ATTENTION, SEQUENCES, [[("wq", 0), ("wk", 0)], [("wv", 0), ("wo", 1)]], [],
    ),
    "in_place_pointwise_keeps": (
        lambda m, x: F.linear(x, m.w1).mul_(2).relu_() @ m.w2.T,
        {"w1": (6, 5), "w2": (3, 6)}, randn(4, 5), [[W1, W2]], [],
    ),
    "batch_norm_with_its_vectors_reordered": (
        lambda m, x: F.batch_norm(F.linear(x, m.w1), None, None, m.g, m.b, training=True) @ m.w2.T,
        {"w1": (6, 5), "g": (6,), "b": (6,), "w2": (3, 6)}, randn(4, 5), [[W1, ("g", 0), ("b", 0), W2]], [],
    ),
    "conv_and_pool_couple_channels": (
        lambda m, x: F.max_pool2d(F.relu(F.conv2d(x, m.k1, m.b1)), 2).mean((2, 3)) @ m.w.T,
        {"k1": (4, 2, 3, 3), "b1": (4,), "w": (3, 4)}, randn(2, 2, 6, 6), [[("k1", 0), ("b1", 0), ("w", 1)]], [],
    ),
    "unknown_operation_pins": (
        lambda m, x: torch.flip(hidden(m, x), [-1]) @ m.w2.T,
        {"w1": (6, 5), "w2": (3, 6)}, randn(4, 5), [], [W1, W2],
    ),
}


def labelled(forward: Callable, shapes: dict, x: torch.Tensor) -> tuple[Untraceable, object]:
    torch.manual_seed(0)
    model = Untraceable(forward, **shapes)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the export path understands these models: no warning
        return model, label_model(model, (x,))


@pytest.mark.parametrize("case", sorted(CASES))
def test_rule_couples_what_it_proves(case: str) -> None:
    forward, shapes, x, groups, alone = CASES[case]
    model, lab = labelled(forward, shapes, x)
    assert_couplings(lab, groups, alone, what=case)
    assert invariance_error(model, lab, (x,), generator=torch.Generator().manual_seed(0)) < TOL


def test_a_wrong_coupling_of_attention_would_be_caught() -> None:
    """A rule that tied the queries' features to the values' (and so to the output projection's
    columns) instead of to the keys' would claim a false symmetry: permuting queries without keys
    changes the scores, and the check every case above passes sees it far above rounding."""
    model, lab = labelled(attend, ATTENTION, SEQUENCES)
    assert label_of(lab, "wq", 0) == label_of(lab, "wk", 0)
    wrong = label_explicit(model, {"wq": ("v", "wq:in"), "wv": ("v", "wv:in"), "wo": ("wo:out", "v")})
    assert invariance_error(model, wrong, (SEQUENCES,), generator=torch.Generator().manual_seed(0)) > 1e-3


class TrainOnlyFlip(nn.Module):
    """Flips the hidden features only in training mode, behind a check fx cannot trace."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(5, 6), nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        assert x.dim() == 2
        h = torch.relu(self.fc1(x))
        return self.fc2(h.flip(-1) if self.training else h)


def test_both_modes_are_exported() -> None:
    model = TrainOnlyFlip()
    lab = label_model(model, (torch.randn(4, 5),))
    assert not lab.coupled_sets  # the flip of the train-mode graph pins the hidden features
    assert model.training


def test_without_inputs_nothing_is_exported() -> None:
    model = Untraceable(lambda m, x: hidden(m, x) @ m.w2.T, w1=(6, 5), w2=(3, 6))
    with pytest.warns(UserWarning, match="cannot be traced by torch.fx and no example_inputs"):
        lab = label_model(model)
    assert not lab.coupled_sets
