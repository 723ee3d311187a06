"""Small models of many architectures for tests, each built by a function returning (model, input).

Every builder is deterministic (its own seed), returns a float64 model and a batch of input that
``model(x)`` accepts, and randomises the tensors that start constant (norm weights, running
statistics) so that a permutation applied to them wrongly would show in the output.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

Builder = Callable[[], tuple[nn.Module, torch.Tensor]]
ZOO: dict[str, Builder] = {}
"""Every model of the zoo by name."""


def _model(build: Builder) -> Builder:
    """Register a builder; run it seeded, in float64, with constant-initialised tensors randomised."""

    def wrapped() -> tuple[nn.Module, torch.Tensor]:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model, x = build()
            model = model.double()
            with torch.no_grad():
                for t in [*model.parameters(), *model.buffers()]:
                    if t.is_floating_point() and t.numel() > 1 and bool((t == t.flatten()[0]).all()):
                        t.copy_(torch.rand_like(t) + 0.5)
        return model, x.double() if x.is_floating_point() else x

    wrapped.__name__ = build.__name__
    ZOO[build.__name__] = wrapped
    return wrapped


# ---- MLPs ---------------------------------------------------------------------------------------


@_model
def mlp1() -> tuple[nn.Module, torch.Tensor]:
    return nn.Sequential(nn.Linear(5, 3)), torch.randn(4, 5)


@_model
def mlp2_tanh() -> tuple[nn.Module, torch.Tensor]:
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)), torch.randn(4, 5)


@_model
def mlp4_mixed() -> tuple[nn.Module, torch.Tensor]:
    layers = [nn.Linear(5, 6), nn.ReLU(), nn.Linear(6, 7), nn.GELU(), nn.Linear(7, 6), nn.SiLU(), nn.Linear(6, 3)]
    return nn.Sequential(*layers), torch.randn(4, 5)


@_model
def mlp_layernorm() -> tuple[nn.Module, torch.Tensor]:
    return nn.Sequential(nn.Linear(5, 8), nn.LayerNorm(8), nn.ReLU(), nn.Linear(8, 3)), torch.randn(4, 5)


class DropoutBatchNormMLP(nn.Module):
    """Functional dropout with the training flag, then BatchNorm1d (which needs shapes to couple)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.bn, self.fc2 = nn.Linear(5, 6), nn.BatchNorm1d(6), nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.relu(self.bn(F.dropout(self.fc1(x), 0.1, self.training))))


@_model
def mlp_batchnorm() -> tuple[nn.Module, torch.Tensor]:
    return DropoutBatchNormMLP(), torch.randn(4, 5)


class ResidualMLP(nn.Module):
    """h = fc_in(x); two blocks h = h + fc2(relu(fc1(h))); head(h)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc_in = nn.Linear(5, 6)
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(6, 9), nn.ReLU(), nn.Linear(9, 6)) for _ in range(2))
        self.head = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc_in(x)
        for block in self.blocks:
            h = h + block(h)
        return self.head(torch.tanh(h))


@_model
def resnet_mlp() -> tuple[nn.Module, torch.Tensor]:
    return ResidualMLP(), torch.randn(4, 5)


# ---- CNNs ---------------------------------------------------------------------------------------


@_model
def cnn_flatten() -> tuple[nn.Module, torch.Tensor]:
    """Spatial size 2x2 before the flatten: the last conv's channels must not couple with the head."""
    layers = [
        nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(4, 5, 3, padding=1), nn.BatchNorm2d(5), nn.ReLU(), nn.AvgPool2d(2),
        nn.Flatten(), nn.Linear(5 * 2 * 2, 3),
    ]
    return nn.Sequential(*layers), torch.randn(3, 2, 8, 8)


@_model
def cnn_global_pool() -> tuple[nn.Module, torch.Tensor]:
    """Global pooling to 1x1 before the flatten: the last conv's channels couple with the head."""
    layers = [
        nn.Conv2d(2, 4, 3), nn.BatchNorm2d(4), nn.ReLU(),
        nn.Conv2d(4, 6, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 3),
    ]
    return nn.Sequential(*layers), torch.randn(3, 2, 7, 7)


class Conv1dNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv1d(3, 5, 3)
        self.conv2 = nn.Conv1d(5, 4, 3, padding=1)
        self.head = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.elu(self.conv1(x))
        h = F.max_pool1d(self.conv2(h), 2)
        return self.head(h.mean(-1))


@_model
def conv1d_net() -> tuple[nn.Module, torch.Tensor]:
    return Conv1dNet(), torch.randn(2, 3, 10)


class ResNetBlockCNN(nn.Module):
    """A stem, one basic residual block (conv-BN-ReLU-conv-BN plus identity), global mean, head."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(2, 4, 3, padding=1)
        self.conv1, self.bn1 = nn.Conv2d(4, 6, 3, padding=1), nn.BatchNorm2d(6)
        self.conv2, self.bn2 = nn.Conv2d(6, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4)
        self.head = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.stem(x))
        h = F.relu(h + self.bn2(self.conv2(F.relu(self.bn1(self.conv1(h))))))
        return self.head(h.mean(dim=(2, 3)))


@_model
def resnet_cnn() -> tuple[nn.Module, torch.Tensor]:
    return ResNetBlockCNN(), torch.randn(2, 2, 6, 6)


@_model
def groupnorm_cnn() -> tuple[nn.Module, torch.Tensor]:
    """GroupNorm with one group (couples), with 4 groups of 2 (must not) and one channel per group."""
    layers = [
        nn.Conv2d(2, 8, 3, padding=1), nn.GroupNorm(1, 8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1), nn.GroupNorm(4, 8), nn.ReLU(),
        nn.Conv2d(8, 6, 1), nn.GroupNorm(6, 6), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 3),
    ]
    return nn.Sequential(*layers), torch.randn(2, 2, 5, 5)


@_model
def depthwise_cnn() -> tuple[nn.Module, torch.Tensor]:
    """A depthwise conv (couples its channels through) and a grouped one (must not)."""
    layers = [
        nn.Conv2d(2, 4, 1), nn.ReLU(),
        nn.Conv2d(4, 4, 3, padding=1, groups=4), nn.BatchNorm2d(4), nn.ReLU(),
        nn.Conv2d(4, 6, 1), nn.ReLU(),
        nn.Conv2d(6, 6, 3, padding=1, groups=2), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 3),
    ]
    return nn.Sequential(*layers), torch.randn(2, 2, 5, 5)


# ---- Attention and embeddings -------------------------------------------------------------------


class TransformerClassifier(nn.Module):
    """Input projection plus learned positions, one encoder layer, mean over the sequence, head."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(4, 8)
        self.pos = nn.Parameter(torch.randn(16, 8))
        self.layer = nn.TransformerEncoderLayer(8, nhead=2, dim_feedforward=12, dropout=0.0, batch_first=True)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.proj(x) + self.pos[: x.size(1)]
        return self.head(self.layer(h).mean(1))


@_model
def transformer() -> tuple[nn.Module, torch.Tensor]:
    return TransformerClassifier(), torch.randn(2, 5, 4)


class TransformerStack(nn.Module):
    """A two-layer pre-norm GELU encoder with a final norm; the first token feeds the head."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(4, 8)
        layer = nn.TransformerEncoderLayer(
            8, nhead=2, dim_feedforward=10, dropout=0.0, activation="gelu", batch_first=True, norm_first=True
        )
        self.encoder = nn.TransformerEncoder(layer, 2, norm=nn.LayerNorm(8), enable_nested_tensor=False)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.proj(x))[:, 0])


@_model
def transformer_stack() -> tuple[nn.Module, torch.Tensor]:
    return TransformerStack(), torch.randn(2, 5, 4)


class AttentionBlock(nn.Module):
    """nn.MultiheadAttention used directly, with a residual add and a LayerNorm."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(3, 6)
        self.attn = nn.MultiheadAttention(6, 3, batch_first=True, add_bias_kv=True)
        self.norm = nn.LayerNorm(6)
        self.head = nn.Linear(6, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.proj(x)
        a, _ = self.attn(h, h, h)
        return self.head(self.norm(h + a)).sum(1)


@_model
def attention_block() -> tuple[nn.Module, torch.Tensor]:
    return AttentionBlock(), torch.randn(2, 5, 3)


class EmbeddingBag(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(11, 6)
        self.fc = nn.Linear(6, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.head(F.relu(self.fc(self.emb(idx))).mean(1))


@_model
def embedding() -> tuple[nn.Module, torch.Tensor]:
    return EmbeddingBag(), torch.randint(0, 11, (2, 5))


class TiedLM(nn.Module):
    """Embedding, a hidden layer, and an output layer tied to the embedding."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 6)
        self.fc = nn.Linear(6, 6)
        self.out = nn.Linear(6, 10, bias=False)
        self.out.weight = self.emb.weight

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.fc(self.emb(idx))))


@_model
def weight_tying() -> tuple[nn.Module, torch.Tensor]:
    return TiedLM(), torch.randint(0, 10, (2, 4))


class SharedLayer(nn.Module):
    """One square layer applied twice: its rows and columns index the same neurons."""

    def __init__(self) -> None:
        super().__init__()
        self.fc_in = nn.Linear(5, 6)
        self.shared = nn.Linear(6, 6)
        self.head = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.fc_in(x))
        h = torch.tanh(self.shared(torch.tanh(self.shared(h))))
        return self.head(h)


@_model
def shared_layer() -> tuple[nn.Module, torch.Tensor]:
    return SharedLayer(), torch.randn(4, 5)


# ---- Parameters the forward does not train, and operations the inference must not trust ---------


class UnusedFrozen(nn.Module):
    """A frozen first layer, an unused layer and an unused bare parameter."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(5, 6).requires_grad_(False)
        self.fc2 = nn.Linear(6, 3)
        self.unused = nn.Linear(4, 4)
        self.spare = nn.Parameter(torch.randn(3, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.relu(self.fc1(x)))


@_model
def unused_frozen() -> tuple[nn.Module, torch.Tensor]:
    return UnusedFrozen(), torch.randn(4, 5)


class Flip(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flip(x, dims=[-1])


class SelfConcat(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, x.square()], dim=-1)


class Weird(nn.Module):
    """Channels reversed by a flip, then concatenated with their squares: neither may couple."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(5, 6), nn.Linear(6, 7), nn.Linear(7, 4)
        self.flip, self.cat = Flip(), SelfConcat()
        self.fc4 = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.flip(F.relu(self.fc1(x)))
        h = self.fc3(torch.tanh(self.fc2(h)))
        return self.fc4(self.cat(h))


@_model
def weird() -> tuple[nn.Module, torch.Tensor]:
    return Weird(), torch.randn(4, 5)


class Gate(nn.Module):
    """Data-dependent control flow: torch.fx cannot trace it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * 2 if x.mean() > 0 else x.flip(-1)


class WithUntraceable(nn.Module):
    """An untraceable submodule in the middle of an otherwise traceable model."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.gate = nn.Linear(5, 6), Gate()
        self.fc2, self.fc3 = nn.Linear(6, 7), nn.Linear(7, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc3(F.relu(self.fc2(self.gate(F.relu(self.fc1(x))))))


@_model
def untraceable_part() -> tuple[nn.Module, torch.Tensor]:
    return WithUntraceable(), torch.randn(4, 5)


class UntraceableRoot(nn.Module):
    """Traceable children run by a forward with data-dependent control flow."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(5, 6), nn.ReLU(), nn.Linear(6, 6))
        self.head = nn.Sequential(nn.Tanh(), nn.Linear(6, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.body(x)
        if h.sum() > 0:
            h = h.flip(-1)
        return self.head(h)


@_model
def untraceable_root() -> tuple[nn.Module, torch.Tensor]:
    return UntraceableRoot(), torch.randn(4, 5)


class TrainOnlyFlip(nn.Module):
    """Flips channels only in training mode: labels must hold in both modes."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(5, 6), nn.Linear(6, 7), nn.Linear(7, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.fc1(x))
        if self.training:
            h = h.flip(-1)
        return self.fc3(torch.tanh(self.fc2(h)))


@_model
def train_only_flip() -> tuple[nn.Module, torch.Tensor]:
    return TrainOnlyFlip(), torch.randn(4, 5)
