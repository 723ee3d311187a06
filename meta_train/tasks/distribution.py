"""The task distributions and their train / held-out split.

:func:`sample_task_config` draws from a meta-training distribution: ``"v1"`` (the default, the
one every committed meta-training config was trained on) has plain MLPs and CNNs on the feature
and image sets, init scales 0.5-2, batches 16-128 and the coupled labelling; ``"v2"`` (broader)
adds residual MLPs with LayerNorm, autoencoders, CNNs with a conv bias before BatchNorm, causal
character transformers and sequence classifiers, LSTM and GRU character models, init scales
0.1-10, batches 8-256, and the bare labelling for about half of the tasks. Some properties are
reserved for evaluation (:data:`HELD_OUT_SIGNATURES`): the training split never produces them,
so :data:`HELD_OUT` and ``sample_task_config(split="held_out")`` measure generalisation to
widths, data and combinations the optimizer was not meta-trained on.
"""

from __future__ import annotations

import dataclasses
import math
import random
from collections.abc import Mapping
from typing import Any

import numpy as np

from .data import DATASETS, IMAGE_DATASETS
from .models import ACTIVATIONS, DEPTH_RANGE
from .task import LABELLINGS, TaskConfig

Rng = random.Random | np.random.Generator

SAMPLED_WIDTHS: dict[str, tuple[int, ...]] = {"mlp": (16, 24, 32, 40, 48, 64, 96, 128), "cnn": (4, 8, 12, 16, 24, 32)}
"""Widths the sampler draws from; the held-out ones among them are removed from the train split."""
N_SAMPLED_DATA_SEEDS = 10
CNN_PROBABILITY = 0.25
BATCH_SIZE_RANGE = (16, 128)
INIT_SCALE_RANGE = (0.5, 2.0)
DEFAULT_HORIZON_RANGE = (200, 1000)
DISTRIBUTIONS: tuple[str, ...] = ("v1", "v2")
"""The task distributions :func:`sample_task_config` draws from."""

ARCH_PROBABILITIES_V2: dict[str, float] = {
    "mlp": 0.32, "cnn": 0.22, "resmlp": 0.15, "autoencoder": 0.1, "transformer": 0.07, "lstm": 0.07, "gru": 0.07
}
"""Share of each architecture in the ``v2`` distribution. MLPs and CNNs keep almost half: they are
the cheapest steps and what v1 trained on; the sequence models cost a few times more per inner
step (longer inputs, recurrences), so they share 30%."""
SAMPLED_WIDTHS_V2: dict[str, tuple[int, ...]] = {
    **SAMPLED_WIDTHS,
    "resmlp": SAMPLED_WIDTHS["mlp"],
    "autoencoder": SAMPLED_WIDTHS["mlp"],
    "transformer": (16, 24, 32),
    "lstm": (16, 24, 32, 48, 64),
    "gru": (16, 24, 32, 48, 64),
}
AUTOENCODER_DATASETS: tuple[str, ...] = ("digits", "breast_cancer", "teacher", "gaussian_mixture")
"""Feature and image sets an autoencoder reconstructs (iris has too few features to compress)."""
LM_PROBABILITY = 0.75
"""Share of sequence tasks that predict the next character (the rest classify a window's source)."""
BATCH_SIZE_RANGE_V2: dict[str, tuple[int, int]] = {
    "mlp": (8, 256), "resmlp": (8, 256), "autoencoder": (8, 256), "cnn": (8, 128), "transformer": (8, 64),
    "lstm": (8, 64), "gru": (8, 64),
}
INIT_SCALE_RANGE_V2 = (0.1, 10.0)
BARE_PROBABILITY = 0.5
"""Share of ``v2`` tasks labelled bare: most real models reach the rule with bare parameters."""

HELD_OUT_SIGNATURES: tuple[Mapping[str, tuple[Any, ...]], ...] = (
    {"arch": ("mlp",), "width": (40, 128)},
    {"arch": ("cnn",), "width": (12, 32)},
    {"dataset": ("wine",)},
    {"arch": ("mlp",), "depth": (4,), "activation": ("gelu",)},
    {"data_seed": (8, 9)},
    {"arch": ("resmlp", "autoencoder"), "width": (40, 128)},
    {"arch": ("transformer",), "depth": (2,), "width": (32,)},
    {"arch": ("lstm", "gru"), "width": (48,)},
)
"""Properties reserved for evaluation: a config is held-out when, for some signature, each named
field takes one of the listed values. ``sample_task_config(split="train")`` never returns one."""


def held_out_properties(config: TaskConfig) -> tuple[str, ...]:
    """The held-out signatures ``config`` matches, as readable strings; empty for a train-split task."""
    return tuple(
        ", ".join(f"{field}={getattr(config, field)!r}" for field in signature)
        for signature in HELD_OUT_SIGNATURES
        if all(getattr(config, field) in values for field, values in signature.items())
    )


HELD_OUT: tuple[TaskConfig, ...] = (
    TaskConfig("digits", "mlp", depth=2, width=128, name="mlp_digits_w128"),
    TaskConfig("digits", "mlp", depth=3, width=40, activation="tanh", name="mlp_digits_w40_tanh"),
    TaskConfig("wine", "mlp", depth=2, width=32, name="mlp_wine"),
    TaskConfig("gaussian_mixture", "mlp", depth=4, width=64, activation="gelu", name="mlp_mixture_deep_gelu"),
    TaskConfig("teacher", "mlp", depth=2, width=64, activation="tanh", data_seed=8, name="mlp_teacher_unseen"),
    TaskConfig("digits", "cnn", depth=2, width=32, batchnorm=True, name="cnn_digits_c32_bn"),
    TaskConfig("digits", "cnn", depth=3, width=12, activation="tanh", name="cnn_digits_c12_tanh"),
)
"""Named evaluation tasks, each with at least one held-out property (vary ``seed`` for repeats)."""

HELD_OUT_V2: tuple[TaskConfig, ...] = (
    TaskConfig("digits", "resmlp", depth=3, width=128, activation="gelu", name="resmlp_digits_w128"),
    TaskConfig("breast_cancer", "autoencoder", depth=1, width=40, activation="tanh", name="autoencoder_cancer_w40"),
    TaskConfig("chars", "transformer", depth=2, width=32, activation="gelu", batch_size=32,
               name="transformer_chars_d2_w32"),
    TaskConfig("chars", "lstm", depth=1, width=48, activation="tanh", batch_size=32, name="lstm_chars_w48"),
    TaskConfig("digits", "cnn", depth=2, width=32, batchnorm=True, conv_bias=True, labelling="bare",
               name="cnn_digits_c32_bn_bias_bare"),
)
"""Named evaluation tasks of the ``v2`` architectures, each with a held-out property."""


def _index(rng: Rng, n: int) -> int:
    return rng.randrange(n) if isinstance(rng, random.Random) else int(rng.integers(n))


def _choice(rng: Rng, options: tuple[Any, ...]) -> Any:
    return options[_index(rng, len(options))]


def _log_uniform(rng: Rng, lo: float, hi: float) -> float:
    return math.exp(float(rng.uniform(math.log(lo), math.log(hi))))


def _log_uniform_int(rng: Rng, lo: int, hi: int) -> int:
    """An int in ``[lo, hi]`` whose log is roughly uniform."""
    return min(hi, int(_log_uniform(rng, lo, hi + 1)))


def _sample_any(rng: Rng, horizon_range: tuple[int, int]) -> TaskConfig:
    """One draw from the whole space, train and held-out properties alike."""
    arch = "cnn" if rng.uniform(0.0, 1.0) < CNN_PROBABILITY else "mlp"
    lo, hi = DEPTH_RANGE[arch]
    return TaskConfig(
        dataset=_choice(rng, IMAGE_DATASETS if arch == "cnn" else DATASETS),
        arch=arch,
        depth=lo + _index(rng, hi - lo + 1),
        width=_choice(rng, SAMPLED_WIDTHS[arch]),
        activation=_choice(rng, tuple(ACTIVATIONS)),
        batchnorm=arch == "cnn" and _index(rng, 2) == 1,
        batch_size=_log_uniform_int(rng, *BATCH_SIZE_RANGE),
        init_scale=_log_uniform(rng, *INIT_SCALE_RANGE),
        horizon=_log_uniform_int(rng, *horizon_range),
        seed=_index(rng, 2**31),
        data_seed=_index(rng, N_SAMPLED_DATA_SEEDS),
    )


def _weighted(rng: Rng, weights: Mapping[str, float]) -> str:
    u = float(rng.uniform(0.0, sum(weights.values())))
    for key, w in weights.items():
        u -= w
        if u < 0:
            return key
    return key


def _sample_any_v2(rng: Rng, horizon_range: tuple[int, int]) -> TaskConfig:
    """One draw from the whole ``v2`` space, train and held-out properties alike."""
    arch = _weighted(rng, ARCH_PROBABILITIES_V2)
    lo, hi = DEPTH_RANGE[arch]
    depth = lo + _index(rng, hi - lo + 1)
    width = _choice(rng, SAMPLED_WIDTHS_V2[arch])
    activation = _choice(rng, tuple(ACTIVATIONS))
    batchnorm = conv_bias = False
    if arch == "cnn":
        dataset = _choice(rng, IMAGE_DATASETS)
        batchnorm = _index(rng, 2) == 1
        conv_bias = batchnorm and _index(rng, 2) == 1
    elif arch == "autoencoder":
        dataset = _choice(rng, AUTOENCODER_DATASETS)
    elif arch in ("transformer", "lstm", "gru"):
        dataset = "chars" if rng.uniform(0.0, 1.0) < LM_PROBABILITY else "chars_source"
        if arch != "transformer":
            activation = "tanh"  # unused: the gates are fixed
    else:
        dataset = _choice(rng, DATASETS)
    return TaskConfig(
        dataset=dataset,
        arch=arch,
        depth=depth,
        width=width,
        activation=activation,
        batchnorm=batchnorm,
        conv_bias=conv_bias,
        batch_size=_log_uniform_int(rng, *BATCH_SIZE_RANGE_V2[arch]),
        init_scale=_log_uniform(rng, *INIT_SCALE_RANGE_V2),
        horizon=_log_uniform_int(rng, *horizon_range),
        labelling=LABELLINGS[1] if rng.uniform(0.0, 1.0) < BARE_PROBABILITY else LABELLINGS[0],
        seed=_index(rng, 2**31),
        data_seed=_index(rng, N_SAMPLED_DATA_SEEDS),
    )


def sample_task_config(
    rng: Rng,
    split: str = "train",
    horizon_range: tuple[int, int] = DEFAULT_HORIZON_RANGE,
    activation: str | None = None,
    distribution: str = "v1",
) -> TaskConfig:
    """A random task config, a deterministic function of ``rng``'s state.

    ``split="train"`` gives tasks with no held-out property (the meta-training distribution);
    ``split="held_out"`` gives tasks with at least one. Architecture, dataset (CNNs read images),
    depth, width, activation, BatchNorm, batch size (log-uniform), init scale (log-uniform in
    ``INIT_SCALE_RANGE``), horizon (log-uniform in ``horizon_range``, inclusive) and seeds are
    drawn from one distribution and rejected until the split's condition holds. ``activation``,
    if given, replaces the drawn one (a sub-distribution, e.g. tanh networks only).
    ``distribution``: ``"v1"`` (the default: exactly the draws it always gave) or ``"v2"``, the
    broader one (see the module's doc; it draws the arch first, then its dataset, depth, width,
    activation, BatchNorm and conv bias, batch size, init scale in ``INIT_SCALE_RANGE_V2``,
    horizon, labelling and seeds).
    """
    if distribution not in DISTRIBUTIONS:
        raise ValueError(f"unknown distribution {distribution!r}; expected one of {DISTRIBUTIONS}")
    sample = _sample_any if distribution == "v1" else _sample_any_v2
    if split not in ("train", "held_out"):
        raise ValueError(f"unknown split {split!r}; expected 'train' or 'held_out'")
    lo, hi = horizon_range
    if not 1 <= lo <= hi:
        raise ValueError(f"horizon_range must satisfy 1 <= lo <= hi, got {horizon_range}")
    want_held_out = split == "held_out"
    while True:
        config = sample(rng, horizon_range)
        if activation is not None:
            config = dataclasses.replace(config, activation=activation)
        if bool(held_out_properties(config)) == want_held_out:
            return config
