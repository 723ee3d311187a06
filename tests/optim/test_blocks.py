"""A blocked tensor (an LSTM's gates stacked in one weight) steps as its blocks would as tensors of
their own, in the rule's functional step and in every path of the in-place one."""

from __future__ import annotations

import pytest
import torch

from nfopt.optim import fused as fused_module
from nfopt.optim.blocks import Blocks
from nfopt.weight_space import MonomialSpec, TensorSpec, WeightSpaceSpec

from ..test_reference_equivalence import IN_PLACE_PATHS, assert_close, random_inputs, random_rule, take_in_place_path

H = 3
GATES = 4
BLOCKED = WeightSpaceSpec((
    TensorSpec((5, 2), ("in", "x"), "inp"),
    TensorSpec((GATES * H, 5), ("h", "in"), "w_ih", GATES),
    TensorSpec((GATES * H, H), ("h", "h"), "w_hh", GATES),
    TensorSpec((GATES * H,), ("h",), "b", GATES),
    TensorSpec((4, H), ("out", "h"), "head"),
))
NONFINITE = 1  # a NaN in the last element of w_ih's gradient: its last block only


def by_hand(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """The blocked tensors cut into gates by slicing rows, as separate tensors."""
    out = []
    for x, t in zip(tensors, BLOCKED.tensors):
        n = t.shape[0] // t.blocks
        out += [x[i * n:(i + 1) * n] for i in range(t.blocks)]
    return out


SEPARATE = WeightSpaceSpec(tuple(
    TensorSpec((t.shape[0] // t.blocks, *t.shape[1:]), t.axes, f"{t.name}[{i}]" if t.blocks > 1 else t.name)
    for t in BLOCKED.tensors for i in range(t.blocks)
))
"""The same space with every gate a tensor of its own."""


def separate_step(rule, x):
    """What the blocked tensors' gates should become: the step of the space of separate tensors."""
    counts = [t.blocks for t in BLOCKED.tensors]
    states = []
    for s, b in zip(x.states, counts):
        for i in range(b):
            n = s["v"].shape[0] // b
            states.append({"step": s["step"], "momenta": s["momenta"][:, i * n:(i + 1) * n], "v": s["v"][i * n:(i + 1) * n]})
    rates = [[r for r, b in zip(rs, counts) for _ in range(b)] for rs in (x.lrs, x.weight_decays)]
    return rule(SEPARATE, by_hand(x.params), by_hand(x.grads), states, *rates)


def test_the_space_of_blocks_is_the_space_of_separate_tensors() -> None:
    assert BLOCKED.split_blocks() == SEPARATE
    assert BLOCKED.set_sizes == SEPARATE.set_sizes == {"in": 5, "x": 2, "h": H, "out": 4}
    assert MonomialSpec(BLOCKED).split_blocks() == MonomialSpec(SEPARATE)


def test_the_functional_step_reads_blocks_as_tensors() -> None:
    rule = random_rule(3)
    x = random_inputs(rule, BLOCKED, 3, NONFINITE)
    params, states, oks = rule(BLOCKED, x.params, x.grads, x.states, x.lrs, x.weight_decays)
    expected, expected_states, expected_oks = separate_step(rule, x)
    for i, (got, want) in enumerate(zip(by_hand(params), expected)):
        assert_close(got, want, f"block {i}")
    v = by_hand([s["v"] for s in states])
    for i, (got, want) in enumerate(zip(v, expected_states)):
        assert_close(got, want["v"], f"v of block {i}")
    # one count per block: the block with the NaN is held, the others step
    before = float(x.states[NONFINITE]["step"])
    assert states[NONFINITE]["step"].tolist() == [before + 1] * (GATES - 1) + [before]
    assert [bool(o) for o in oks] == [i != NONFINITE for i in range(len(BLOCKED))]
    assert [bool(o) for o in expected_oks] == [i != GATES for i in range(len(SEPARATE))]  # w_ih's last gate


@pytest.mark.parametrize("path", sorted(IN_PLACE_PATHS))
def test_the_in_place_step_writes_each_block_as_its_own_tensor(path: str, monkeypatch) -> None:
    use_loop, looped = take_in_place_path(path, monkeypatch)
    rule = random_rule(4)
    x = random_inputs(rule, BLOCKED, 4, NONFINITE)
    expected, expected_states, _ = separate_step(rule, x)
    params = [p.clone() for p in x.params]
    states = [{k: v.clone() for k, v in s.items()} for s in x.states]
    addresses = [p.data_ptr() for p in params]
    oks = rule.step_(BLOCKED, params, x.grads, states, x.lrs, x.weight_decays)
    assert [p.data_ptr() for p in params] == addresses  # written in place
    for i, (got, want) in enumerate(zip(by_hand(params), expected)):
        assert_close(got, want, f"block {i}")
    for k, axis in (("v", 0), ("momenta", 1)):
        for i, (got, want) in enumerate(zip(by_hand([s[k].movedim(axis, 0) for s in states]), expected_states)):
            assert_close(got, want[k].movedim(axis, 0), f"{k} of block {i}")
    assert [s["step"].shape for s in states] == [torch.Size([t.blocks]) if t.blocks > 1 else torch.Size([])
                                                 for t in BLOCKED.tensors]
    assert [bool(o) for o in oks] == [i != NONFINITE for i in range(len(BLOCKED))]
    assert bool(looped) == (use_loop and fused_module.library(torch.float64) is not None)


def test_flags_of_blocks_join_per_tensor() -> None:
    blocks = Blocks((1, 3, 2))
    flags = torch.tensor([1.0, 1.0, 0.0, 1.0, 1.0, 1.0])
    assert blocks.join_flags(flags).tolist() == [1.0, 0.0, 1.0]
    assert blocks.repeat(["a", "b", "c"]) == ["a", "b", "b", "b", "c", "c"]
