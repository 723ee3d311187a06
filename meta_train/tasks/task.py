"""A task: small network, small dataset, seeded initialisation and minibatches.

A :class:`TaskConfig` names everything about a task (data, architecture, batch size, initial
scale, horizon, seeds) and round-trips through a plain dict for JSON logs. A :class:`Task` built
from it gives what meta-training needs (a functional loss on parameter dicts, differentiable for
unrolled training) and what benchmarks need (a seeded ``nn.Module`` for a regular optimizer),
both with the same initialisation and batches. A task built with ``holdout=True`` keeps a
validation split of its training rows out of its training batches, for a meta-loss on held-out
batches.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from .data import IMAGE_DATASETS, TEXT_DATASETS, Dataset, check_dataset_name, load_dataset, reconstruction, validation_split
from .models import SEQUENCE_ARCHS, build_model, check_architecture, init_parameters

Params = dict[str, torch.Tensor]

LABELLINGS: tuple[str, ...] = ("coupled", "bare")
"""How a task's weight space reaches the rule: ``coupled``, the labelling inferred from the model
(neuron sets shared across layers); ``bare``, every tensor independent, as for parameters handed
to the optimizer without their model."""
MAX_EVAL_ROWS = 2048
"""Full-split evaluations (:meth:`Task.full_train_loss`, :meth:`Task.full_val_loss`,
:meth:`Task.test_metrics`) read at most this many rows, the first ones, to stay cheap: every
split of the feature and image sets is smaller, so only the text sets are cut."""


def _check_int(field: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{field} must be an int, got {value!r}")
    if value < minimum:
        raise ValueError(f"{field} must be >= {minimum}, got {value}")


@dataclass(frozen=True)
class TaskConfig:
    """Everything that defines a task; invalid values raise ``ValueError`` on construction.

    ``depth`` counts hidden layers (MLP) or conv layers (CNN), residual blocks, an autoencoder's
    hidden layers per side, or transformer / recurrent layers; ``width`` is hidden units (MLP,
    residual MLP, autoencoder), channels (CNN), the model dimension (transformer) or the hidden
    state (LSTM, GRU); see :func:`~.models.build_model`. CNNs read image sets, sequence models
    (transformer, LSTM, GRU) the text sets, every other arch the feature and image sets; an
    autoencoder reconstructs its inputs (a regression task whatever the dataset's labels).
    ``conv_bias``: a CNN's convs keep their bias before BatchNorm. ``labelling``: one of
    :data:`LABELLINGS`, how the task's weight space is labelled for the rule
    (``meta_train.unroll.task_spec``). ``init_scale`` multiplies PyTorch's default init. ``horizon`` is the number of
    inner training steps T. ``seed`` seeds the initialisation and the minibatches (see
    :meth:`Task.generator`); ``data_seed`` seeds the dataset (its split, or the generated data).
    ``name`` is a label for logs and does not change the task.
    """

    dataset: str
    arch: str = "mlp"
    depth: int = 2
    width: int = 32
    activation: str = "relu"
    batchnorm: bool = False
    batch_size: int = 64
    init_scale: float = 1.0
    horizon: int = 500
    seed: int = 0
    data_seed: int = 0
    name: str = ""
    conv_bias: bool = False
    labelling: str = "coupled"

    def __post_init__(self) -> None:
        check_dataset_name(self.dataset)
        for field in ("depth", "width"):
            _check_int(field, getattr(self, field), 1)
        for field in ("batchnorm", "conv_bias"):
            if not isinstance(getattr(self, field), bool):
                raise ValueError(f"{field} must be a bool, got {getattr(self, field)!r}")
        check_architecture(self.arch, self.depth, self.width, self.activation, self.batchnorm, self.conv_bias)
        if self.arch == "cnn" and self.dataset not in IMAGE_DATASETS:
            raise ValueError(f"arch 'cnn' needs an image dataset ({', '.join(IMAGE_DATASETS)}), got {self.dataset!r}")
        if (self.arch in SEQUENCE_ARCHS) != (self.dataset in TEXT_DATASETS):
            raise ValueError(f"arch {self.arch!r} cannot read dataset {self.dataset!r}: the sequence archs "
                             f"({', '.join(SEQUENCE_ARCHS)}) read the text sets ({', '.join(TEXT_DATASETS)}), "
                             "the others the rest")
        if self.labelling not in LABELLINGS:
            raise ValueError(f"labelling must be one of {LABELLINGS}, got {self.labelling!r}")
        for field, minimum in (("batch_size", 1), ("horizon", 1), ("seed", 0), ("data_seed", 0)):
            _check_int(field, getattr(self, field), minimum)
        scale = self.init_scale
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale <= 0:
            raise ValueError(f"init_scale must be a finite positive number, got {scale!r}")
        if not isinstance(self.name, str):
            raise ValueError(f"name must be a str, got {self.name!r}")

    def to_dict(self) -> dict[str, Any]:
        """The config as a dict of JSON-ready values; :meth:`from_dict` inverts it."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> TaskConfig:
        """A config from :meth:`to_dict`'s output; unknown keys raise ``ValueError``."""
        unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"unknown TaskConfig fields: {sorted(unknown)}")
        return cls(**d)


class Task:
    """A built task: dataset tensors, a template model, seeded init, minibatches, losses and metrics.

    Meta-training runs the model functionally on parameter dicts (:meth:`init_params`,
    :meth:`loss`); benchmarks train a module (:meth:`build_module`) with :meth:`criterion`. The
    template ``model`` is only a structure for ``functional_call``: its own parameters and
    buffers are never used.

    ``holdout``: training batches (and :meth:`full_train_loss`) use only the ``fit_index`` rows
    of the training split, and the ``val_index`` rows (:func:`~.data.validation_split` of the
    ``data_seed``) are the validation split of :meth:`sample_val_batch` and :meth:`full_val_loss`.
    Without it the task trains on the whole training split, as it always did.
    """

    holdout: bool = False

    def __init__(
        self,
        config: TaskConfig,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        holdout: bool = False,
    ):
        self.config = config
        self.holdout = holdout
        self.dataset: Dataset = load_dataset(config.dataset, config.data_seed, dtype, device)
        if config.arch == "autoencoder":
            self.dataset = reconstruction(self.dataset)
        with torch.random.fork_rng(devices=()):  # the template's own init must not advance the global RNG
            model = build_model(
                config.arch,
                config.depth,
                config.width,
                config.activation,
                config.batchnorm,
                self.dataset.input_shape,
                self.dataset.n_outputs,
                conv_bias=config.conv_bias,
                vocabulary=self.dataset.vocabulary,
                per_position=self.dataset.per_position,
            )
        self.model: nn.Module = model.to(device=device, dtype=dtype)
        self._initial_buffers = {n: b.detach().clone() for n, b in self.model.named_buffers()}
        if holdout:
            fit, val = validation_split(len(self.dataset.x_train), config.data_seed)
            self.fit_index = torch.tensor(fit, device=self.dataset.x_train.device)
            self.val_index = torch.tensor(val, device=self.dataset.x_train.device)

    @property
    def is_classification(self) -> bool:
        return self.dataset.is_classification

    def generator(self, stream: str) -> torch.Generator:
        """A CPU generator seeded from ``config.seed`` and a stream name, e.g. ``"init"`` or ``"data"``.

        Separate streams keep the initialisation independent of how many batches were drawn, and
        let meta-training and benchmarks reproduce the same task from its config alone.
        """
        key = np.random.SeedSequence((self.config.seed, zlib.crc32(stream.encode())))
        return torch.Generator().manual_seed(int(key.generate_state(1, np.uint64)[0]))

    def init_params(self, generator: torch.Generator) -> Params:
        """Fresh parameters (default init times ``init_scale``), a deterministic function of ``generator``."""
        return init_parameters(self.model, generator, self.config.init_scale)

    def buffers(self) -> Params:
        """Fresh copies of the initial buffers (BatchNorm running statistics); empty for MLPs."""
        return {n: b.clone() for n, b in self._initial_buffers.items()}

    def build_module(self, generator: torch.Generator) -> nn.Module:
        """A standalone module in train mode with :meth:`init_params`' values for the same generator state."""
        module = copy.deepcopy(self.model)
        module.load_state_dict({**self.init_params(generator), **self.buffers()})
        return module.train()

    def sample_batch(self, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """A training minibatch of ``batch_size`` examples drawn with replacement from ``generator``
        (from the ``fit_index`` rows with ``holdout``)."""
        if self.holdout:
            return self._draw(self.fit_index, generator)
        n = len(self.dataset.x_train)
        idx = torch.randint(n, (self.config.batch_size,), generator=generator).to(self.dataset.x_train.device)
        return self.dataset.x_train[idx], self.dataset.y_train[idx]

    def sample_val_batch(self, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """A validation minibatch of ``batch_size`` examples of the ``val_index`` rows, drawn with
        replacement from ``generator`` (pass one of its own: :meth:`generator` ``("val")``)."""
        self._check_holdout()
        return self._draw(self.val_index, generator)

    def _draw(self, rows: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        idx = rows[torch.randint(len(rows), (self.config.batch_size,), generator=generator).to(rows.device)]
        return self.dataset.x_train[idx], self.dataset.y_train[idx]

    def _check_holdout(self) -> None:
        if not self.holdout:
            raise RuntimeError("this task trains on its whole training split: build it with holdout=True "
                               "for a validation split")

    def criterion(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy for classification (over every position of a sequence, for logits
        ``(batch, classes, length)``), mean squared error for regression (and reconstruction)."""
        if self.is_classification:
            return F.cross_entropy(output, target)
        return F.mse_loss(output, target)

    def _forward(self, params: Params, buffers: Params, x: torch.Tensor, training: bool) -> torch.Tensor:
        self.model.train(training)
        return functional_call(self.model, (params, buffers), (x,), strict=True)

    def loss(self, params: Params, buffers: Params, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, Params]:
        """Training loss on ``(x, y)`` (train mode), differentiable w.r.t. ``params``, and the updated buffers.

        BatchNorm updates running statistics in place in the buffers it is given; they are
        copies here, so the caller's buffers (possibly saved by an earlier graph) are never
        modified. Pass the returned buffers to the next step.
        """
        new_buffers = {n: b.clone() for n, b in buffers.items()}
        return self.criterion(self._forward(params, new_buffers, x, training=True), y), new_buffers

    def eval_loss(self, params: Params, buffers: Params, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Loss on ``(x, y)`` in eval mode (BatchNorm uses the running statistics in ``buffers`` and
        leaves them alone), differentiable w.r.t. ``params``: how a held-out batch is scored."""
        return self.criterion(self._forward(params, buffers, x, training=False), y)

    def full_train_loss(self, params: Params, buffers: Params) -> torch.Tensor:
        """Loss on the whole training split (its ``fit_index`` rows with ``holdout``) in eval mode
        (BatchNorm uses its running statistics); at most :data:`MAX_EVAL_ROWS` rows."""
        if self.holdout:
            fit = self.fit_index[:MAX_EVAL_ROWS]
            return self.eval_loss(params, buffers, self.dataset.x_train[fit], self.dataset.y_train[fit])
        output = self._forward(params, buffers, self.dataset.x_train[:MAX_EVAL_ROWS], training=False)
        return self.criterion(output, self.dataset.y_train[:MAX_EVAL_ROWS])

    def full_val_loss(self, params: Params, buffers: Params) -> torch.Tensor:
        """Loss on the whole validation split in eval mode; at most :data:`MAX_EVAL_ROWS` rows."""
        self._check_holdout()
        val = self.val_index[:MAX_EVAL_ROWS]
        return self.eval_loss(params, buffers, self.dataset.x_train[val], self.dataset.y_train[val])

    @torch.no_grad()
    def test_metrics(self, params: Params, buffers: Params) -> dict[str, float]:
        """Test-split ``loss`` (and ``accuracy`` for classification, per position for a sequence
        of predictions) in eval mode; at most :data:`MAX_EVAL_ROWS` rows. An autoencoder's loss is
        its reconstruction error."""
        x, y = self.dataset.x_test[:MAX_EVAL_ROWS], self.dataset.y_test[:MAX_EVAL_ROWS]
        output = self._forward(params, buffers, x, training=False)
        metrics = {"loss": self.criterion(output, y).item()}
        if self.is_classification:
            metrics["accuracy"] = (output.argmax(dim=1) == y).float().mean().item()
        return metrics
