"""The sampled task distribution and its train / held-out split."""

from __future__ import annotations

import dataclasses
import random

import numpy as np
import pytest
import torch

from meta_train.tasks import HELD_OUT, HELD_OUT_V2, Task, TaskConfig, held_out_properties, sample_task_config
from meta_train.tasks.data import DATASETS, TEXT_DATASETS
from meta_train.tasks.distribution import SAMPLED_WIDTHS
from meta_train.tasks.models import ARCHS, SEQUENCE_ARCHS, WIDTH_RANGE


@pytest.mark.parametrize("make_rng", [random.Random, np.random.default_rng], ids=["random", "numpy"])
def test_train_split_never_produces_held_out_properties(make_rng):
    rng = make_rng(0)
    configs = [sample_task_config(rng) for _ in range(2000)]
    held_out_names = {c.name for c in HELD_OUT}
    for c in configs:
        assert c.dataset != "wine"
        assert c.width not in {"mlp": (40, 128), "cnn": (12, 32)}[c.arch]
        assert not (c.arch == "mlp" and c.depth == 4 and c.activation == "gelu")
        assert c.data_seed < 8
        assert held_out_properties(c) == () and c.name not in held_out_names
        assert 16 <= c.batch_size <= 128 and 0.5 <= c.init_scale <= 2.0 and 200 <= c.horizon <= 1000
    # the distribution is not degenerate: every train value of each property occurs
    assert {c.dataset for c in configs} == set(DATASETS) - {"wine"}
    assert {c.activation for c in configs} == {"relu", "tanh", "gelu"}
    assert {(c.arch, c.batchnorm) for c in configs} == {("mlp", False), ("cnn", False), ("cnn", True)}
    assert {c.width for c in configs if c.arch == "mlp"} == {16, 24, 32, 48, 64, 96}
    assert {c.depth for c in configs if c.arch == "cnn"} == {1, 2, 3}


def test_held_out_tasks():
    assert len({c.name for c in HELD_OUT}) == len(HELD_OUT) and all(c.name for c in HELD_OUT)
    assert any(c.arch == "cnn" for c in HELD_OUT)
    for c in HELD_OUT:
        assert held_out_properties(c), c.name
        task = Task(c)
        loss, _ = task.loss(task.init_params(torch.Generator().manual_seed(0)), task.buffers(), *task.sample_batch(torch.Generator().manual_seed(0)))
        assert torch.isfinite(loss)
    for arch, widths in SAMPLED_WIDTHS.items():
        assert all(WIDTH_RANGE[arch][0] <= w <= WIDTH_RANGE[arch][1] for w in widths)


def test_sampling_deterministic_split_and_ranges():
    assert [sample_task_config(random.Random(7)) for _ in range(3)] == [sample_task_config(random.Random(7))] * 3
    rng = random.Random(0)
    assert sample_task_config(rng) != sample_task_config(rng)
    held = [sample_task_config(rng, split="held_out", horizon_range=(10, 20)) for _ in range(200)]
    assert all(held_out_properties(c) and 10 <= c.horizon <= 20 for c in held)
    assert {c.horizon for c in held} == set(range(10, 21))
    with pytest.raises(ValueError, match="unknown split"):
        sample_task_config(rng, split="test")
    with pytest.raises(ValueError, match="horizon_range"):
        sample_task_config(rng, horizon_range=(100, 10))


def test_activation_narrows_the_distribution_and_keeps_the_split():
    plain = [sample_task_config(random.Random(s)) for s in range(30)]
    tanh = [sample_task_config(random.Random(s), activation="tanh") for s in range(30)]
    assert all(c.activation == "tanh" and not held_out_properties(c) for c in tanh)
    same = [dataclasses.replace(p, activation="tanh") == t for p, t in zip(plain, tanh)]
    assert sum(same) >= 20  # other fields as drawn, unless the split rejected the first draw
    held = [sample_task_config(random.Random(s), "held_out", activation="tanh") for s in range(30)]
    assert all(c.activation == "tanh" and held_out_properties(c) for c in held)


# --- v1 reproduces, v2 ------------------------------------------------------------------------

V1_DRAWS = [
    ((random.Random(3),), {},
     TaskConfig("digits", "cnn", depth=2, width=24, activation="tanh", batch_size=56, init_scale=1.7625165450082856,
                horizon=425, seed=1006443827, data_seed=3)),
    ((np.random.default_rng([0, 1, 2]),), {},
     TaskConfig("iris", "mlp", depth=2, width=48, activation="gelu", batch_size=20, init_scale=0.6384446945306542,
                horizon=333, seed=1817806093, data_seed=2)),
    ((np.random.default_rng([5, 0, 7]), "train", (50, 60)), {},
     TaskConfig("digits", "cnn", depth=1, width=4, activation="relu", batch_size=21, init_scale=0.582110689804184,
                horizon=57, seed=2072080537, data_seed=4)),
    ((np.random.default_rng(11), "held_out"), {},
     TaskConfig("digits", "cnn", depth=3, width=12, activation="tanh", batchnorm=True, batch_size=16,
                init_scale=0.6138049430426535, horizon=891, seed=1176290586, data_seed=0)),
    ((np.random.default_rng(12), "train", (200, 1000), "tanh"), {"distribution": "v1"},
     TaskConfig("gaussian_mixture", "mlp", depth=4, width=16, activation="tanh", batch_size=23,
                init_scale=0.8121276885249287, horizon=289, seed=2043414477, data_seed=6)),
]


@pytest.mark.parametrize("args, kwargs, expected", V1_DRAWS)
def test_v1_draws_are_those_the_committed_configs_trained_on(args, kwargs, expected):
    """Draws of the sampler before the v2 distribution existed, hard-coded: v1 stays the default."""
    assert sample_task_config(*args, **kwargs) == expected


def test_v2_train_split_never_produces_held_out_or_benchmark_tasks_and_covers_every_arch():
    rng = np.random.default_rng(0)
    configs = [sample_task_config(rng, distribution="v2") for _ in range(2000)]
    for c in configs:
        assert held_out_properties(c) == (), c
        assert c.dataset != "wine" and c.data_seed < 8
        assert not (c.arch in ("resmlp", "autoencoder") and c.width in (40, 128))
        assert not (c.arch == "transformer" and c.depth == 2 and c.width == 32)  # the benchmark's size
        assert not (c.arch in ("lstm", "gru") and c.width == 48)
        assert not (c.arch == "resmlp" and c.depth > 4)  # the benchmark's residual MLP has 6 blocks
        assert 8 <= c.batch_size <= 256 and 0.1 <= c.init_scale <= 10.0 and 200 <= c.horizon <= 1000
        assert (c.arch in SEQUENCE_ARCHS) == (c.dataset in TEXT_DATASETS)
    assert {c.arch for c in configs} == set(ARCHS)
    assert {(c.batchnorm, c.conv_bias) for c in configs if c.arch == "cnn"} == {(False, False), (True, False),
                                                                                  (True, True)}
    assert {c.dataset for c in configs if c.arch in SEQUENCE_ARCHS} == set(TEXT_DATASETS)
    assert {c.depth for c in configs if c.arch == "transformer"} == {1, 2}
    bare = sum(c.labelling == "bare" for c in configs) / len(configs)
    assert 0.45 < bare < 0.55
    scales = sorted(c.init_scale for c in configs)
    assert scales[20] < 0.15 and scales[-20] > 7  # log-uniform over the whole range
    shares = {arch: sum(c.arch == arch for c in configs) / len(configs) for arch in ARCHS}
    assert shares["mlp"] + shares["cnn"] > 0.4 and all(shares[a] < 0.12 for a in SEQUENCE_ARCHS)
    held_out_names = {c.name for c in (*HELD_OUT, *HELD_OUT_V2)}
    assert not {c.name for c in configs} & held_out_names


def test_v2_held_out_split_and_tasks():
    rng = np.random.default_rng(1)
    held = [sample_task_config(rng, "held_out", distribution="v2") for _ in range(300)]
    assert all(held_out_properties(c) for c in held)
    assert {c.arch for c in held} == set(ARCHS)
    assert len({c.name for c in HELD_OUT_V2}) == len(HELD_OUT_V2)
    for c in HELD_OUT_V2:
        assert held_out_properties(c), c.name
        task = Task(c)
        loss, _ = task.loss(task.init_params(torch.Generator().manual_seed(0)), task.buffers(),
                            *task.sample_batch(torch.Generator().manual_seed(0)))
        assert torch.isfinite(loss)
    with pytest.raises(ValueError, match="unknown distribution"):
        sample_task_config(rng, distribution="v3")


def test_v2_initial_losses_are_finite_over_the_init_scales():
    rng = np.random.default_rng(2)
    for _ in range(40):
        c = sample_task_config(rng, distribution="v2")
        for scale in (0.1, 10.0):
            task = Task(dataclasses.replace(c, init_scale=scale))
            params = task.init_params(task.generator("init"))
            loss, _ = task.loss(params, task.buffers(), *task.sample_batch(task.generator("data")))
            assert torch.isfinite(loss), c
