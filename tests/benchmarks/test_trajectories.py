"""Trajectory fingerprints: the same run twice is bit-identical, a changed one is reported."""

from __future__ import annotations

import copy

from benchmarks.trajectories import compare, record


def test_a_repeated_record_is_bit_identical_and_a_changed_one_is_not():
    first = record(["mlp_wine"], steps=3, ckpt=None)
    assert set(first) == {"mlp_wine/for_model", "mlp_wine/bare"}
    assert compare(record(["mlp_wine"], steps=3, ckpt=None), first) == [
        "mlp_wine/bare: bit-identical",
        "mlp_wine/for_model: bit-identical",
    ]
    changed = copy.deepcopy(first)
    changed["mlp_wine/bare"]["losses"][-1] *= 1.5
    lines = compare(changed, first)
    assert lines[1] == "mlp_wine/for_model: bit-identical"
    assert lines[0].startswith("mlp_wine/bare: differs") and "0.5" in lines[0]
