"""Task configs and built tasks: validation, seeded init and batches, functional losses and metrics."""

from __future__ import annotations

import dataclasses
import json
import math
import random

import pytest
import torch

from meta_train.tasks import HELD_OUT, Task, TaskConfig, sample_task_config

MLP_DIGITS = TaskConfig("digits", "mlp", depth=2, width=32, batch_size=64)
CNN_BN = TaskConfig("digits", "cnn", depth=2, width=8, batchnorm=True, batch_size=32)
CNN_PLAIN = TaskConfig("digits", "cnn", depth=1, width=4, activation="tanh", batch_size=16)
REGRESSION = TaskConfig("teacher", "mlp", depth=2, width=64, activation="gelu", batch_size=64)
SMALL_TASKS = (MLP_DIGITS, CNN_BN, CNN_PLAIN, REGRESSION)
task_ids = pytest.mark.parametrize("config", SMALL_TASKS, ids=lambda c: f"{c.dataset}-{c.arch}-bn{int(c.batchnorm)}")


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def grads_of(loss: torch.Tensor, params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return dict(zip(params, torch.autograd.grad(loss, list(params.values()))))


def trainable(params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.requires_grad_() for k, v in params.items()}


def test_config_round_trips_through_json():
    rng = random.Random(1)
    configs = [sample_task_config(rng) for _ in range(20)] + list(HELD_OUT)
    for config in configs:
        d = json.loads(json.dumps(config.to_dict()))
        assert TaskConfig.from_dict(d) == config


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"dataset": "mnist"}, "unknown dataset"),
        ({"activation": "sigmoid"}, "unknown activation"),
        ({"arch": "rnn"}, "unknown arch"),
        ({"width": 8}, "width 8 out of range for mlp"),
        ({"width": 129}, "width 129 out of range for mlp"),
        ({"arch": "cnn", "dataset": "digits", "width": 64}, "width 64 out of range for cnn"),
        ({"depth": 0}, "depth must be >= 1"),
        ({"depth": 5}, "depth 5 out of range for mlp"),
        ({"arch": "cnn", "dataset": "digits", "width": 8, "depth": 4}, "depth 4 out of range for cnn"),
        ({"depth": 2.0}, "depth must be an int"),
        ({"batchnorm": True}, "batchnorm is only available"),
        ({"arch": "cnn", "width": 8}, "needs an image dataset"),
        ({"batch_size": 0}, "batch_size must be >= 1"),
        ({"horizon": 0}, "horizon must be >= 1"),
        ({"seed": -1}, "seed must be >= 0"),
        ({"init_scale": 0.0}, "init_scale"),
        ({"init_scale": math.nan}, "init_scale"),
    ],
)
def test_bad_config_values_raise(overrides, message):
    with pytest.raises(ValueError, match=message):
        TaskConfig(**{"dataset": "iris", **overrides})


def test_from_dict_rejects_unknown_fields():
    with pytest.raises(ValueError, match="unknown TaskConfig fields"):
        TaskConfig.from_dict({**MLP_DIGITS.to_dict(), "lr": 0.1})


# --- tasks ------------------------------------------------------------------------------------


@task_ids
def test_shapes(config):
    task = Task(config)
    params = task.init_params(seeded(0))
    assert {k: v.shape for k, v in params.items()} == {k: v.shape for k, v in task.model.named_parameters()}
    assert set(task.buffers()) == {k for k, _ in task.model.named_buffers()}
    assert bool(task.buffers()) == config.batchnorm
    x, y = task.sample_batch(seeded(0))
    assert x.shape == (config.batch_size, *task.dataset.input_shape) and len(y) == config.batch_size
    loss, _ = task.loss(params, task.buffers(), x, y)
    assert loss.shape == () and torch.isfinite(loss)
    if config.arch == "cnn":
        module_types = {type(m).__name__ for m in task.model.modules()}
        assert {"Conv2d", "AdaptiveAvgPool2d", "Linear"} <= module_types
        assert ("BatchNorm2d" in module_types) == config.batchnorm
    else:
        assert sum(isinstance(m, torch.nn.Linear) for m in task.model.modules()) == config.depth + 1


@task_ids
def test_init_and_batches_deterministic(config):
    task, again = Task(config), Task(config)
    p0, p0b, p1 = task.init_params(seeded(0)), again.init_params(seeded(0)), task.init_params(seeded(1))
    for k in p0:
        assert torch.equal(p0[k], p0b[k])
    assert any(not torch.equal(p0[k], p1[k]) for k in p0)
    (x0, y0), (x0b, y0b) = task.sample_batch(seeded(5)), again.sample_batch(seeded(5))
    x1, _ = task.sample_batch(seeded(6))
    assert torch.equal(x0, x0b) and torch.equal(y0, y0b) and not torch.equal(x0, x1)
    module = task.build_module(seeded(0))
    for k, v in module.named_parameters():
        assert torch.equal(v, p0[k])


def test_generator_streams_follow_config_seed():
    def draw(t: Task, stream: str) -> torch.Tensor:
        return torch.rand(4, generator=t.generator(stream))

    task = Task(MLP_DIGITS)
    assert torch.equal(draw(task, "init"), draw(Task(MLP_DIGITS), "init"))
    assert not torch.equal(draw(task, "init"), draw(task, "data"))
    assert not torch.equal(draw(task, "init"), draw(Task(dataclasses.replace(MLP_DIGITS, seed=1)), "init"))


def test_building_a_task_leaves_the_global_rng_alone():
    state = torch.get_rng_state()
    Task(CNN_BN).init_params(seeded(0))
    assert torch.equal(torch.get_rng_state(), state)


def test_init_scale_multiplies_default_init():
    task = Task(CNN_BN)
    base = task.init_params(seeded(0))
    scaled = Task(dataclasses.replace(CNN_BN, init_scale=2.0)).init_params(seeded(0))
    modules = dict(task.model.named_modules())
    for k, v in base.items():
        is_norm = isinstance(modules[k.rsplit(".", 1)[0]], torch.nn.BatchNorm2d)
        torch.testing.assert_close(scaled[k], v if is_norm else 2 * v)
    w = base["0.weight"]
    bound = 1 / math.sqrt(w[0].numel())
    assert w.abs().max() <= bound and w.abs().max() > 0.8 * bound


@task_ids
def test_loss_differentiable_for_every_param(config):
    task = Task(config)
    params = trainable(task.init_params(seeded(0)))
    loss, _ = task.loss(params, task.buffers(), *task.sample_batch(seeded(0)))
    for name, g in grads_of(loss, params).items():
        assert torch.isfinite(g).all() and g.abs().max() > 1e-5, name  # not merely rounding noise


def test_functional_batchnorm_matches_module_in_train_mode():
    task = Task(CNN_BN)
    module = task.build_module(seeded(0))
    params = {k: v.detach() for k, v in module.named_parameters()}
    buffers = task.buffers()
    before = {k: v.clone() for k, v in buffers.items()}
    x, y = task.sample_batch(seeded(1))
    loss, new_buffers = task.loss(params, buffers, x, y)
    torch.testing.assert_close(loss, task.criterion(module(x), y))
    for k, v in module.named_buffers():
        torch.testing.assert_close(new_buffers[k], v)
    assert not torch.equal(new_buffers["1.running_mean"], before["1.running_mean"])
    for k in buffers:  # the caller's buffers are untouched
        assert torch.equal(buffers[k], before[k])


def test_buffers_reused_across_steps_keep_autograd_valid():
    """Train steps that reuse one buffer dict, and an eval-mode loss that reads running stats, share one graph."""
    task = Task(CNN_BN)
    params = trainable(task.init_params(seeded(0)))
    l1, b1 = task.loss(params, task.buffers(), *task.sample_batch(seeded(1)))
    full = task.full_train_loss(params, b1)
    l2, _ = task.loss(params, b1, *task.sample_batch(seeded(2)))
    l2b, _ = task.loss(params, b1, *task.sample_batch(seeded(3)))
    grads = grads_of(l1 + l2 + l2b + full, params)
    assert all(torch.isfinite(g).all() for g in grads.values())


def test_metrics_are_the_test_split_loss_and_accuracy_in_eval_mode():
    task = Task(CNN_BN)
    params = task.init_params(seeded(0))
    _, buffers = task.loss(params, task.buffers(), *task.sample_batch(seeded(0)))  # running statistics that moved
    module = task.build_module(seeded(0))
    module.load_state_dict({**params, **buffers})
    with torch.no_grad():
        output = module.eval()(task.dataset.x_test)
    y = task.dataset.y_test
    metrics = task.test_metrics(params, buffers)
    assert set(metrics) == {"loss", "accuracy"}
    assert metrics["loss"] == pytest.approx(torch.nn.functional.cross_entropy(output, y).item(), rel=1e-6)
    assert metrics["accuracy"] == pytest.approx((output.argmax(1) == y).double().mean().item(), abs=0.5 / len(y))
    assert task.test_metrics(params, task.buffers())["loss"] != metrics["loss"]  # the running statistics are used
    regression = Task(REGRESSION)
    assert set(regression.test_metrics(regression.init_params(seeded(0)), {})) == {"loss"}


HOLDOUT_TEACHER = TaskConfig("teacher", "mlp", depth=1, width=16, batch_size=128, data_seed=2)


def rows(x: torch.Tensor) -> set[bytes]:
    return {r.numpy().tobytes() for r in x.reshape(len(x), -1)}


def test_a_holdout_task_never_trains_on_its_validation_rows():
    """Training batches come from the fit rows only, validation batches from the validation rows
    only, and neither from the test split (teacher inputs are continuous: no two rows coincide)."""
    task = Task(HOLDOUT_TEACHER, holdout=True)
    d = task.dataset
    fit, val, test = rows(d.x_train[task.fit_index]), rows(d.x_train[task.val_index]), rows(d.x_test)
    assert len(fit) == len(task.fit_index) and len(val) == len(task.val_index) and not fit & val and not val & test
    data, held_out = task.generator("data"), task.generator("val")
    trained, validated = set(), set()
    for _ in range(40):
        trained |= rows(task.sample_batch(data)[0])
        validated |= rows(task.sample_val_batch(held_out)[0])
    assert trained <= fit and validated <= val and len(validated) > len(val) // 2
    whole = Task(HOLDOUT_TEACHER)  # without holdout: the whole training split, as before
    g = seeded(0)
    assert not whole.holdout and set().union(*(rows(whole.sample_batch(g)[0]) for _ in range(5))) & val
    with pytest.raises(RuntimeError, match="holdout=True"):
        whole.sample_val_batch(seeded(0))
    x, y = task.sample_batch(seeded(0))
    i = task.fit_index[torch.randint(len(task.fit_index), (HOLDOUT_TEACHER.batch_size,), generator=seeded(0))]
    assert torch.equal(x, d.x_train[i]) and torch.equal(y, d.y_train[i])


def test_validation_batches_are_reproducible_from_the_seed():
    def batches(config: TaskConfig) -> list[torch.Tensor]:
        task = Task(config, holdout=True)
        g = task.generator("val")
        return [task.sample_val_batch(g)[0] for _ in range(3)]

    a, b = batches(HOLDOUT_TEACHER), batches(HOLDOUT_TEACHER)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(a[0], batches(dataclasses.replace(HOLDOUT_TEACHER, seed=1))[0])


def test_eval_loss_is_the_eval_mode_loss_and_leaves_the_buffers_alone():
    task = Task(CNN_BN, holdout=True)
    params = trainable(task.init_params(seeded(0)))
    _, buffers = task.loss(params, task.buffers(), *task.sample_batch(seeded(0)))  # running statistics that moved
    before = {k: v.clone() for k, v in buffers.items()}
    x, y = task.sample_val_batch(seeded(1))
    loss = task.eval_loss(params, buffers, x, y)
    module = task.build_module(seeded(0))
    module.load_state_dict({**{k: v.detach() for k, v in params.items()}, **buffers})
    with torch.no_grad():
        torch.testing.assert_close(loss.detach(), task.criterion(module.eval()(x), y))
    assert all(torch.equal(buffers[k], before[k]) for k in buffers)
    assert all(torch.isfinite(g).all() and g.abs().max() > 0 for g in grads_of(loss, params).values())
    full = task.full_val_loss(params, buffers).detach()
    with torch.no_grad():
        val = task.val_index
        torch.testing.assert_close(full, task.criterion(module(task.dataset.x_train[val]), task.dataset.y_train[val]))


@pytest.mark.parametrize(
    "config, steps, lr, ratio",
    [(MLP_DIGITS, 200, 1e-2, 0.01), (CNN_BN, 300, 2e-2, 0.4), (REGRESSION, 300, 1e-2, 0.25)],
    ids=["mlp-digits", "cnn-bn-digits", "regression"],
)
def test_adam_on_module_reduces_training_loss(config, steps, lr, ratio):
    task = Task(config)
    module = task.build_module(task.generator("init"))

    def full_loss() -> float:
        return task.full_train_loss(dict(module.named_parameters()), dict(module.named_buffers())).item()

    before = full_loss()
    opt = torch.optim.Adam(module.parameters(), lr=lr)
    data = task.generator("data")
    for _ in range(steps):
        x, y = task.sample_batch(data)
        opt.zero_grad()
        task.criterion(module(x), y).backward()
        opt.step()
    assert full_loss() < ratio * before
