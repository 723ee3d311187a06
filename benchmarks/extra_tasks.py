"""Benchmark tasks outside the meta-training distribution: architectures it never contains.

Meta-training sees plain MLPs and CNNs (``meta_train.tasks.models``). These tasks test whether the
learned optimizer transfers to structures it has never stepped:

- ``residual_mlp``: a deep pre-LayerNorm residual MLP (6 blocks) on digits: skip connections tie
  the neurons of every block together, and LayerNorm's gain and bias are parameters it never saw.
- ``char_transformer``: a 2-layer causal transformer encoder (d_model 32) predicting the next
  character of text made from the docstrings of a few standard-library modules, so it needs no
  download (the text is that of the running Python's standard library).

An :class:`ExtraTask` is a :class:`meta_train.tasks.Task`: it reuses the seeded generators,
minibatches, losses and metrics, and only brings its own data and model. Its initial weights are
PyTorch's default initialisation drawn under a seed taken from the ``init`` generator.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from meta_train.tasks.data import ALPHABET, Dataset, load_dataset, module_text
from meta_train.tasks import Params, Task

RESIDUAL_WIDTH = 64
RESIDUAL_BLOCKS = 6

TEXT_MODULES = ("textwrap", "random", "functools", "collections", "json", "argparse", "string")
"""Standard-library modules whose docstrings make the character task's text."""
CONTEXT = 32
"""Characters per training sequence."""
TEXT_TEST_FRACTION = 0.1
"""Share of the text, taken from its end, that forms the test split."""
D_MODEL, N_HEADS, FEEDFORWARD, N_LAYERS = 32, 4, 64, 2


@dataclass(frozen=True)
class ExtraTaskConfig:
    """A task outside the meta-training distribution; the fields the benchmark reads from any task config.

    ``arch`` is one of :data:`ARCHITECTURES`. ``seed`` seeds initialisation and batches, as in
    :class:`meta_train.tasks.TaskConfig`.
    """

    name: str
    arch: str
    horizon: int = 500
    batch_size: int = 64
    seed: int = 0

    def __post_init__(self) -> None:
        if self.arch not in ARCHITECTURES:
            raise ValueError(f"unknown extra task architecture {self.arch!r}; known: {', '.join(ARCHITECTURES)}")
        if self.horizon < 1 or self.batch_size < 1 or self.seed < 0:
            raise ValueError(f"horizon and batch_size must be >= 1 and seed >= 0, got {self}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class ResidualBlock(nn.Module):
    """``x + fc2(gelu(fc1(layernorm(x))))``: a pre-norm residual block of constant width."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.fc1 = nn.Linear(width, width)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(self.act(self.fc1(self.norm(x))))


def residual_mlp(input_shape: tuple[int, ...], n_outputs: int) -> nn.Module:
    """Flatten, a linear embedding, :data:`RESIDUAL_BLOCKS` residual blocks, a final LayerNorm and a head."""
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(int(torch.Size(input_shape).numel()), RESIDUAL_WIDTH),
        *(ResidualBlock(RESIDUAL_WIDTH) for _ in range(RESIDUAL_BLOCKS)),
        nn.LayerNorm(RESIDUAL_WIDTH),
        nn.Linear(RESIDUAL_WIDTH, n_outputs),
    )


class CharTransformer(nn.Module):
    """A causal transformer encoder over ``(batch, CONTEXT)`` character ids.

    Returns logits as ``(batch, vocabulary, CONTEXT)``, the layout in which ``F.cross_entropy``
    and ``Task.test_metrics`` (argmax over dim 1) read a sequence of predictions.
    """

    def __init__(self, vocabulary: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocabulary, D_MODEL)
        self.position = nn.Parameter(0.02 * torch.randn(CONTEXT, D_MODEL))
        layer = nn.TransformerEncoderLayer(
            D_MODEL, N_HEADS, FEEDFORWARD, dropout=0.0, batch_first=True, norm_first=True
        )
        self.encoder = nn.TransformerEncoder(layer, N_LAYERS, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(D_MODEL)
        self.head = nn.Linear(D_MODEL, vocabulary)
        # A plain attribute, not a buffer: it is a constant, not state to load or optimise.
        self.causal_mask = nn.Transformer.generate_square_subsequent_mask(CONTEXT)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x) + self.position
        h = self.encoder(h, mask=self.causal_mask.to(h.device), is_causal=True)
        return self.head(self.norm(h)).transpose(1, 2)


def stdlib_text() -> str:
    """Docstrings of :data:`TEXT_MODULES` and their public members, reduced to :data:`ALPHABET`
    (the meta-training text sets' alphabet), one module after another."""
    return re.sub(" +", " ", " ".join(map(module_text, TEXT_MODULES))).strip()


@functools.lru_cache(maxsize=None)
def char_dataset() -> Dataset:
    """Next-character prediction: non-overlapping windows of :data:`CONTEXT` characters and their shifts.

    The last :data:`TEXT_TEST_FRACTION` of the text is the test split. Cached: do not modify.
    """
    ids = torch.tensor([ALPHABET.index(c) for c in stdlib_text()], dtype=torch.int64)
    split = int(len(ids) * (1 - TEXT_TEST_FRACTION))

    def windows(seq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        n = (len(seq) - 1) // CONTEXT
        return seq[: n * CONTEXT].reshape(n, CONTEXT), seq[1 : n * CONTEXT + 1].reshape(n, CONTEXT)

    x_train, y_train = windows(ids[:split])
    x_test, y_test = windows(ids[split:])
    return Dataset("stdlib_docstrings", x_train, y_train, x_test, y_test, len(ALPHABET), True)


def _digits() -> Dataset:
    return load_dataset("digits")


ARCHITECTURES: dict[str, tuple[Callable[[], Dataset], Callable[[Dataset], nn.Module]]] = {
    "residual_mlp": (_digits, lambda d: residual_mlp(d.input_shape, d.n_outputs)),
    "char_transformer": (char_dataset, lambda d: CharTransformer(d.n_outputs)),
}
"""Each architecture's dataset and model builder."""


class ExtraTask(Task):
    """A :class:`Task` whose dataset and model come from :data:`ARCHITECTURES` instead of a ``TaskConfig``."""

    def __init__(self, config: ExtraTaskConfig) -> None:
        self.config = config  # type: ignore[assignment]
        load, build = ARCHITECTURES[config.arch]
        self.dataset = load()
        self._build = lambda: build(self.dataset)
        with torch.random.fork_rng(devices=()):
            self.model = self._build()
        self._initial_buffers = {n: b.detach().clone() for n, b in self.model.named_buffers()}

    def init_params(self, generator: torch.Generator) -> Params:
        """PyTorch's default initialisation, drawn under a seed taken from ``generator``."""
        seed = int(torch.randint(2**62, (), generator=generator))
        with torch.random.fork_rng(devices=()):
            torch.manual_seed(seed)
            fresh = self._build()
        return {n: p.detach() for n, p in fresh.named_parameters()}


EXTRA_TASKS: tuple[ExtraTaskConfig, ...] = (
    ExtraTaskConfig("resmlp6_ln_digits", "residual_mlp", batch_size=64),
    ExtraTaskConfig("transformer_chars", "char_transformer", batch_size=32),
)
"""The out-of-distribution tasks the suite runs next to ``meta_train.tasks.HELD_OUT``."""
