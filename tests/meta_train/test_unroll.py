"""Truncated unrolls: meta-gradients reach the rule, carry-over is detached, graphs are freed."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch

from meta_train.tasks import TaskConfig
from meta_train.unroll import InnerRun

from ..rules import fresh_rule, open_rule

# tanh on Gaussian inputs: no gradient element is exactly zero (second-order unrolls stay finite).
TEACHER = TaskConfig("teacher", "mlp", depth=2, width=16, activation="tanh", batch_size=32, horizon=100)
CNN_BN = TaskConfig("digits", "cnn", depth=2, width=4, batchnorm=True, batch_size=16, horizon=100)


def start(config: TaskConfig = TEACHER, rule=None) -> InnerRun:
    rule = rule or fresh_rule()
    return InnerRun.start(config, rule.config.features)


def meta_grads(rule, run: InnerRun, length: int, first_order: bool) -> tuple[torch.Tensor, list[torch.Tensor]]:
    meta_loss, _ = run.unroll(rule, length, first_order)
    return meta_loss, list(torch.autograd.grad(meta_loss, list(rule.parameters())))


@pytest.mark.parametrize("first_order", [True, False], ids=["first-order", "second-order"])
def test_meta_gradient_reaches_every_rule_parameter(first_order):
    rule = open_rule(std=0.1)
    meta_loss, grads = meta_grads(rule, start(TEACHER, rule), 3, first_order)
    assert torch.isfinite(meta_loss)
    for (name, _), g in zip(rule.named_parameters(), grads):
        assert torch.isfinite(g).all() and g.abs().sum() > 0, name


def test_first_and_second_order_give_different_meta_gradients():
    rule = open_rule(std=0.1)
    loss1, first = meta_grads(rule, start(TEACHER, rule), 3, first_order=True)
    loss2, second = meta_grads(rule, start(TEACHER, rule), 3, first_order=False)
    torch.testing.assert_close(loss1, loss2)  # the same unroll forward
    flat1, flat2 = torch.cat([g.flatten() for g in first]), torch.cat([g.flatten() for g in second])
    assert not torch.allclose(flat1, flat2, rtol=1e-3, atol=0)


def test_meta_loss_is_mean_log_inner_loss_of_the_unroll():
    rule = fresh_rule()
    run = start(TEACHER, rule)
    meta_loss, info = run.unroll(rule, 4, first_order=True)
    assert info["steps"] == 4 and info["losses"].shape == (4,) and run.step == 4
    torch.testing.assert_close(meta_loss, torch.log(info["losses"] + 1e-8).mean())
    assert run.loss == info["losses"][-1]


@pytest.mark.parametrize("config", [TEACHER, CNN_BN], ids=["mlp", "cnn-batchnorm"])
def test_carry_over_is_detached_and_continues_the_same_trajectory(config):
    rule = open_rule(std=0.1)
    split, whole = start(config, rule), start(config, rule)
    first, _ = split.unroll(rule, 2, first_order=False)
    first.backward()  # frees the first truncation's graph
    carried = [*split.params, *split.grads, *split.buffers.values(), *(v for s in split.states for v in s.values())]
    assert all(not t.requires_grad and t.grad_fn is None for t in carried)
    second, _ = split.unroll(rule, 3, first_order=False)
    second.backward()  # would raise if any graph reached back into the first truncation
    whole.unroll(rule, 5, first_order=False)
    for a, b in zip(split.params, whole.params):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    assert split.step == whole.step == 5


def test_unroll_stops_at_the_horizon():
    rule = fresh_rule()
    run = start(TaskConfig("iris", "mlp", depth=1, width=16, horizon=5), rule)
    assert run.unroll(rule, 3, True)[1]["steps"] == 3 and not run.done
    assert run.unroll(rule, 3, True)[1]["steps"] == 2 and run.done
    with pytest.raises(RuntimeError, match="done"):
        run.unroll(rule, 3, True)


def test_state_dict_round_trip_continues_exactly():
    rule = open_rule(std=0.1)
    run = start(CNN_BN, rule)
    run.unroll(rule, 2, first_order=True)
    copy = InnerRun.from_state_dict(run.state_dict())
    a, _ = run.unroll(rule, 3, first_order=True)
    b, _ = copy.unroll(rule, 3, first_order=True)
    assert torch.equal(a, b)
    for x, y in zip(run.params, copy.params):
        assert torch.equal(x, y)


def test_graph_of_a_truncation_is_freed_by_the_next():
    """Every tensor an unroll's graph saved dies once its meta-gradient is taken and the loss
    dropped, but for constants every truncation shares (the rule's weights, cached plan indices)."""
    rule = open_rule(std=0.1)
    run = start(CNN_BN, rule)
    saved: list[list[weakref.ref]] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved[-1].append(weakref.ref(t))
        return t

    for _ in range(4):
        saved.append([])
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss, _ = run.unroll(rule, 3, first_order=False)
        torch.autograd.grad(loss, list(rule.parameters()))
        del loss
    gc.collect()
    shared = {id(r()) for r in saved[-1] if r() is not None}
    alive = [r() for r in saved[0] if r() is not None and id(r()) not in shared]
    assert len(saved[0]) > 100 and not alive, [tuple(t.shape) for t in alive]


def test_live_tensors_stay_flat_over_30_truncations():
    rule = open_rule(std=0.1)
    run = start(TEACHER, rule)

    def live_tensors() -> int:
        gc.collect()
        return sum(type(o) is torch.Tensor or type(o) is torch.nn.Parameter for o in gc.get_objects())

    counts = []
    for i in range(30):
        loss, _ = run.unroll(rule, 2, first_order=False)
        torch.autograd.grad(loss, list(rule.parameters()))
        del loss
        if i in (4, 29):
            counts.append(live_tensors())
    assert counts[1] <= counts[0]


def test_second_order_meta_gradient_is_finite_where_gradients_are_exactly_zero():
    rule = open_rule(std=0.1)
    run = start(TaskConfig("digits", "mlp", depth=2, width=16, batch_size=32, horizon=100), rule)
    assert any((g == 0).any() for g in run.grads)
    _, grads = meta_grads(rule, run, 2, first_order=False)
    assert all(torch.isfinite(g).all() for g in grads)


def test_runs_unrolled_together_follow_their_own_trajectories() -> None:
    """Runs of different tasks (and horizons: one ends inside the truncation) unrolled together
    take the steps, losses and meta-gradients they take alone, to float32 rounding."""
    from meta_train.unroll import unroll_together

    rule = open_rule()
    short = TaskConfig("teacher", "mlp", depth=2, width=16, activation="tanh", batch_size=32, horizon=3)
    configs = [TEACHER, CNN_BN, short]
    together, alone = [start(c, rule) for c in configs], [start(c, rule) for c in configs]
    results = unroll_together(together, rule, 5, first_order=False)
    for (meta_loss, info), run, twin in zip(results, together, alone):
        twin_loss, twin_info = twin.unroll(rule, 5, first_order=False)
        assert info["steps"] == twin_info["steps"] and run.step == twin.step
        torch.testing.assert_close(info["losses"], twin_info["losses"], rtol=1e-5, atol=1e-6)
        for p, q in zip(run.params, twin.params):
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
        for g, h in zip(torch.autograd.grad(meta_loss, list(rule.parameters()), retain_graph=True),
                        torch.autograd.grad(twin_loss, list(rule.parameters()))):
            torch.testing.assert_close(g, h, rtol=1e-4, atol=1e-6)
    assert [r.step for r in together] == [5, 5, 3]


def test_without_a_validation_weight_no_held_out_loss_is_computed(monkeypatch):
    """val_weight=0 is the meta-loss of before: the mean log training loss, with no held-out
    forward (none is drawn or scored), on a task that trains on its whole training split."""
    from meta_train.tasks import Task

    def refuse(*args, **kwargs):
        raise AssertionError("a held-out loss was computed at val_weight=0")

    monkeypatch.setattr(Task, "sample_val_batch", refuse)
    monkeypatch.setattr(Task, "eval_loss", refuse)
    rule = open_rule(std=0.1)
    run, twin = start(CNN_BN, rule), start(CNN_BN, rule)
    assert not run.task.holdout and run.val_generator is None
    meta_loss, info = run.unroll(rule, 3, first_order=False, val_weight=0.0)
    assert set(info) == {"losses", "steps"}
    assert torch.equal(meta_loss, torch.log(info["losses"] + 1e-8).mean())
    twin_loss, _ = twin.unroll(rule, 3, first_order=False)  # the default
    assert torch.equal(meta_loss, twin_loss)


def test_validation_weight_one_is_the_mean_log_held_out_loss():
    """Checked against the held-out losses computed directly, one step at a time, at the
    parameters and buffers after each step."""
    from meta_train.tasks import Task

    rule = open_rule(std=0.1)
    run = InnerRun.start(CNN_BN, rule.config.features, holdout=True)
    stepped = InnerRun.start(CNN_BN, rule.config.features, holdout=True)
    meta_loss, info = run.unroll(rule, 3, first_order=False, val_weight=1.0)
    task = Task(CNN_BN, holdout=True)
    generator, direct = task.generator("val"), []
    for _ in range(3):
        stepped.unroll(rule, 1, first_order=False)  # carries on the same trajectory
        x, y = task.sample_val_batch(generator)
        direct.append(task.eval_loss(dict(zip(stepped.names, stepped.params)), stepped.buffers, x, y))
    expected = torch.log(torch.stack(direct) + 1e-8).mean()
    torch.testing.assert_close(meta_loss.detach(), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(info["val_losses"], torch.stack(direct), rtol=1e-5, atol=1e-6)
    assert torch.equal(info["log_val_loss"], meta_loss.detach())
    torch.testing.assert_close(info["log_train_loss"], torch.log(info["losses"] + 1e-8).mean())


def test_half_validation_weight_mixes_the_terms_and_changes_the_meta_gradient():
    rule = open_rule(std=0.1)
    runs = {w: InnerRun.start(TEACHER, rule.config.features, holdout=True) for w in (0.0, 0.25, 0.5)}
    out = {w: meta_grads_at(rule, run, w) for w, run in runs.items()}
    (loss0, _, grads0), (loss5, info, grads5) = out[0.0], out[0.5]
    torch.testing.assert_close(loss5.detach(), 0.5 * info["log_train_loss"] + 0.5 * info["log_val_loss"])
    loss25, info25, _ = out[0.25]
    torch.testing.assert_close(loss25.detach(), 0.75 * info25["log_train_loss"] + 0.25 * info25["log_val_loss"])
    assert info25["log_train_loss"] != info25["log_val_loss"]
    torch.testing.assert_close(loss0.detach(), info["log_train_loss"])  # the same training trajectory
    assert torch.isfinite(grads5).all() and grads5.abs().sum() > 0
    assert not torch.allclose(grads0, grads5, rtol=1e-3, atol=0)
    assert not torch.allclose(0.5 * grads0, grads5, rtol=1e-3, atol=0)  # the held-out term has a gradient


def meta_grads_at(rule, run: InnerRun, val_weight: float):
    meta_loss, info = run.unroll(rule, 3, first_order=False, val_weight=val_weight)
    grads = torch.autograd.grad(meta_loss, list(rule.parameters()))
    return meta_loss, info, torch.cat([g.flatten() for g in grads])


def test_a_held_out_meta_loss_needs_a_run_that_holds_out_and_a_weight_in_range():
    rule = fresh_rule()
    with pytest.raises(ValueError, match="holdout=True"):
        start(TEACHER, rule).unroll(rule, 2, first_order=True, val_weight=0.5)
    with pytest.raises(ValueError, match="in \\[0, 1\\]"):
        InnerRun.start(TEACHER, rule.config.features, holdout=True).unroll(rule, 2, True, val_weight=1.5)


def test_held_out_batches_are_reproducible_and_survive_a_state_dict_round_trip():
    rule = open_rule(std=0.1)
    a, b = (InnerRun.start(CNN_BN, rule.config.features, holdout=True) for _ in range(2))
    la, ia = a.unroll(rule, 2, first_order=True, val_weight=0.5)
    lb, ib = b.unroll(rule, 2, first_order=True, val_weight=0.5)
    assert torch.equal(la, lb) and torch.equal(ia["val_losses"], ib["val_losses"])
    copy = InnerRun.from_state_dict(a.state_dict())
    assert copy.task.holdout
    x, _ = a.unroll(rule, 3, first_order=True, val_weight=0.5)
    y, _ = copy.unroll(rule, 3, first_order=True, val_weight=0.5)
    assert torch.equal(x, y)
