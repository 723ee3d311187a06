"""The task datasets: standardised, consistent, deterministic from their seed."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from meta_train.tasks import data as datasets
from meta_train.tasks.data import DATASETS, IMAGE_DATASETS, load_dataset


@pytest.mark.parametrize("name", DATASETS)
def test_dataset_loads_standardised_and_consistent(name):
    d = load_dataset(name)
    assert d.x_train.dtype == torch.float32 and d.x_test.dtype == torch.float32
    assert len(d.x_train) == len(d.y_train) > len(d.x_test) == len(d.y_test) > 0
    assert d.x_test.shape[1:] == d.x_train.shape[1:]
    assert torch.isfinite(d.x_train).all() and torch.isfinite(d.x_test).all()
    columns = d.x_train.reshape(len(d.x_train), -1)
    std = columns.std(dim=0, unbiased=False)
    varying = std > 1e-6
    assert varying.sum() >= columns.shape[1] * 0.9  # digits has a few always-blank pixels
    assert columns.mean(dim=0).abs().max() < 1e-4
    assert torch.allclose(std[varying], torch.ones(()), atol=1e-4)
    if d.is_classification:
        assert d.y_train.dtype == torch.int64
        assert set(d.y_train.tolist()) == set(range(d.n_outputs))
    else:
        assert d.y_train.dtype == torch.float32 and d.y_train.shape == (len(d.x_train), d.n_outputs)
        assert torch.isfinite(d.y_train).all()
    assert load_dataset(name) is d  # cached


def test_image_datasets_are_exactly_those_with_image_inputs():
    """A CNN task may only draw a dataset whose inputs are (C, H, W) images."""
    assert {name for name in DATASETS if len(load_dataset(name).input_shape) == 3} == set(IMAGE_DATASETS)
    digits = load_dataset("digits")
    assert digits.input_shape == (1, 8, 8) and digits.n_outputs == 10


@pytest.mark.parametrize("name", ["digits", "teacher", "gaussian_mixture"])
def test_dataset_deterministic_from_seed(name):
    build = datasets._arrays.__wrapped__  # bypass the cache to rebuild from scratch
    a, b, c = build(name, 3), build(name, 3), build(name, 4)
    np.testing.assert_array_equal(a.x_train, b.x_train)
    np.testing.assert_array_equal(a.y_train, b.y_train)
    assert not np.array_equal(a.x_train, c.x_train)


def test_dataset_dtype_and_unknown_name():
    assert load_dataset("iris", dtype=torch.float64).x_train.dtype == torch.float64
    with pytest.raises(ValueError, match="unknown dataset 'mnist'"):
        load_dataset("mnist")


@pytest.mark.parametrize("name", DATASETS)
def test_validation_split_is_disjoint_from_the_rest_of_the_training_split(name):
    n = len(load_dataset(name).x_train)
    fit, val = datasets.validation_split(n, 0)
    assert not set(fit.tolist()) & set(val.tolist())
    assert sorted([*fit.tolist(), *val.tolist()]) == list(range(n))  # every training row is in exactly one
    assert len(val) == round(datasets.VAL_FRACTION * n)


def test_validation_split_is_a_function_of_the_seed():
    build = datasets.validation_split.__wrapped__  # bypass the cache
    a, b, c = build(100, 3), build(100, 3), build(100, 4)
    np.testing.assert_array_equal(a[1], b[1])
    assert not np.array_equal(a[1], c[1])
    assert len(build(2, 0)[0]) == len(build(2, 0)[1]) == 1


# --- text sets --------------------------------------------------------------------------------


def test_text_excludes_the_benchmark_modules():
    """The character tasks' text is that of other modules than the benchmark's, so that the
    benchmark's text stays unseen in meta-training."""
    from benchmarks import extra_tasks

    assert not set(datasets.TEXT_MODULES) & set(extra_tasks.TEXT_MODULES)
    ours = " ".join(datasets.module_text(m)[: datasets.TEXT_CHARS_PER_MODULE] for m in datasets.TEXT_MODULES)
    benchmark = extra_tasks.stdlib_text()
    for module in extra_tasks.TEXT_MODULES:  # each benchmark module's own docstring is absent
        doc = datasets.module_text(module)[:80]
        assert len(doc) == 80 and doc in benchmark and doc not in ours, module
    shared = {benchmark[i : i + 48] for i in range(0, len(benchmark) - 48, 7)} & {
        ours[i : i + 48] for i in range(len(ours) - 48)
    }
    assert len(shared) < 0.01 * len(benchmark) / 7  # at most a stock phrase here and there


@pytest.mark.parametrize("name", datasets.TEXT_DATASETS)
def test_text_sets_are_token_windows_of_the_modules_text(name):
    d = load_dataset(name, seed=3)
    text = " ".join(datasets.module_text(m) for m in datasets.TEXT_MODULES)
    assert d.x_train.dtype == d.y_train.dtype == torch.int64 and d.vocabulary == len(datasets.ALPHABET)
    assert d.input_shape == (datasets.CONTEXT,) and len(d.x_train) > 8 * len(d.x_test) > 0
    assert 0 <= int(d.x_train.min()) and int(d.x_train.max()) < d.vocabulary
    for row in (d.x_train[0], d.x_train[-1], d.x_test[5]):
        assert "".join(datasets.ALPHABET[i] for i in row.tolist()) in text
    if name == "chars":
        assert d.per_position and d.n_outputs == d.vocabulary
        assert torch.equal(d.y_train[:, :-1], d.x_train[:, 1:]) and torch.equal(d.y_test[:, :-1], d.x_test[:, 1:])
    else:
        assert not d.per_position and d.n_outputs == len(datasets.TEXT_MODULES)
        counts = torch.bincount(d.y_train, minlength=d.n_outputs)
        assert counts.min() > 0.8 * counts.max()  # balanced classes
    build = datasets._arrays.__wrapped__
    np.testing.assert_array_equal(build(name, 3).x_train, d.x_train.numpy())
    assert not np.array_equal(build(name, 4).x_train[:10], d.x_train[:10].numpy())  # the offset follows the seed


def test_validation_split_of_a_text_set():
    from meta_train.tasks import Task, TaskConfig

    task = Task(TaskConfig("chars", "gru", depth=1, width=16, batch_size=32, data_seed=2), holdout=True)
    fit, val = datasets.validation_split(len(task.dataset.x_train), 2)
    assert torch.equal(task.fit_index, torch.tensor(fit)) and torch.equal(task.val_index, torch.tensor(val))
    g = torch.Generator().manual_seed(0)
    x, y = task.sample_batch(g)
    i = task.fit_index[torch.randint(len(task.fit_index), (32,), generator=torch.Generator().manual_seed(0))]
    assert torch.equal(x, task.dataset.x_train[i]) and torch.equal(y, task.dataset.y_train[i])
    xv, _ = task.sample_val_batch(task.generator("val"))
    assert xv.shape == (32, datasets.CONTEXT)
