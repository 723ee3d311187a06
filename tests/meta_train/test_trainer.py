"""The meta-trainer: config, task slots and resampling, dropped and skipped steps, exact resume."""

from __future__ import annotations


import copy
import dataclasses

import pytest
import torch

import meta_train.trainer as trainer_module
from meta_train import checkpointing
from meta_train.distributed import Group
from meta_train.trainer import MetaConfig, MetaTrainer
from meta_train.unroll import InnerRun


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
                         ("activation=swish", "activation must be empty or one of"),
                         ("distribution=v3", "distribution must be one of")]:
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


def test_the_distribution_field_chooses_the_task_draws():
    import numpy as np

    from meta_train.tasks import sample_task_config

    v1, v2 = MetaTrainer(SMALL), MetaTrainer(dataclasses.replace(SMALL, distribution="v2"))
    assert SMALL.distribution == "v1"
    for slot, draw in [(0, 0), (1, 5)]:
        rng = lambda: np.random.default_rng([SMALL.seed, slot, draw])  # noqa: E731
        assert v1.task_config(slot, draw) == sample_task_config(rng(), "train", (4, 6))
        assert v2.task_config(slot, draw) == sample_task_config(rng(), "train", (4, 6), distribution="v2")
    archs = {v2.task_config(0, d).arch for d in range(60)}
    assert archs - {"mlp", "cnn"}  # the broader archs are drawn
    assert {v1.task_config(0, d).arch for d in range(60)} <= {"mlp", "cnn"}


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

    def patched(runs, rule, length, first_order, eps, val_weight):
        results = unroll(runs, rule, length, first_order, eps, val_weight)
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


@pytest.mark.parametrize("estimator", ["tbptt", "pes"])
def test_training_state_round_trip_continues_exactly(tmp_path, estimator):
    config = dataclasses.replace(SMALL, estimator=estimator)
    trainer = MetaTrainer(config)
    for _ in range(3):
        trainer.meta_step()
    checkpointing.save_atomic(trainer.state_dict(), tmp_path / "t.pt")
    resumed = MetaTrainer(config)
    resumed.load_state_dict(checkpointing.load(tmp_path / "t.pt"))
    assert resumed.step == 3 and resumed.counters == trainer.counters
    for _ in range(3):
        a, b = trainer.meta_step(), resumed.meta_step()
        torch.testing.assert_close(torch.tensor(list(a.values())), torch.tensor(list(b.values())), rtol=0, atol=0,
                                   equal_nan=True)
    for p, q in zip(trainer.params, resumed.params):
        assert torch.equal(p, q)
    with pytest.raises(ValueError, match="different values of \\['unroll_length'\\]"):
        MetaTrainer(dataclasses.replace(config, unroll_length=3)).load_state_dict(checkpointing.load(tmp_path / "t.pt"))
    with pytest.raises(ValueError, match="written by 1 processes"):
        MetaTrainer(config, Group(0, 2)).load_state_dict(checkpointing.load(tmp_path / "t.pt"))


def test_pes_steps_along_antithetic_pairs_of_each_task(monkeypatch):
    """A PES meta-step applies the mean over slots of ξ·(L⁺ - L⁻)/(2σ²), each slot's pair being
    two runs of its task at the rule's weights ± the slot's perturbation, recomputed here apart."""
    config = dataclasses.replace(SMALL, estimator="pes", pes_sigma=0.05, clip=1e9)
    trainer = MetaTrainer(config)
    theta = torch.nn.utils.parameters_to_vector(trainer.params).detach().double()
    applied = []
    monkeypatch.setattr(trainer.meta_opt, "step", lambda: applied.append(
        torch.cat([p.grad.flatten() for p in trainer.params]).double()))
    trainer.meta_step()
    expected = []
    for slot in trainer.slots:
        eps = trainer.pes.perturbation(0, slot)
        losses = []
        for sign in (1.0, -1.0):
            rule = copy.deepcopy(trainer.rule).requires_grad_(False)
            torch.nn.utils.vector_to_parameters((theta + sign * eps).float(), rule.parameters())
            run = InnerRun.start(trainer.task_config(slot, 0), rule.config.features)
            losses.append(run.unroll(rule, config.unroll_length, True, config.loss_eps)[0])
        expected.append(eps * (losses[0] - losses[1]).item() / (2 * config.pes_sigma**2))
        assert torch.equal(trainer.pes.xi[slot], eps)
    assert len(applied) == 1
    torch.testing.assert_close(applied[0], torch.stack(expected).mean(0).float().double(), rtol=1e-5, atol=1e-7)
    assert all(r.task.config == t.task.config and r.step == t.step for r, t in zip(trainer.runs, trainer.twins))


def test_a_pes_slot_forgets_its_perturbations_with_a_new_task():
    trainer = MetaTrainer(dataclasses.replace(SMALL, estimator="pes"))
    since = {slot: [] for slot in range(2)}
    for step in range(8):
        drawn = list(trainer.draws)
        trainer.meta_step()
        for i, slot in enumerate(trainer.slots):
            if trainer.draws[i] != drawn[i]:
                since[i] = []
            since[i].append(trainer.pes.perturbation(step, slot))
            torch.testing.assert_close(trainer.pes.xi[i], torch.stack(since[i]).sum(0), rtol=0, atol=1e-12)
    assert max(trainer.draws) > 1  # some slot did start a new task
    with pytest.raises(ValueError, match="estimator must be one of"):
        MetaConfig().with_overrides(["estimator=es"])
    with pytest.raises(ValueError, match="pes_sigma must be positive"):
        MetaConfig().with_overrides(["pes_sigma=0"])


def test_val_weight_holds_out_and_reports_both_terms_and_resumes_exactly(tmp_path):
    held_out = SMALL.with_overrides(["val_weight=0.5"])
    assert held_out.val_weight == 0.5 and MetaConfig.from_dict(held_out.to_dict()) == held_out
    for bad in ("val_weight=-0.1", "val_weight=1.5"):
        with pytest.raises(ValueError, match="val_weight must be in \\[0, 1\\]"):
            MetaConfig().with_overrides([bad])
    plain = MetaTrainer(SMALL)
    stats = plain.meta_step()
    assert not {"log_train_loss", "log_val_loss", "val_loss"} & set(stats)
    assert all(not run.task.holdout and run.val_generator is None for run in plain.runs)

    trainer = MetaTrainer(held_out)
    stats = trainer.meta_step()
    assert all(run.task.holdout for run in trainer.runs)
    assert stats["meta_loss"] == pytest.approx(0.5 * stats["log_train_loss"] + 0.5 * stats["log_val_loss"], rel=1e-5)
    assert stats["val_loss"] > 0 and stats["log_val_loss"] != stats["log_train_loss"]
    checkpointing.save_atomic(trainer.state_dict(), tmp_path / "t.pt")
    resumed = MetaTrainer(held_out)
    resumed.load_state_dict(checkpointing.load(tmp_path / "t.pt"))
    for _ in range(2):
        assert trainer.meta_step() == resumed.meta_step()
    with pytest.raises(ValueError, match="different values of \\['val_weight'\\]"):
        MetaTrainer(SMALL).load_state_dict(checkpointing.load(tmp_path / "t.pt"))
