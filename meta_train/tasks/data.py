"""Datasets for meta-training and benchmark tasks: nothing to download, deterministic from a seed.

Two sources. scikit-learn's bundled sets (``digits``: 8x8 images, 10 classes; ``iris``,
``wine``, ``breast_cancer``: tabular classification) are split into train and test by the seed.
Generated sets are drawn from the seed: ``teacher`` (regression onto the outputs of a random
teacher MLP, plus noise, so the loss has a known floor) and ``gaussian_mixture`` (classes that
are each a mixture of Gaussian clusters, overlapping so that the task is not trivially solved).

A task may hold out part of its training split as a validation split (:func:`validation_split`),
for a meta-objective on held-out batches; the test split stays untouched for evaluation.

Text sets (``chars``: next-character prediction; ``chars_source``: which module a window of
text comes from) are built from the docstrings of standard-library modules (:data:`TEXT_MODULES`,
none of them the benchmark's), so they need no download either; their inputs are token ids.

Features are standardised with the training split's statistics (and so are regression targets),
which keeps losses and gradients of every task on one scale. A dataset is built once per
``(name, seed, dtype, device)`` in a process and then shared, so its tensors must not be mutated.
"""

from __future__ import annotations

import importlib
import inspect
import re
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch

TEST_FRACTION = 0.2
"""Share of a scikit-learn set held back as its test split."""

VAL_FRACTION = 0.2
"""Share of the training split held out as the validation split, by a task that holds one out."""

N_GENERATED_TRAIN = 2048
N_GENERATED_TEST = 512

TEACHER_IN, TEACHER_HIDDEN, TEACHER_OUT = 16, 32, 4
TEACHER_NOISE = 0.1
"""Noise std on the standardised teacher targets: the training MSE cannot go below about 0.01."""

MIXTURE_DIM, MIXTURE_CLASSES, MIXTURE_COMPONENTS = 8, 6, 3
MIXTURE_SPREAD = 1.5
"""Std of the cluster centres in units of the (unit) cluster std: the classes overlap a little."""

TEXT_MODULES: tuple[str, ...] = (
    "os", "logging", "subprocess", "shutil", "statistics", "uuid", "configparser", "inspect"
)
"""Standard-library modules whose docstrings make the text sets; disjoint from those of the
benchmark's character task (``benchmarks/extra_tasks.py``), whose text stays unseen."""
ALPHABET = "abcdefghijklmnopqrstuvwxyz .,()"
"""The text sets' vocabulary: text is lower-cased and every other character becomes a space."""
CONTEXT = 16
"""Characters per sequence of a text set."""
TEXT_CHARS_PER_MODULE = 8000
"""Each module contributes at most this many characters (the start of its text), so that the
source classes are balanced and the sets small."""
TEXT_TEST_FRACTION = 0.1
"""Share of each module's text, taken from its end, that forms the test split."""


@dataclass(frozen=True, eq=False)
class Dataset:
    """A supervised dataset split into train and test, as tensors ready for a model.

    ``x_*`` has shape ``(n, *input_shape)``. For classification ``y_*`` holds int64 class
    indices and ``n_outputs`` is the number of classes; for regression ``y_*`` has shape
    ``(n, n_outputs)`` in the features' dtype. A text set's ``x_*`` are int64 token ids below
    ``vocabulary`` (0 for other sets), and its ``y_*`` either a class per position (shape
    ``(n, length)``, next-token prediction) or per sequence.
    """

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    n_outputs: int
    is_classification: bool
    vocabulary: int = 0

    @property
    def per_position(self) -> bool:
        """The targets are one class per position of a sequence (a language-modelling set)."""
        return self.is_classification and self.y_train.dim() == 2

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.x_train.shape[1:])


@dataclass(frozen=True)
class _Arrays:
    """A dataset as numpy arrays (features standardised), before dtype and device are chosen."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    n_outputs: int
    is_classification: bool
    vocabulary: int = 0


def _standardise(train: np.ndarray, test: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Scale every column to zero mean and unit std on ``train``; constant columns are only centred."""
    mean = train.mean(axis=0)
    std = train.std(axis=0)
    std = np.where(std > 1e-8, std, 1.0)
    return (train - mean) / std, (test - mean) / std


def _sklearn(name: str, image_shape: tuple[int, ...] | None = None) -> Callable[[int], _Arrays]:
    """A builder for scikit-learn's bundled ``load_<name>`` set, split by the seed (stratified).

    scikit-learn is imported only when such a set is built, so the package imports without it.
    """

    def build(seed: int) -> _Arrays:
        import sklearn.datasets
        from sklearn.model_selection import train_test_split

        x, y = getattr(sklearn.datasets, f"load_{name}")(return_X_y=True)
        x_train, x_test, y_train, y_test = train_test_split(
            x.astype(np.float64), y.astype(np.int64), test_size=TEST_FRACTION, random_state=seed, stratify=y
        )
        x_train, x_test = _standardise(x_train, x_test)
        if image_shape is not None:
            x_train = x_train.reshape(len(x_train), *image_shape)
            x_test = x_test.reshape(len(x_test), *image_shape)
        return _Arrays(x_train, y_train, x_test, y_test, int(y.max()) + 1, True)

    return build


def _teacher(seed: int) -> _Arrays:
    """Regression onto a random tanh MLP's outputs: smooth, nonlinear, with a known noise floor."""
    rng = np.random.default_rng(seed)
    n = N_GENERATED_TRAIN + N_GENERATED_TEST
    x = rng.standard_normal((n, TEACHER_IN))
    w1 = rng.standard_normal((TEACHER_IN, TEACHER_HIDDEN)) * 2.0 / np.sqrt(TEACHER_IN)
    w2 = rng.standard_normal((TEACHER_HIDDEN, TEACHER_HIDDEN)) * 2.0 / np.sqrt(TEACHER_HIDDEN)
    w3 = rng.standard_normal((TEACHER_HIDDEN, TEACHER_OUT)) / np.sqrt(TEACHER_HIDDEN)
    y = np.tanh(np.tanh(x @ w1) @ w2) @ w3
    y_train, y_test = _standardise(y[:N_GENERATED_TRAIN], y[N_GENERATED_TRAIN:])
    y_train = y_train + TEACHER_NOISE * rng.standard_normal(y_train.shape)
    y_test = y_test + TEACHER_NOISE * rng.standard_normal(y_test.shape)
    x_train, x_test = _standardise(x[:N_GENERATED_TRAIN], x[N_GENERATED_TRAIN:])
    return _Arrays(x_train, y_train, x_test, y_test, TEACHER_OUT, False)


def _gaussian_mixture(seed: int) -> _Arrays:
    """Classes that are each a union of unit Gaussian clusters with random centres."""
    rng = np.random.default_rng(seed)
    n = N_GENERATED_TRAIN + N_GENERATED_TEST
    centres = MIXTURE_SPREAD * rng.standard_normal((MIXTURE_CLASSES, MIXTURE_COMPONENTS, MIXTURE_DIM))
    y = rng.integers(MIXTURE_CLASSES, size=n)
    component = rng.integers(MIXTURE_COMPONENTS, size=n)
    x = centres[y, component] + rng.standard_normal((n, MIXTURE_DIM))
    x_train, x_test = _standardise(x[:N_GENERATED_TRAIN], x[N_GENERATED_TRAIN:])
    return _Arrays(x_train, y[:N_GENERATED_TRAIN], x_test, y[N_GENERATED_TRAIN:], MIXTURE_CLASSES, True)


@lru_cache(maxsize=None)
def module_text(name: str) -> str:
    """The docstrings of module ``name`` and its public members, reduced to :data:`ALPHABET`."""
    module = importlib.import_module(name)
    parts = [inspect.getdoc(module) or ""]
    for member, obj in sorted(vars(module).items()):
        if not member.startswith("_") and getattr(obj, "__module__", None) == module.__name__:
            parts.append(inspect.getdoc(obj) or "")
    text = " ".join(parts).lower()
    text = re.sub(f"[^{re.escape(ALPHABET)}]", " ", text)
    return re.sub(" +", " ", text).strip()


def text_windows(seed: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Per module of :data:`TEXT_MODULES`, its train and test token ids in windows of
    ``CONTEXT + 1`` characters (each input window and its shift by one).

    The module's first :data:`TEXT_CHARS_PER_MODULE` characters are split at
    ``1 - TEXT_TEST_FRACTION``; windows do not overlap and start at ``seed % CONTEXT``.
    """
    train, test = [], []
    for name in TEXT_MODULES:
        ids = np.array([ALPHABET.index(c) for c in module_text(name)[:TEXT_CHARS_PER_MODULE]], dtype=np.int64)
        split = int(len(ids) * (1 - TEXT_TEST_FRACTION))
        for part, out in ((ids[seed % CONTEXT : split], train), (ids[split:], test)):
            n = (len(part) - 1) // CONTEXT
            index = np.arange(n)[:, None] * CONTEXT + np.arange(CONTEXT + 1)
            out.append(part[index])
    return train, test


def _chars(seed: int) -> _Arrays:
    """Next-character prediction on the text of :data:`TEXT_MODULES`."""
    train, test = (np.concatenate(w) for w in text_windows(seed))
    return _Arrays(train[:, :-1], train[:, 1:], test[:, :-1], test[:, 1:], len(ALPHABET), True, len(ALPHABET))


def _chars_source(seed: int) -> _Arrays:
    """Which of :data:`TEXT_MODULES` a window of :data:`CONTEXT` characters comes from."""
    train, test = text_windows(seed)

    def stack(windows: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        labels = np.concatenate([np.full(len(w), k, dtype=np.int64) for k, w in enumerate(windows)])
        return np.concatenate(windows)[:, :-1], labels

    (x_train, y_train), (x_test, y_test) = stack(train), stack(test)
    return _Arrays(x_train, y_train, x_test, y_test, len(TEXT_MODULES), True, len(ALPHABET))


_BUILDERS: dict[str, Callable[[int], _Arrays]] = {
    "digits": _sklearn("digits", image_shape=(1, 8, 8)),
    "iris": _sklearn("iris"),
    "wine": _sklearn("wine"),
    "breast_cancer": _sklearn("breast_cancer"),
    "teacher": _teacher,
    "gaussian_mixture": _gaussian_mixture,
}

DATASETS: tuple[str, ...] = tuple(_BUILDERS)
"""The feature and image sets (those that MLPs read)."""
TEXT_DATASETS: tuple[str, ...] = ("chars", "chars_source")
"""The text sets, of token sequences (those that sequence models read)."""
_BUILDERS.update({"chars": _chars, "chars_source": _chars_source})
ALL_DATASETS: tuple[str, ...] = tuple(_BUILDERS)
"""Names accepted by :func:`load_dataset`."""
IMAGE_DATASETS: tuple[str, ...] = ("digits",)
"""Datasets whose inputs are ``(C, H, W)`` images, the ones a CNN reads."""


def check_dataset_name(name: str) -> None:
    """Raise ``ValueError`` naming the known datasets unless ``name`` is one of them."""
    if name not in _BUILDERS:
        raise ValueError(f"unknown dataset {name!r}; known datasets: {', '.join(ALL_DATASETS)}")


@lru_cache(maxsize=128)
def validation_split(n_train: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Disjoint sorted row indices of a training split of ``n_train`` rows: (fit, val).

    ``val`` is :data:`VAL_FRACTION` of the rows (at least one, leaving at least one), chosen at
    random from ``seed`` (a dataset's ``data_seed``), so every task on a dataset holds out the
    same rows. The arrays are read-only (they are cached).
    """
    if n_train < 2:
        raise ValueError(f"a validation split needs at least 2 training rows, got {n_train}")
    n_val = min(n_train - 1, max(1, round(VAL_FRACTION * n_train)))
    order = np.random.default_rng([seed, zlib.crc32(b"validation")]).permutation(n_train)
    fit, val = np.sort(order[n_val:]), np.sort(order[:n_val])
    fit.setflags(write=False)
    val.setflags(write=False)
    return fit, val


@lru_cache(maxsize=128)
def _arrays(name: str, seed: int) -> _Arrays:
    return _BUILDERS[name](seed)


@lru_cache(maxsize=128)
def _load(name: str, seed: int, dtype: torch.dtype, device: torch.device) -> Dataset:
    a = _arrays(name, seed)
    y_dtype = torch.int64 if a.is_classification else dtype
    x_dtype = torch.int64 if a.vocabulary else dtype

    def tensor(array: np.ndarray, tensor_dtype: torch.dtype) -> torch.Tensor:
        return torch.as_tensor(array).to(device=device, dtype=tensor_dtype)

    return Dataset(
        name=name,
        x_train=tensor(a.x_train, x_dtype),
        y_train=tensor(a.y_train, y_dtype),
        x_test=tensor(a.x_test, x_dtype),
        y_test=tensor(a.y_test, y_dtype),
        n_outputs=a.n_outputs,
        is_classification=a.is_classification,
        vocabulary=a.vocabulary,
    )


@lru_cache(maxsize=128)
def reconstruction(dataset: Dataset) -> Dataset:
    """``dataset`` as an autoencoder's regression task: the targets are the flattened inputs.

    Shares the inputs' tensors (cached per dataset object): do not modify them."""
    if dataset.vocabulary:
        raise ValueError(f"dataset {dataset.name!r} holds token ids: it cannot be reconstructed by regression")
    return Dataset(
        name=dataset.name,
        x_train=dataset.x_train,
        y_train=dataset.x_train.flatten(1),
        x_test=dataset.x_test,
        y_test=dataset.x_test.flatten(1),
        n_outputs=dataset.x_train[0].numel(),
        is_classification=False,
    )


def load_dataset(
    name: str, seed: int = 0, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"
) -> Dataset:
    """The dataset ``name`` built from ``seed`` (the split, or the generated data), cached per process.

    The returned tensors are shared by every caller with the same arguments: do not modify them.
    """
    check_dataset_name(name)
    return _load(name, int(seed), dtype, torch.device(device))
