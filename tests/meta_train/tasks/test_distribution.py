"""The sampled task distribution and its train / held-out split."""

from __future__ import annotations

import dataclasses
import random

import numpy as np
import pytest
import torch

from meta_train.tasks import HELD_OUT, Task, held_out_properties, sample_task_config
from meta_train.tasks.data import DATASETS
from meta_train.tasks.distribution import SAMPLED_WIDTHS
from meta_train.tasks.models import WIDTH_RANGE


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
