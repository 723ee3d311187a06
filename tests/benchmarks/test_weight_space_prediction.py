"""The weight-space prediction example: a deterministic zoo, exact monomial invariance, a run end to end."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from benchmarks import weight_space_prediction as wsp

TINY = wsp.Config(networks=8, hidden=4, max_steps=5, batch_size=8, channels=4, head_width=8, epochs=1, model_batch=4)


def test_zoo_is_deterministic_from_the_seed():
    a, b, c = (wsp.make_zoo("tanh", TINY, seed) for seed in (3, 3, 4))
    for x, y in zip(a.weights + [a.test_accuracy, a.steps, a.lr], b.weights + [b.test_accuracy, b.steps, b.lr]):
        assert torch.equal(x, y)
    assert not torch.equal(a.weights[0], c.weights[0])
    assert a.weights[0].shape == (TINY.networks, TINY.hidden, wsp.INPUTS)
    assert len(set(a.steps.tolist())) > 1 and len(set(a.lr.tolist())) > 1  # the zoo varies


@pytest.mark.parametrize("activation", list(wsp.ACTIVATIONS))
def test_moved_networks_compute_the_same_function(activation):
    spec = wsp.zoo_spec(activation, TINY.hidden)
    weights = [w.double() for w in wsp.make_zoo(activation, TINY, 0).weights]
    moved = wsp.move_networks(spec, weights, seed=1, log10_scale=1.0)
    x = torch.randn(16, wsp.INPUTS, dtype=torch.float64)
    assert not torch.allclose(moved[2], weights[2])  # the hidden-to-hidden weights did move
    assert torch.allclose(wsp.mlp_forward(moved, x, activation), wsp.mlp_forward(weights, x, activation), atol=1e-10)


@pytest.mark.parametrize("activation", list(wsp.ACTIVATIONS))
def test_monomial_prediction_is_invariant_and_permutation_only_is_not(activation):
    spec = wsp.zoo_spec(activation, TINY.hidden)
    weights = [w.double() for w in wsp.make_zoo(activation, TINY, 0).weights]
    moved = wsp.move_networks(spec, weights, seed=2, log10_scale=1.0)
    changes = {}
    for name, model_spec in (("monomial", spec), ("permutation", spec.space)):
        torch.manual_seed(0)
        model = wsp.PropertyPredictor(model_spec, channels=4, head_width=8).double()
        pred = model.predict(weights)
        changes[name] = float((model.predict(moved) - pred).abs().max() / pred.abs().max())
    assert changes["monomial"] < 1e-10
    assert changes["permutation"] > 1e-3


def test_metrics():
    scipy_stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(0)
    x = rng.integers(0, 5, 40).astype(float)  # ties
    y = x + rng.normal(size=40)
    assert wsp.kendall_tau(x, y) == pytest.approx(scipy_stats.kendalltau(x, y).statistic, abs=1e-12)
    assert wsp.kendall_tau([1, 2, 3], [1, 3, 2]) == pytest.approx(1 / 3)
    assert wsp.r2_score(y, y) == 1.0 and wsp.r2_score(y, np.full_like(y, y.mean())) == pytest.approx(0.0)


def test_quick_run_end_to_end(tmp_path, monkeypatch):
    monkeypatch.setattr(wsp, "QUICK", TINY)
    results = wsp.main(["--quick", "--seed", "1", "--out", str(tmp_path)])
    assert set(results) == {"target", "seed", "config", "zoos", "run"}
    assert set(results["zoos"]) == {"tanh", "relu"}
    for zoo in results["zoos"].values():
        assert set(zoo["models"]) == {"monomial", "permutation"}
        for m in zoo["models"].values():
            assert set(m) == {"parameters", "used_parameters", "train_time_s", "test", "moved", "max_prediction_change"}
            assert set(m["test"]) == set(m["moved"]) == {"r2", "kendall_tau"}
        assert zoo["models"]["monomial"]["max_prediction_change"] < wsp.INVARIANCE_TOL
        assert zoo["models"]["monomial"]["used_parameters"] < zoo["models"]["permutation"]["used_parameters"]
    assert json.loads((tmp_path / "prediction.json").read_text())["seed"] == 1
    assert "| relu (scale) | monomial |" in (tmp_path / "prediction.md").read_text()
