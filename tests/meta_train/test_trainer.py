"""The meta-trainer: config, task slots and resampling, dropped and skipped steps, exact resume."""

from __future__ import annotations


import dataclasses

import pytest
import torch

import meta_train.trainer as trainer_module
from meta_train import checkpointing
from meta_train.distributed import Group
from meta_train.trainer import MetaConfig, MetaTrainer


SMALL = MetaConfig(tasks_per_step=2, unroll_length=2, horizon_min=4, horizon_max=6, meta_steps=4,
                   first_order=True).with_overrides(["rule.hidden_channels=4"])


def weights(trainer: MetaTrainer) -> list[torch.Tensor]:
    return [p.detach().clone() for p in trainer.params]


def test_overrides_are_typed_by_the_config_fields():
    c = MetaConfig().with_overrides(["meta_lr=3e-4", "first_order=true", "tasks_per_step=8", "rule.hidden_channels=16",
                                     "rule.features.time_scales=[10, 1000]", "out=x.nfopt"])
    assert (c.meta_lr, c.first_order, c.tasks_per_step, c.rule.hidden_channels) == (3e-4, True, 8, 16)
    assert c.rule.features.time_scales == (10.0, 1000.0) and c.checkpoint_path == "x.nfopt.train.pt"
    assert MetaConfig.from_dict(c.to_dict()) == c
    assert MetaConfig.from_dict({"clip": 2, "rule": {"hidden_channels": 3}}).clip == 2.0
    assert MetaConfig().with_overrides(["rule.gate_floor=0.01"]).rule.gate_floor == 0.01
    assert MetaConfig.from_dict({"rule": {"gate_floor": 0}}).rule.gate_floor == 0.0
    for bad, message in [("nope=1", "unknown config field"), ("rule.nope=1", "unknown config field"),
                         ("tasks_per_step=two", "takes a int"), ("first_order=maybe", "true or false"),
                         ("tasks_per_step=0", ">= 1"), ("horizon_max=10", "below horizon_min"), ("seed", "key=value"),
                         ("activation=swish", "activation must be empty or one of")]:
        with pytest.raises(ValueError, match=message):
            MetaConfig().with_overrides([bad])
    with pytest.raises(ValueError, match="unknown meta-training config fields"):
        MetaConfig.from_dict({"hidden": 3})


def test_task_draws_are_a_function_of_seed_slot_and_draw():
    a, b = MetaTrainer(SMALL), MetaTrainer(SMALL)
    assert a.task_config(0, 3) == b.task_config(0, 3)
    assert len({a.task_config(s, d) for s in range(2) for d in range(3)}) == 6
    assert MetaTrainer(SMALL, Group(rank=1, world_size=2)).slots == range(1, 2)
    assert MetaTrainer(dataclasses.replace(SMALL, seed=1)).task_config(0, 0) != a.task_config(0, 0)
    with pytest.raises(ValueError, match="not a multiple of the 2 processes"):
        MetaTrainer(dataclasses.replace(SMALL, tasks_per_step=3), Group(rank=0, world_size=2))


def test_a_slot_draws_a_new_task_when_the_horizon_ends():
    trainer = MetaTrainer(dataclasses.replace(SMALL, tasks_per_step=1, horizon_min=3, horizon_max=3))
    first = trainer.meta_step()
    run = trainer.runs[0]
    assert (first["inner_steps"], first["tasks_drawn"], run.step) == (2, 1, 2)
    second = trainer.meta_step()  # only one step left before the horizon
    assert (second["inner_steps"], second["tasks_drawn"], run.step, run.done) == (1, 0, 3, True)
    third = trainer.meta_step()
    assert third["tasks_drawn"] == 1 and trainer.runs[0] is not run and trainer.runs[0].step == 2
    assert trainer.runs[0].task.config == trainer.task_config(0, 1) != run.task.config
    assert trainer.draws == [2] and trainer.counters["tasks_drawn"] == 2 and trainer.counters["inner_steps"] == 5


def poison(monkeypatch, slots: set[int]) -> None:
    """Make the meta-loss of the given slots' unrolls NaN (their inner training goes on)."""
    unroll = trainer_module.unroll_together

    def patched(runs, rule, length, first_order, eps):
        results = unroll(runs, rule, length, first_order, eps)
        return [(m * float("nan") if slot in slots else m, info) for slot, (m, info) in enumerate(results)]

    monkeypatch.setattr(trainer_module, "unroll_together", patched)


def test_a_non_finite_task_is_dropped_and_counted(monkeypatch):
    clean, poisoned = MetaTrainer(SMALL), MetaTrainer(SMALL)
    poison(monkeypatch, {1})
    stats = poisoned.meta_step()
    assert stats["dropped_tasks"] == 1 and stats["skipped"] == 0 and poisoned.counters["dropped_tasks"] == 1
    monkeypatch.undo()
    # the update is that of slot 0 alone
    solo = MetaTrainer(dataclasses.replace(SMALL, tasks_per_step=1))
    solo.meta_step()
    clean.meta_step()
    for p, s, c in zip(poisoned.params, solo.params, clean.params):
        assert torch.isfinite(p).all()
        torch.testing.assert_close(p, s, rtol=0, atol=1e-7)
    assert any(not torch.equal(p, c) for p, c in zip(poisoned.params, clean.params))


def test_a_step_without_finite_tasks_is_skipped_and_counted(monkeypatch):
    trainer = MetaTrainer(SMALL)
    trainer.meta_step()
    before, adam = weights(trainer), trainer.meta_opt.state_dict()
    poison(monkeypatch, {0, 1})
    stats = trainer.meta_step()
    assert stats["skipped"] == 1 and stats["dropped_tasks"] == 2
    assert trainer.counters["skipped_steps"] == 1 and trainer.step == 2
    for p, b in zip(trainer.params, before):
        assert torch.equal(p, b)
    assert trainer.meta_opt.state_dict()["state"][0]["step"] == adam["state"][0]["step"]


def test_gradients_are_clipped_by_norm():
    trainer = MetaTrainer(dataclasses.replace(SMALL, clip=1e-6, meta_lr=1.0))
    stats = trainer.meta_step()
    assert stats["grad_norm"] > 1e-6  # reported before clipping
    exp_avg = torch.cat([s["exp_avg"].flatten() for s in trainer.meta_opt.state.values()])
    torch.testing.assert_close(exp_avg.norm(), torch.tensor(0.1 * 1e-6), rtol=1e-3, atol=0)  # (1 - beta1) * clipped


def test_training_state_round_trip_continues_exactly(tmp_path):
    trainer = MetaTrainer(SMALL)
    for _ in range(3):
        trainer.meta_step()
    checkpointing.save_atomic(trainer.state_dict(), tmp_path / "t.pt")
    resumed = MetaTrainer(SMALL)
    resumed.load_state_dict(checkpointing.load(tmp_path / "t.pt"))
    assert resumed.step == 3 and resumed.counters == trainer.counters
    for _ in range(3):
        a, b = trainer.meta_step(), resumed.meta_step()
        torch.testing.assert_close(torch.tensor(list(a.values())), torch.tensor(list(b.values())), rtol=0, atol=0,
                                   equal_nan=True)
    for p, q in zip(trainer.params, resumed.params):
        assert torch.equal(p, q)
    with pytest.raises(ValueError, match="different values of \\['unroll_length'\\]"):
        MetaTrainer(dataclasses.replace(SMALL, unroll_length=3)).load_state_dict(checkpointing.load(tmp_path / "t.pt"))
    with pytest.raises(ValueError, match="written by 1 processes"):
        MetaTrainer(SMALL, Group(0, 2)).load_state_dict(checkpointing.load(tmp_path / "t.pt"))
