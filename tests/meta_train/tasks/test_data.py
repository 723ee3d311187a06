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
