"""What tensor operations do to axis variables: each rule couples what it proves and pins the rest."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F

from nfopt.labelling.permutation import invariance_error, label_model

from .labels import GENERATOR, TOL, Axis, Net, assert_couplings, randn


def hidden(m: Net, x: torch.Tensor, name: str = "w1") -> torch.Tensor:
    """``tanh(x @ w.T)``: hidden units whose set is ``name``'s axis 0."""
    return torch.tanh(x @ getattr(m, name).T)


W1, W2 = ("w1", 0), ("w2", 1)
IMAGES = randn(2, 2, 6, 6)

CASES: dict[str, tuple[Callable, dict, torch.Tensor, list[list[Axis]], list[Axis]]] = {
    # case: (forward, parameter shapes, input, groups sharing one coupled set, axes in no coupled set)
    "matmul_T_and_t": (
        lambda m, x: torch.tanh(torch.matmul(x, m.w1.T)) @ m.w2.t(),
        {"w1": (6, 5), "w2": (3, 6)}, randn(4, 5), [[W1, W2]], [("w1", 1), ("w2", 0)],
    ),
    "mT_and_permute": (
        lambda m, x: torch.tanh(m.w1 @ x.mT).permute(1, 0) @ m.w2.mT,
        {"w1": (6, 5), "w2": (3, 6)}, randn(4, 5), [[W1, W2]], [("w1", 1), ("w2", 0)],
    ),
    "addmm_with_the_weight_stored_input_major": (  # Hugging Face's Conv1D: x @ w + b, w (in, out)
        lambda m, x: torch.addmm(m.b2, torch.tanh(torch.addmm(m.b1, x, m.w1)), m.w2),
        {"w1": (5, 6), "b1": (6,), "w2": (6, 3), "b2": (3,)}, randn(4, 5),
        [[("w1", 1), ("b1", 0), ("w2", 0)]], [("w1", 0), ("w2", 1), ("b2", 0)],
    ),
    "baddbmm_and_its_method": (
        lambda m, x: m.b2.baddbmm(torch.tanh(torch.baddbmm(m.b1, x, m.w1)), m.w2),
        {"w1": (2, 5, 6), "b1": (6,), "w2": (2, 6, 3), "b2": (3,)}, randn(2, 4, 5),
        [[("w1", 2), ("b1", 0), ("w2", 1)]], [("w1", 0), ("w1", 1), ("w2", 0), ("w2", 2), ("b2", 0)],
    ),
    "broadcast_operands": (
        lambda m, x: torch.tanh(x @ m.w1.T + m.b1) * m.s @ m.w2.T,
        {"w1": (6, 5), "b1": (6,), "s": (1, 6), "w2": (3, 6)}, randn(4, 5),
        [[W1, ("b1", 0), ("s", 1), W2]], [("s", 0)],
    ),
    "cat_along_batch_ties_features": (
        lambda m, x: torch.cat([hidden(m, x), hidden(m, x, "w3")], dim=0) @ m.w2.T,
        {"w1": (6, 5), "w3": (6, 5), "w2": (3, 6)}, randn(4, 5), [[W1, ("w3", 0), W2]], [],
    ),
    "cat_along_features_pins_them": (
        lambda m, x: torch.cat([hidden(m, x), hidden(m, x, "w3")], dim=-1) @ m.w2.T,
        {"w1": (6, 5), "w3": (6, 5), "w2": (3, 12)}, randn(4, 5), [], [W1, ("w3", 0), W2],
    ),
    "stack_ties_and_adds_an_axis": (
        lambda m, x: torch.stack([hidden(m, x), hidden(m, x, "w3")], dim=1).sum(1) @ m.w2.T,
        {"w1": (6, 5), "w3": (6, 5), "w2": (3, 6)}, randn(4, 5), [[W1, ("w3", 0), W2]], [],
    ),
    "full_slices_and_new_axes_keep": (
        lambda m, x: hidden(m, x)[:, None][..., 0, :] @ m.w2.T,
        {"w1": (6, 5), "w2": (3, 6)}, randn(4, 5), [[W1, W2]], [],
    ),
    "partial_slice_pins": (
        lambda m, x: hidden(m, x)[:, :4] @ m.w2.T,
        {"w1": (6, 5), "w2": (3, 4)}, randn(4, 5), [], [W1, W2],
    ),
    "reshape_keeping_the_axis": (
        lambda m, x: hidden(m, x).unsqueeze(1).reshape(4, 6) @ m.w2.T,
        {"w1": (6, 5), "w2": (3, 6)}, randn(4, 5), [[W1, W2]], [],
    ),
    "reshape_splitting_the_axis_pins": (
        lambda m, x: hidden(m, x).view(4, 2, 3).flatten(1) @ m.w2.T,
        {"w1": (6, 5), "w2": (3, 6)}, randn(4, 5), [], [W1, W2],
    ),
    "mean_over_another_axis": (
        lambda m, x: hidden(m, x).mean(1) @ m.w2.T,
        {"w1": (6, 5), "w2": (3, 6)}, randn(4, 2, 5), [[W1, W2]], [],
    ),
    "casts_and_copies_keep": (
        lambda m, x: hidden(m, x).to(x.dtype).contiguous().clone() @ m.w2.T,
        {"w1": (6, 5), "w2": (3, 6)}, randn(4, 5), [[W1, W2]], [],
    ),
    "split_along_the_batch_keeps_features": (
        lambda m, x: torch.cat(hidden(m, x).split(2), dim=0) @ m.w2.T,
        {"w1": (6, 5), "w2": (3, 6)}, randn(4, 5), [[W1, W2]], [],
    ),
    "split_along_features_pins_them": (
        lambda m, x: (lambda h: h[0] * h[1])(torch.split(hidden(m, x), 3, -1)) @ m.w2.T,
        {"w1": (6, 5), "w2": (3, 3)}, randn(4, 5), [], [W1, W2],
    ),
    "expand_keeps_the_axes_it_does_not_widen": (
        lambda m, x: hidden(m, x).unsqueeze(1).expand(4, 3, 6).mean(1) @ m.w2.T,
        {"w1": (6, 5), "w2": (3, 6)}, randn(4, 5), [[W1, W2]], [],
    ),
    "attention_contracts_queries_with_keys": (
        lambda m, x: F.scaled_dot_product_attention(x @ m.wq.T, x @ m.wk.T, x @ m.wv.T, is_causal=True) @ m.wo.T,
        {"wq": (4, 5), "wk": (4, 5), "wv": (6, 5), "wo": (3, 6)}, randn(2, 7, 5),
        [[("wq", 0), ("wk", 0)], [("wv", 0), ("wo", 1)]], [("wq", 1), ("wk", 1), ("wv", 1), ("wo", 0)],
    ),
    "unknown_operation_pins": (
        lambda m, x: torch.flip(hidden(m, x), [-1]) @ m.w2.T,
        {"w1": (6, 5), "w2": (3, 6)}, randn(4, 5), [], [W1, W2],
    ),
    "grouped_conv_pins_its_channels": (
        lambda m, x: F.conv2d(F.relu(F.conv2d(x, m.k1, m.b1)), m.k2, groups=2).mean((2, 3)) @ m.w.T,
        {"k1": (4, 2, 3, 3), "b1": (4,), "k2": (6, 2, 3, 3), "w": (3, 6)}, IMAGES,
        [], [("k1", 0), ("b1", 0), ("k2", 0), ("k2", 1), ("w", 1)],
    ),
    "depthwise_conv_couples": (
        lambda m, x: F.conv2d(F.relu(F.conv2d(x, m.k1, m.b1)), m.k2, groups=4, padding=1).mean((2, 3)) @ m.w.T,
        {"k1": (4, 2, 3, 3), "b1": (4,), "k2": (4, 1, 3, 3), "w": (3, 4)}, IMAGES,
        [[("k1", 0), ("b1", 0), ("k2", 0), ("w", 1)]], [("k2", 1)],
    ),
    "max_pool_couples": (
        lambda m, x: F.max_pool2d(F.relu(F.conv2d(x, m.k1)), 2).mean((2, 3)) @ m.w.T,
        {"k1": (4, 2, 3, 3), "w": (3, 4)}, IMAGES, [[("k1", 0), ("w", 1)]], [],
    ),
    "max_pool_returning_indices_pins": (
        lambda m, x: F.max_pool2d(F.relu(F.conv2d(x, m.k1)), 2, return_indices=True)[0].mean((2, 3)) @ m.w.T,
        {"k1": (4, 2, 3, 3), "w": (3, 4)}, IMAGES, [], [("k1", 0), ("w", 1)],
    ),
    "embedding_rows_pinned": (
        lambda m, x: torch.tanh(F.embedding(x, m.table)).mean(1) @ m.w.T,
        {"table": (10, 6), "w": (3, 6)}, torch.randint(0, 10, (4, 3), generator=GENERATOR),
        [[("table", 1), ("w", 1)]], [("table", 0)],
    ),
    "group_norm_of_one_group_couples": (
        lambda m, x: F.group_norm(x @ m.w1.T, 1, m.g, m.b) @ m.w2.T,
        {"w1": (6, 5), "g": (6,), "b": (6,), "w2": (3, 6)}, randn(4, 5), [[W1, ("g", 0), ("b", 0), W2]], [],
    ),
    "group_norm_of_several_groups_pins": (
        lambda m, x: F.group_norm(x @ m.w1.T, 2, m.g, m.b) @ m.w2.T,
        {"w1": (6, 5), "g": (6,), "b": (6,), "w2": (3, 6)}, randn(4, 5), [], [W1, ("g", 0), ("b", 0), W2],
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_rule_couples_what_it_proves(case: str) -> None:
    forward, shapes, x, groups, alone = CASES[case]
    torch.manual_seed(0)
    model = Net(forward, **shapes)
    lab = label_model(model, (x,))
    assert_couplings(lab, groups, alone, what=case)
    assert invariance_error(model, lab, (x,), generator=torch.Generator().manual_seed(0)) < TOL
