"""The broader task architectures: residual MLPs, autoencoders, CNNs with a conv bias before
BatchNorm, character transformers, LSTMs and GRUs, and the bare labelling."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from meta_train.tasks import Task, TaskConfig
from meta_train.tasks.data import load_dataset
from meta_train.tasks.task import MAX_EVAL_ROWS
from meta_train.unroll import InnerRun, task_spec
from nfopt.labelling import label_model
from nfopt.labelling.permutation import ModelLabelling, invariance_error
from nfopt.weight_space import MonomialSpec, WeightSpaceSpec

from ...rules import open_rule

RESMLP = TaskConfig("digits", "resmlp", depth=2, width=16, activation="gelu", batch_size=16)
CNN_BN_BIAS = TaskConfig("digits", "cnn", depth=2, width=4, batchnorm=True, conv_bias=True, batch_size=16)
AUTOENCODER = TaskConfig("breast_cancer", "autoencoder", depth=1, width=16, activation="tanh", batch_size=16)
TRANSFORMER = TaskConfig("chars", "transformer", depth=2, width=16, activation="gelu", batch_size=8)
TRANSFORMER_CLS = TaskConfig("chars_source", "transformer", depth=1, width=16, activation="tanh", batch_size=8)
LSTM = TaskConfig("chars", "lstm", depth=1, width=16, activation="tanh", batch_size=8)
GRU = TaskConfig("chars", "gru", depth=1, width=16, activation="tanh", batch_size=8)
GRU_CLS = TaskConfig("chars_source", "gru", depth=1, width=16, activation="tanh", batch_size=8)
NEW_ARCHS = (RESMLP, CNN_BN_BIAS, AUTOENCODER, TRANSFORMER, TRANSFORMER_CLS, LSTM, GRU, GRU_CLS)
arch_ids = pytest.mark.parametrize("config", NEW_ARCHS, ids=lambda c: f"{c.arch}-{c.dataset}")


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@arch_ids
def test_functional_call_matches_the_module(config):
    """The loss of the functional model on init_params equals the module's, in train and eval mode,
    and its outputs have the layout the criterion reads."""
    task = Task(config)
    params = task.init_params(seeded(0))
    assert list(params) == [n for n, _ in task.model.named_parameters()]
    module = task.build_module(seeded(0))
    x, y = task.sample_batch(seeded(1))
    loss, _ = task.loss(params, task.buffers(), x, y)
    torch.testing.assert_close(loss, task.criterion(module(x), y))
    module = task.build_module(seeded(0)).eval()  # its initial running statistics (BatchNorm)
    with torch.no_grad():
        out = module(x)
    n, d = len(x), task.dataset
    expected = {"autoencoder": (n, x[0].numel())}.get(config.arch, (n, d.n_outputs, x.shape[1]) if d.per_position
                                                       else (n, d.n_outputs))
    assert out.shape == expected
    torch.testing.assert_close(task.eval_loss(params, task.buffers(), x, y), task.criterion(out, y))
    metrics = task.test_metrics(params, task.buffers())
    with torch.no_grad():
        test_out = module(d.x_test[:MAX_EVAL_ROWS])
    assert metrics["loss"] == pytest.approx(task.criterion(test_out, d.y_test[:MAX_EVAL_ROWS]).item(), rel=1e-5)
    assert ("accuracy" in metrics) == (config.arch != "autoencoder")


@arch_ids
def test_every_parameter_gets_a_gradient(config):
    """Every tensor trains, except a conv bias before BatchNorm, whose gradient is rounding noise."""
    task = Task(config)
    params = {k: v.requires_grad_() for k, v in task.init_params(seeded(0)).items()}
    loss, _ = task.loss(params, task.buffers(), *task.sample_batch(seeded(0)))
    grads = dict(zip(params, torch.autograd.grad(loss, list(params.values()))))
    for name, g in grads.items():
        assert torch.isfinite(g).all(), name
        if config.conv_bias and name in ("0.bias", "3.bias"):
            assert g.abs().max() < 1e-5, name  # cancelled by the normalisation
        else:
            assert g.abs().max() > 1e-6, name


def test_cnn_conv_bias_before_batchnorm_is_a_parameter():
    with_bias = dict(Task(CNN_BN_BIAS).model.named_parameters())
    without = dict(Task(dataclasses.replace(CNN_BN_BIAS, conv_bias=False)).model.named_parameters())
    assert set(with_bias) - set(without) == {"0.bias", "3.bias"}
    with pytest.raises(ValueError, match="conv_bias .* needs batchnorm"):
        dataclasses.replace(CNN_BN_BIAS, batchnorm=False)


def test_init_follows_pytorch_defaults_times_the_scale():
    for config in (TRANSFORMER, LSTM, RESMLP):
        task = Task(config)
        base = task.init_params(seeded(0))
        scaled = Task(dataclasses.replace(config, init_scale=3.0)).init_params(seeded(0))
        modules = dict(task.model.named_modules())
        for name, v in base.items():
            owner = modules[name.rsplit(".", 1)[0]]
            if isinstance(owner, nn.LayerNorm):
                assert torch.equal(v, torch.ones_like(v) if name.endswith("weight") else torch.zeros_like(v)), name
                assert torch.equal(scaled[name], v), name  # the identity whatever the scale
            else:
                torch.testing.assert_close(scaled[name], 3 * v)
    lstm = Task(LSTM).init_params(seeded(0))
    assert 0.9 / 4 < lstm["rnn.weight_hh_l0"].abs().max() <= 1 / 4  # uniform in ±1/sqrt(hidden)
    tf = Task(TRANSFORMER).init_params(seeded(0))
    assert 0.8 < tf["embed.weight"].std() < 1.2  # standard normal
    for layer in range(2):
        prefix = f"encoder.layers.{layer}.self_attn"
        assert not tf[f"{prefix}.in_proj_bias"].any() and not tf[f"{prefix}.out_proj.bias"].any()
        assert tf[f"{prefix}.in_proj_weight"].abs().max() <= (6 / (48 + 16)) ** 0.5  # Xavier uniform
    tf_other = Task(TRANSFORMER).init_params(seeded(1))
    assert not torch.equal(tf["encoder.layers.0.linear1.weight"], tf_other["encoder.layers.0.linear1.weight"])


@arch_ids
def test_labelling_couples_and_its_group_leaves_the_output_unchanged(config):
    task = Task(config)
    x = task.sample_batch(seeded(0))[0]
    labelling = label_model(task.model, (x[:2],))
    sizes = labelling.coupled_sets
    assert sizes and config.width in sizes.values()
    module = task.build_module(seeded(0))
    assert invariance_error(module, labelling, (x,), trials=2, generator=seeded(1)) < 1e-4
    # not vacuous: a labelling that leaves the head's input axis out of its set is caught
    *body, head_weight, head_bias = labelling.params.tensors
    assert head_weight.axes[1] in sizes
    broken = dataclasses.replace(head_weight, axes=(head_weight.axes[0], "head input alone"))
    wrong = ModelLabelling(WeightSpaceSpec((*body, broken, head_bias)), labelling.buffers)
    assert invariance_error(module, wrong, (x,), trials=2, generator=seeded(1)) > 1e-3


@pytest.mark.parametrize("config", [RESMLP, TRANSFORMER, LSTM], ids=lambda c: c.arch)
def test_bare_tasks_get_the_independent_spec(config):
    bare = Task(dataclasses.replace(config, labelling="bare"))
    names = [n for n, _ in bare.model.named_parameters()]
    shapes = [p.shape for _, p in bare.model.named_parameters()]
    assert task_spec(bare) == WeightSpaceSpec.independent(shapes, names)
    signed = task_spec(bare, sign_flips=True)
    assert isinstance(signed, MonomialSpec) and signed.space == WeightSpaceSpec.independent(shapes, names)
    assert signed.symmetries == ()
    coupled = task_spec(Task(config))
    assert coupled != task_spec(bare) and any(len(axes) > 1 for axes in coupled.set_members.values())
    assert task_spec(bare) is task_spec(Task(dataclasses.replace(config, labelling="bare", seed=5)))  # cached


@pytest.mark.parametrize("labelling", ["coupled", "bare"])
@arch_ids
def test_meta_steps_run_on_every_arch(config, labelling):
    """Two truncations of a meta-training unroll (second order, sign-flip rule, held-out meta-loss):
    a finite meta-loss whose gradient reaches the rule."""
    rule = open_rule(sign_flips=True)
    run = InnerRun.start(dataclasses.replace(config, labelling=labelling, horizon=4), rule.config.features,
                         holdout=True)
    for _ in range(2):
        meta_loss, info = run.unroll(rule, 2, first_order=False, val_weight=0.5)
        grads = torch.autograd.grad(meta_loss, list(rule.parameters()), allow_unused=True)
        assert torch.isfinite(meta_loss) and info["steps"] == 2
        assert all(g is None or torch.isfinite(g).all() for g in grads)
        assert any(g is not None and g.abs().max() > 0 for g in grads)
    assert run.done and not run.diverged


def test_full_split_evaluations_are_capped():
    task = Task(LSTM, holdout=True)
    assert len(task.dataset.x_train) > MAX_EVAL_ROWS
    params = task.init_params(seeded(0))
    module = task.build_module(seeded(0)).eval()
    fit = task.fit_index[:MAX_EVAL_ROWS]
    with torch.no_grad():
        expected = task.criterion(module(task.dataset.x_train[fit]), task.dataset.y_train[fit])
    torch.testing.assert_close(task.full_train_loss(params, {}), expected)
    assert torch.isfinite(task.full_val_loss(params, {}))


def test_autoencoder_targets_are_its_inputs():
    task = Task(AUTOENCODER)
    d = task.dataset
    assert not task.is_classification and torch.equal(d.y_train, d.x_train.flatten(1))
    assert d.n_outputs == load_dataset("breast_cancer").x_train.shape[1]
    x, y = task.sample_batch(seeded(0))
    assert torch.equal(x.flatten(1), y)
    widths = [m.out_features for m in task.model.modules() if isinstance(m, nn.Linear)]
    assert widths == [16, 4, 16, d.n_outputs]  # a code of width // 4


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"dataset": "chars"}, "cannot read dataset 'chars'"),
        ({"arch": "lstm", "depth": 1}, "cannot read dataset 'iris'"),
        ({"arch": "resmlp", "depth": 6}, "depth 6 out of range for resmlp"),
        ({"arch": "transformer", "dataset": "chars", "width": 20}, "multiple of 8"),
        ({"labelling": "loose"}, "labelling must be one of"),
        ({"conv_bias": 1}, "conv_bias must be a bool"),
    ],
)
def test_bad_new_config_values_raise(overrides, message):
    with pytest.raises(ValueError, match=message):
        TaskConfig(**{"dataset": "iris", **overrides})
