"""Output ablation: zeroing one output of a rule's NFN leaves the other, and the rule, intact."""

from __future__ import annotations

import torch

from benchmarks.output_ablation import markdown, without

from ..rules import open_rule
from ..weight_spaces import mlp_spec, random_features


def test_without_zeroes_exactly_one_output():
    rule = open_rule().double()
    spec = mlp_spec([3, 4, 2])
    xs = random_features(spec, rule.config.features.channels)
    ctx = torch.randn(len(spec), rule.config.features.context_channels, dtype=torch.float64)
    full = rule.nfn(spec, xs, ctx)
    for output, k in (("d", 0), ("c", 1)):
        ablated = without(rule, output)
        ys = ablated.nfn(spec, xs, ctx)
        for y, f in zip(ys, full):
            assert torch.count_nonzero(y[k]) == 0 and torch.equal(y[1 - k], f[1 - k])
        assert torch.count_nonzero(rule.nfn(spec, xs, ctx)[0][k]) > 0  # the original is untouched


def test_markdown_lists_every_variant():
    rows = [{"task": "t", "variant": v, "at_horizon": [1.0], "at_2x": [2.0]} for v in ("as trained", "without d")]
    text = markdown(rows, "cmd", 60.0)
    assert "| t | without d | 1 | 2 |" in text and "1.0 min" in text
