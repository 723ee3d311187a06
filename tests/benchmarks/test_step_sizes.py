"""Effective learning rates: ‖Δ‖/‖u‖ per tensor and step, and their summary."""

from __future__ import annotations

import numpy as np
import pytest

from benchmarks import step_sizes
from benchmarks.runs import OptimizerSpec
from nfopt.io import save_rule

from ..rules import fresh_rule


@pytest.fixture
def adam_rule(tmp_path):
    """A fresh rule: Adam at α = 0.004 exactly."""
    path = tmp_path / "fresh.nfopt"
    save_rule(fresh_rule(alpha=0.004), path)
    return str(path)


@pytest.mark.parametrize("bare", [True, False])
def test_a_fresh_rule_steps_at_alpha_on_every_tensor(adam_rule, bare):
    rates = step_sizes.effective_rates("mlp_wine", OptimizerSpec("nfn", ckpt=adam_rule, bare=bare), steps=12)
    assert rates.shape[0] == 12 and np.isfinite(rates).all()
    np.testing.assert_allclose(rates, 0.004, rtol=1e-4)


def test_the_learned_default_does_not_step_at_alpha():
    """The shipped rule bends and scales Adam's step: its effective rates spread around α."""
    rates = step_sizes.effective_rates("mlp_wine", OptimizerSpec("nfn", bare=True), steps=30)
    s = step_sizes.summarise(rates)
    assert s["p90"] / s["p10"] > 1.05


def test_summary_and_report():
    rates = np.array([[1.0, np.nan], [2.0, 3.0], [4.0, 5.0], [6.0, 7.0], [8.0, 9.0], [10.0, 11.0]])
    s = step_sizes.summarise(rates)
    assert s["median"] == 6.0 and (s["median_first"], s["median_middle"], s["median_last"]) == (2.0, 5.5, 9.5)
    text = step_sizes.report([{"task": "t", "summary": s, "tuned_lr": 0.01}], "cmd", "ck", 0.002)
    assert "| t | 6 | " in text and "| 0.01 |" in text and "`cmd`" in text


def test_main_writes_the_report_and_json(tmp_path, adam_rule):
    out = tmp_path / "steps.md"
    step_sizes.main(["--ckpt", adam_rule, "--tasks", "mlp_wine", "--out", str(out)])
    assert "| mlp_wine | 0.004 |" in out.read_text()
    assert out.with_suffix(".json").exists()
