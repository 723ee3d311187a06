"""``python -m meta_train.evaluate``: held-out-split tasks, the rule and Adam, training and held-out loss."""

from __future__ import annotations

import json
import math

import pytest

from meta_train import evaluate as evaluation
from meta_train.tasks import Task, held_out_properties
from nfopt.io import save_rule

from ..rules import fresh_rule


def test_tasks_are_drawn_from_the_held_out_split_by_the_seed():
    configs = evaluation.task_configs(4, 1, steps=7)
    assert all(held_out_properties(c) and c.horizon == 7 for c in configs)
    assert configs == evaluation.task_configs(4, 1, steps=7) != evaluation.task_configs(4, 2, steps=7)


def test_evaluation_reports_the_rule_and_adam_on_the_validation_split(tmp_path, monkeypatch, capsys):
    ckpt = tmp_path / "fresh.nfopt"
    save_rule(fresh_rule(), ckpt)
    built = []
    original = Task.__init__

    def record(self, *args, **kwargs):
        original(self, *args, **kwargs)
        built.append(self)

    monkeypatch.setattr(Task, "__init__", record)
    evaluation.main(["--ckpt", str(ckpt), "--tasks", "2", "--steps", "3", "--seed", "5", "--json"])
    results = json.loads(capsys.readouterr().out)
    assert built and all(t.holdout for t in built)  # trained with the validation rows held out
    assert set(results) == {"nfn", "adam"}
    for r in results.values():
        assert set(r) == {"train_loss", "val_loss", "log_train_loss", "log_val_loss"}
        assert all(math.isfinite(v) for v in r.values()) and r["val_loss"] > 0
    # the fresh rule steps as Adam does at its initial alpha (1e-3, Adam's lr here): the same numbers
    for key in results["adam"]:
        assert results["nfn"][key] == pytest.approx(results["adam"][key], rel=1e-3)


def test_the_v2_held_out_split_is_evaluated_on_request(tmp_path, capsys):
    configs = evaluation.task_configs(12, 1, steps=3, distribution="v2")
    assert all(held_out_properties(c) for c in configs) and {c.arch for c in configs} - {"mlp", "cnn"}
    assert evaluation.task_configs(4, 1, steps=3) == evaluation.task_configs(4, 1, steps=3, distribution="v1")
    ckpt = tmp_path / "fresh.nfopt"
    save_rule(fresh_rule(), ckpt)
    evaluation.main(["--ckpt", str(ckpt), "--tasks", "3", "--steps", "2", "--seed", "1", "--distribution", "v2",
                     "--json"])
    results = json.loads(capsys.readouterr().out)
    assert all(math.isfinite(v) for r in results.values() for v in r.values())


def test_a_loss_of_zero_scores_log_eps_not_minus_infinity(monkeypatch):
    """A task trained to a loss of exactly 0 (a separable set) keeps the log means finite."""
    scores = iter([{"train_loss": 0.0, "val_loss": 0.5}, {"train_loss": 0.1, "val_loss": 0.0}] * 2)
    monkeypatch.setattr(evaluation, "train_and_score", lambda config, build, steps: next(scores))
    results = evaluation.evaluate(None, tasks=2, steps=3, seed=1)
    for r in results.values():
        assert r["log_train_loss"] == pytest.approx((math.log(evaluation.LOG_EPS) + math.log(0.1 + evaluation.LOG_EPS)) / 2)
        assert math.isfinite(r["log_val_loss"])
