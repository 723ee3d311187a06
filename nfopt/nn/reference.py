"""Reference NP and HNP layers of "Permutation Equivariant Neural Functionals" (Zhou et al., 2023).

These are the seed paper's layers for the weight space of one fixed feed-forward network (an MLP,
or a CNN whose kernel offsets are folded into channels). nfopt's shared NF-layer generalises them;
these stay as reference layers for tests and for weight-space tasks.

Data. An L-layer network's weight space is ``weights = (W_1..W_L)`` with ``W_i`` of shape
``(B, C, n_i, n_{i-1}, *kernel_i)`` and ``biases = (b_1..b_L)`` with ``b_i`` of shape
``(B, C, n_i)``: B networks, C feature channels per parameter. n_0 is the number of input
features (or input channels), n_L the number of outputs; neuron layer j has n_j neurons.

Groups. Permuting neuron layer j permutes the rows of ``W_j``, the entries of ``b_j`` and the
columns of ``W_{j+1}``. Hidden layers 1..L-1 can be permuted without changing the network's
function; the input and output layers cannot.

- **NP** (neuron permutation) assumes that *every* neuron layer, input and output included,
  may be permuted: the group is S_{n_0} x ... x S_{n_L}. That is more symmetry than the network
  has, so it needs fewer parameters, and it contains HNP, so an NP layer is also HNP-equivariant.
  ``io_embed=True`` adds the paper's learned input/output position embeddings, which break the
  input/output symmetry and leave only the hidden one.
- **HNP** (hidden neuron permutation) is the true symmetry group S_{n_1} x ... x S_{n_{L-1}}. Input
  and output neurons are indexed: their axes are folded into channels.

Both layers come from one rule. Take each tensor, keep the axes of the permuted neuron layers,
and fold every other axis into the channels: kernel offsets, plus under HNP the input and output
neurons. This is the tensor's *canonical* form, with m_t channels for each feature channel. Call
its set of neuron layers sigma(t). The linear maps from tensor t' to tensor t that commute with
the group have a basis with one element for each subset S of sigma(t) & sigma(t'). That element
averages t' over its neuron axes outside S, mixes channels, and broadcasts along t's neuron axes
outside S. So the layer's output for tensor t is

    Y_t = bias_t + sum_{S subset of sigma(t)} A_{t,S} . bcast_t( concat_{t' : S subset of sigma(t')}
                                                                  mean_{sigma(t') - S} X_t' )

with one learned channel-mixing matrix A_{t,S} per output tensor and kept subset, and so with
per-layer weights. For an MLP under NP these are exactly the paper's terms: for ``W_i`` the
per-element term, the row and column means of ``W_i``, the column means of ``W_{i+1}`` and row
means of ``W_{i-1}``, ``b_i`` and ``b_{i-1}`` broadcast, and the global means of every tensor.
Parameter count, with G = sum_t m_t and M_j = sum of m_t over the tensors t whose sigma(t)
contains j:

    c_in * c_out * sum_t m_t * (G + sum_{j in sigma(t)} M_j + [|sigma(t)| = 2] m_t)  +  c_out * G

NP: m(W_i) = prod(kernel_i), m(b_i) = 1. HNP also folds the input and output neurons, so
m(W_1) = n_0 prod(kernel_1), m(W_L) = n_L prod(kernel_L), m(b_L) = n_L. That is why HNP has more
parameters than NP.

The basis has no redundant terms: one bias per output tensor, not one per term. Compared with the
authors' ``nfn`` code, this leaves out the extra per-term biases and the repeated global means.
HNP here also has the ``b_{L-1}`` -> ``W_L`` term, which the ``nfn`` HNP layer lacks.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from itertools import combinations

import torch
from torch import nn

__all__ = [
    "NetworkShape",
    "WeightSpaceBatch",
    "NPLinear",
    "HNPLinear",
    "NPPool",
    "HNPPool",
    "PointwiseActivation",
    "sequential_to_weight_space",
    "weight_space_to_sequential_",
]


def _positive_int(value: object, what: str) -> int:
    try:
        n = operator.index(value)
    except TypeError:
        raise TypeError(f"{what} must be an integer, got {value!r}") from None
    if isinstance(value, bool) or n < 1:
        raise ValueError(f"{what} must be a positive integer, got {value!r}")
    return n


@dataclass(frozen=True)
class NetworkShape:
    """The shape of a fixed feed-forward network's weight space.

    ``widths`` are the neuron counts n_0..n_L. n_0 is the number of input features or input
    channels, and n_L the number of outputs. ``kernels[i]`` is the kernel shape of the layer
    that maps neuron layer i to neuron layer i+1, ``()`` for a dense layer. An empty
    ``kernels`` means that every layer is dense (an MLP).
    """

    widths: tuple[int, ...]
    kernels: tuple[tuple[int, ...], ...] = ()

    def __post_init__(self) -> None:
        widths = tuple(_positive_int(w, f"width {j}") for j, w in enumerate(self.widths))
        if len(widths) < 2:
            raise ValueError(
                f"a network needs at least two neuron layers (input and output), got widths {widths}"
            )
        n_layers = len(widths) - 1
        kernels = tuple(
            tuple(_positive_int(k, f"kernel size of layer {i}") for k in kernel)
            for i, kernel in enumerate(self.kernels)
        ) or ((),) * n_layers
        if len(kernels) != n_layers:
            raise ValueError(
                f"{len(kernels)} kernel shapes for a network of {n_layers} layers (widths {widths})"
            )
        object.__setattr__(self, "widths", widths)
        object.__setattr__(self, "kernels", kernels)

    @property
    def num_layers(self) -> int:
        """L, the number of weight matrices (or kernels)."""
        return len(self.widths) - 1

    def weight_shape(self, i: int) -> tuple[int, ...]:
        """The shape of ``weights[i]`` (W_{i+1}) for one network and channel."""
        return (self.widths[i + 1], self.widths[i], *self.kernels[i])

    def bias_shape(self, i: int) -> tuple[int, ...]:
        """The shape of ``biases[i]`` (b_{i+1}) for one network and channel."""
        return (self.widths[i + 1],)


@dataclass(frozen=True, eq=False)
class WeightSpaceBatch:
    """Features on the weight spaces of B networks with the same shape, C channels per parameter.

    ``weights[i]`` has shape ``(B, C, n_{i+1}, n_i, *kernel_i)`` and ``biases[i]`` has shape
    ``(B, C, n_{i+1})``. If the shapes do not fit together, construction raises an error that
    says which tensor is wrong.
    """

    weights: tuple[torch.Tensor, ...]
    biases: tuple[torch.Tensor, ...]

    def __post_init__(self) -> None:
        weights, biases = tuple(self.weights), tuple(self.biases)
        if not weights:
            raise ValueError("a weight space needs at least one layer, got no weights")
        if len(weights) != len(biases):
            raise ValueError(f"{len(weights)} weights but {len(biases)} biases: every layer needs one of each")
        named = [(f"weights[{i}]", w) for i, w in enumerate(weights)] + [
            (f"biases[{i}]", b) for i, b in enumerate(biases)
        ]
        for name, t in named:
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
        for i, w in enumerate(weights):
            if w.dim() < 4:
                raise ValueError(
                    f"weights[{i}]: shape {tuple(w.shape)}; expected (batch, channels, n_out, n_in, *kernel)"
                )
        for i, b in enumerate(biases):
            if b.dim() != 3:
                raise ValueError(f"biases[{i}]: shape {tuple(b.shape)}; expected (batch, channels, n_out)")
        lead = tuple(weights[0].shape[:2])
        for name, t in named:
            if tuple(t.shape[:2]) != lead:
                raise ValueError(
                    f"{name}: (batch, channels) = {tuple(t.shape[:2])} but weights[0] has {lead}"
                )
        for i, (w, b) in enumerate(zip(weights, biases)):
            if b.shape[2] != w.shape[2]:
                raise ValueError(f"biases[{i}] has {b.shape[2]} entries but weights[{i}] has {w.shape[2]} rows")
            if i and w.shape[3] != weights[i - 1].shape[2]:
                raise ValueError(
                    f"weights[{i}] takes {w.shape[3]} inputs but weights[{i - 1}] has {weights[i - 1].shape[2]} outputs"
                )
        object.__setattr__(self, "weights", weights)
        object.__setattr__(self, "biases", biases)

    @classmethod
    def randn(
        cls,
        shape: NetworkShape,
        batch_size: int,
        channels: int,
        *,
        dtype: torch.dtype | None = None,
        generator: torch.Generator | None = None,
    ) -> WeightSpaceBatch:
        """Standard-normal features for ``shape``, used for tests and for comparing layers."""

        def draw(s: tuple[int, ...]) -> torch.Tensor:
            return torch.randn(batch_size, channels, *s, dtype=dtype, generator=generator)

        n = shape.num_layers
        return cls(
            tuple(draw(shape.weight_shape(i)) for i in range(n)),
            tuple(draw(shape.bias_shape(i)) for i in range(n)),
        )

    @property
    def batch_size(self) -> int:
        return self.weights[0].shape[0]

    @property
    def channels(self) -> int:
        return self.weights[0].shape[1]

    @property
    def shape(self) -> NetworkShape:
        """The network shape these features live on."""
        widths = (self.weights[0].shape[3], *(w.shape[2] for w in self.weights))
        return NetworkShape(widths, tuple(tuple(w.shape[4:]) for w in self.weights))

    def map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> WeightSpaceBatch:
        """Apply ``fn`` to every tensor. An elementwise ``fn`` commutes with every permutation."""
        return WeightSpaceBatch(tuple(fn(w) for w in self.weights), tuple(fn(b) for b in self.biases))

    def permute(self, perms: Mapping[int, torch.Tensor]) -> WeightSpaceBatch:
        """Permute the neurons. ``perms[j]`` reorders neuron layer j, with j in 0..L.

        Neuron layers that have no entry in ``perms`` stay in order.
        """
        widths = self.shape.widths
        for j, p in perms.items():
            if not 0 <= j < len(widths):
                raise ValueError(f"neuron layer {j} does not exist; this network has layers 0..{len(widths) - 1}")
            if tuple(p.shape) != (widths[j],):
                raise ValueError(f"permutation of neuron layer {j} has shape {tuple(p.shape)}, expected ({widths[j]},)")

        def take(x: torch.Tensor, axis: int, j: int) -> torch.Tensor:
            return x.index_select(axis, perms[j].to(x.device)) if j in perms else x

        return WeightSpaceBatch(
            tuple(take(take(w, 2, i + 1), 3, i) for i, w in enumerate(self.weights)),
            tuple(take(b, 2, i + 1) for i, b in enumerate(self.biases)),
        )


def _check_input(
    ws: object, shape: NetworkShape, channels: int, who: str, dtype: torch.dtype | None = None
) -> WeightSpaceBatch:
    if not isinstance(ws, WeightSpaceBatch):
        raise TypeError(f"{who} expects a WeightSpaceBatch, got {type(ws).__name__}")
    if ws.shape != shape:
        raise ValueError(f"{who} was built for {shape} but got features of {ws.shape}")
    if ws.channels != channels:
        raise ValueError(f"{who} expects {channels} input channels, got {ws.channels}")
    if dtype is not None and any(t.dtype != dtype for t in ws.weights + ws.biases):
        found = sorted({str(t.dtype) for t in ws.weights + ws.biases})
        raise TypeError(f"{who} has {dtype} parameters but got features of dtype {', '.join(found)}")
    return ws


@dataclass(frozen=True)
class _TensorLayout:
    """How a layer sees one weight or bias tensor. Some of its axes are permuted by neuron layers
    and stay axes. The others are folded into the channels: kernel offsets, and any neuron layer
    the group does not permute.
    """

    shape: tuple[int, ...]
    sets: tuple[int | None, ...]
    """For each axis, the neuron layer that permutes it, or None if it is fixed."""
    name: str

    @property
    def set_axes(self) -> tuple[int, ...]:
        return tuple(a for a, s in enumerate(self.sets) if s is not None)

    @property
    def fixed_axes(self) -> tuple[int, ...]:
        return tuple(a for a, s in enumerate(self.sets) if s is None)

    @property
    def set_ids(self) -> tuple[int, ...]:
        """sigma(t): the neuron layers that permute the canonical axes, in axis order."""
        return tuple(self.sets[a] for a in self.set_axes)

    @property
    def multiplicity(self) -> int:
        """m_t: how many canonical channels each feature channel becomes."""
        return math.prod(self.shape[a] for a in self.fixed_axes)

    def to_canonical(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, *shape)`` to ``(B, C * m_t, *set-axis sizes)``."""
        order = self.fixed_axes + self.set_axes
        x = x.permute(0, 1, *(2 + a for a in order))
        return x.reshape(x.shape[0], x.shape[1] * self.multiplicity, *(self.shape[a] for a in self.set_axes))

    def from_canonical(self, y: torch.Tensor, channels: int) -> torch.Tensor:
        """The inverse of :meth:`to_canonical`, for ``channels`` feature channels."""
        order = self.fixed_axes + self.set_axes
        y = y.reshape(y.shape[0], channels, *(self.shape[a] for a in order))
        inverse = sorted(range(len(order)), key=order.__getitem__)
        return y.permute(0, 1, *(2 + a for a in inverse))


def _layouts(shape: NetworkShape, permuted: frozenset[int]) -> tuple[_TensorLayout, ...]:
    """The layouts of W_1..W_L and then b_1..b_L, when the neuron layers ``permuted`` are permuted."""

    def label(j: int) -> int | None:
        return j if j in permuted else None

    n = shape.num_layers
    weights = tuple(
        _TensorLayout(shape.weight_shape(i), (label(i + 1), label(i)) + (None,) * len(shape.kernels[i]), f"W{i + 1}")
        for i in range(n)
    )
    biases = tuple(_TensorLayout(shape.bias_shape(i), (label(i + 1),), f"b{i + 1}") for i in range(n))
    return weights + biases


def _pool_to(x: torch.Tensor, set_ids: tuple[int, ...], keep: tuple[int, ...]) -> torch.Tensor:
    """Average canonical ``x`` over its neuron axes outside ``keep``.

    The kept axes stay in the source's order. That is also the output's order: the only subset
    with two neuron layers, (i, i-1), is taken only from W_i itself, since no other tensor has both.
    """
    pooled = tuple(2 + k for k, s in enumerate(set_ids) if s not in keep)
    return x.mean(dim=pooled) if pooled else x


def _subsets(ids: tuple[int, ...]) -> tuple[tuple[int, ...], ...]:
    """Every subset of ``ids``, the empty one included, each in the order of ``ids``."""
    return tuple(s for r in range(len(ids) + 1) for s in combinations(ids, r))


def _term_name(tensor: str, keep: tuple[int, ...]) -> str:
    return f"{tensor}_" + ("_".join(f"n{j}" for j in keep) if keep else "global")


class _NeuronPermutationLinear(nn.Module):
    """The most general linear layer that is equivariant to permuting the neuron layers ``permuted``.

    See the module docstring for its terms and parameter count.
    """

    def __init__(self, shape: NetworkShape, in_channels: int, out_channels: int, permuted: frozenset[int]) -> None:
        super().__init__()
        if not isinstance(shape, NetworkShape):
            raise TypeError(f"shape must be a NetworkShape, got {type(shape).__name__}")
        self.shape = shape
        self.in_channels = _positive_int(in_channels, "in_channels")
        self.out_channels = _positive_int(out_channels, "out_channels")
        self._layouts = _layouts(shape, permuted)
        all_keeps = {keep for lay in self._layouts for keep in _subsets(lay.set_ids)}
        self._sources = {
            keep: tuple(j for j, lay in enumerate(self._layouts) if set(keep) <= set(lay.set_ids))
            for keep in all_keeps
        }
        self.mix = nn.ParameterDict()
        self.bias = nn.ParameterDict()
        for lay in self._layouts:
            rows = lay.multiplicity * self.out_channels
            for keep in _subsets(lay.set_ids):
                cols = sum(self._layouts[j].multiplicity for j in self._sources[keep]) * self.in_channels
                self.mix[_term_name(lay.name, keep)] = nn.Parameter(torch.empty(rows, cols))
            self.bias[lay.name] = nn.Parameter(torch.empty(rows))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Uniform in +-1/sqrt(fan-in), where the fan-in counts every input of every term of the
        output tensor, so that all terms together behave like one ``nn.Linear``.
        """
        for lay in self._layouts:
            names = [_term_name(lay.name, keep) for keep in _subsets(lay.set_ids)]
            bound = 1.0 / math.sqrt(sum(self.mix[n].shape[1] for n in names))
            with torch.no_grad():
                for n in names:
                    self.mix[n].uniform_(-bound, bound)
                self.bias[lay.name].uniform_(-bound, bound)

    def forward(self, ws: WeightSpaceBatch) -> WeightSpaceBatch:
        ws = _check_input(ws, self.shape, self.in_channels, type(self).__name__, self.bias[self._layouts[0].name].dtype)
        xs = [lay.to_canonical(x) for lay, x in zip(self._layouts, ws.weights + ws.biases)]
        gathered: dict[tuple[int, ...], torch.Tensor] = {}
        outs = []
        for lay in self._layouts:
            sizes = [lay.shape[a] for a in lay.set_axes]
            y = self.bias[lay.name].view(1, -1, *([1] * len(sizes)))
            for keep in _subsets(lay.set_ids):
                if keep not in gathered:
                    gathered[keep] = torch.cat(
                        [_pool_to(xs[j], self._layouts[j].set_ids, keep) for j in self._sources[keep]], dim=1
                    )
                z = torch.einsum("oc,bc...->bo...", self.mix[_term_name(lay.name, keep)], gathered[keep])
                y = y + z.reshape(*z.shape[:2], *(n if s in keep else 1 for n, s in zip(sizes, lay.set_ids)))
            outs.append(lay.from_canonical(y, self.out_channels))
        n = self.shape.num_layers
        return WeightSpaceBatch(tuple(outs[:n]), tuple(outs[n:]))

    def extra_repr(self) -> str:
        return f"{self.shape}, in_channels={self.in_channels}, out_channels={self.out_channels}"


class NPLinear(_NeuronPermutationLinear):
    """The paper's NP layer. It is equivariant to permuting every neuron layer, input and output
    included, and so to permuting the hidden ones.

    With ``io_embed=True`` it first adds learned position embeddings to the input columns of W_1
    and to the output rows of W_L and b_L. This is the paper's way to tell input and output neurons
    apart. The layer is then equivariant only to hidden-neuron permutations.
    """

    def __init__(self, shape: NetworkShape, in_channels: int, out_channels: int, io_embed: bool = False) -> None:
        super().__init__(shape, in_channels, out_channels, frozenset(range(len(shape.widths))))
        self.io_embed = io_embed
        if io_embed:
            n_in, n_out = shape.widths[0], shape.widths[-1]
            self.input_embedding = nn.Parameter(torch.randn(self.in_channels, 1, n_in, *shape.kernels[0]))
            self.output_embedding = nn.Parameter(torch.randn(self.in_channels, n_out, 1, *shape.kernels[-1]))
            self.output_bias_embedding = nn.Parameter(torch.randn(self.in_channels, n_out))

    def forward(self, ws: WeightSpaceBatch) -> WeightSpaceBatch:
        if self.io_embed:
            ws = _check_input(ws, self.shape, self.in_channels, type(self).__name__)
            weights = list(ws.weights)
            weights[0] = weights[0] + self.input_embedding
            weights[-1] = weights[-1] + self.output_embedding
            ws = WeightSpaceBatch(tuple(weights), ws.biases[:-1] + (ws.biases[-1] + self.output_bias_embedding,))
        return super().forward(ws)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", io_embed={self.io_embed}"


class HNPLinear(_NeuronPermutationLinear):
    """The paper's HNP layer. It is equivariant exactly to permuting the hidden neurons, the true
    symmetry of the network.

    Input and output neurons are indexed: W_1's columns, W_L's rows and b_L are folded into
    channels. This gives the first and last layers more terms, and the layer more parameters
    than NP.
    """

    def __init__(self, shape: NetworkShape, in_channels: int, out_channels: int) -> None:
        super().__init__(shape, in_channels, out_channels, frozenset(range(1, shape.num_layers)))


_REDUCTIONS: dict[str, Callable[[torch.Tensor, tuple[int, ...]], torch.Tensor]] = {
    "mean": lambda x, dims: x.mean(dim=dims),
    "sum": lambda x, dims: x.sum(dim=dims),
    "max": lambda x, dims: x.amax(dim=dims),
}


class _NeuronPermutationPool(nn.Module):
    """An invariant map to a vector: each tensor is reduced over its permuted neuron axes, and
    its fixed axes are kept.
    """

    def __init__(self, shape: NetworkShape, in_channels: int, permuted: frozenset[int], reduce: str) -> None:
        super().__init__()
        if not isinstance(shape, NetworkShape):
            raise TypeError(f"shape must be a NetworkShape, got {type(shape).__name__}")
        if reduce not in _REDUCTIONS:
            raise ValueError(f"reduce must be one of {sorted(_REDUCTIONS)}, got {reduce!r}")
        self.shape = shape
        self.in_channels = _positive_int(in_channels, "in_channels")
        self.reduce = reduce
        self._layouts = _layouts(shape, permuted)
        self.out_features = self.in_channels * sum(lay.multiplicity for lay in self._layouts)
        """The length of the vector each network pools to."""

    def forward(self, ws: WeightSpaceBatch) -> torch.Tensor:
        """``(B, out_features)``: the tensors in the order W_1..W_L, b_1..b_L, channel-major."""
        ws = _check_input(ws, self.shape, self.in_channels, type(self).__name__)
        parts = []
        for lay, x in zip(self._layouts, ws.weights + ws.biases):
            x = lay.to_canonical(x)
            dims = tuple(range(2, x.dim()))
            parts.append(_REDUCTIONS[self.reduce](x, dims) if dims else x)
        return torch.cat(parts, dim=1)

    def extra_repr(self) -> str:
        return f"{self.shape}, in_channels={self.in_channels}, reduce={self.reduce!r}"


class NPPool(_NeuronPermutationPool):
    """Invariant to permuting every neuron layer. Gives ``in_channels * sum_i (prod(kernel_i) + 1)``
    features.
    """

    def __init__(self, shape: NetworkShape, in_channels: int, reduce: str = "mean") -> None:
        super().__init__(shape, in_channels, frozenset(range(len(shape.widths))), reduce)


class HNPPool(_NeuronPermutationPool):
    """Invariant to permuting the hidden neurons. Input and output neurons keep their positions:
    W_1 pools to ``n_0 * prod(kernel_1)`` features per channel, W_L to ``n_L * prod(kernel_L)`` and
    b_L to ``n_L``.
    """

    def __init__(self, shape: NetworkShape, in_channels: int, reduce: str = "mean") -> None:
        super().__init__(shape, in_channels, frozenset(range(1, shape.num_layers)), reduce)


class PointwiseActivation(nn.Module):
    """Apply an elementwise nonlinearity to every tensor. This commutes with every permutation,
    so a stack of equivariant layers with these between them stays equivariant.
    """

    def __init__(self, activation: Callable[[torch.Tensor], torch.Tensor]) -> None:
        super().__init__()
        self.activation = activation

    def forward(self, ws: WeightSpaceBatch) -> WeightSpaceBatch:
        return ws.map(self.activation)


_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def _weight_layers(model: nn.Module) -> list[nn.Linear | nn.Conv1d | nn.Conv2d | nn.Conv3d]:
    """The model's Linear and Conv layers in registration order (execution order for nn.Sequential).

    Raises an error if the model has another parameterised module, since this weight space has no
    place for its parameters.
    """
    layers: list[tuple[str, nn.Module]] = []
    for name, module in model.named_modules():
        if isinstance(module, (nn.Linear, *_CONVS)):
            if module.bias is None:
                raise ValueError(f"layer {name!r} has no bias; the weight space needs one bias per layer")
            if isinstance(module, _CONVS) and module.groups != 1:
                raise ValueError(f"layer {name!r} is a grouped convolution (groups={module.groups}); not supported")
            layers.append((name, module))
        elif any(True for _ in module.parameters(recurse=False)):
            raise ValueError(
                f"module {name!r} ({type(module).__name__}) has parameters; only Linear and Conv1d/2d/3d "
                "layers have a place in this weight space"
            )
    if not layers:
        raise ValueError("the model has no Linear or Conv layers")
    for (prev_name, prev), (name, layer) in zip(layers, layers[1:]):
        if layer.weight.shape[1] != prev.weight.shape[0]:
            raise ValueError(
                f"layer {name!r} takes {layer.weight.shape[1]} inputs but layer {prev_name!r} gives "
                f"{prev.weight.shape[0]} outputs (flattening a feature map without pooling it to one "
                "position is not supported)"
            )
    return [layer for _, layer in layers]


def sequential_to_weight_space(model: nn.Module) -> WeightSpaceBatch:
    """Copy the parameters of a feed-forward MLP or CNN (Linear and Conv layers with biases, and
    parameter-free modules between them) into a batch of one network with one channel.

    The tensors are detached copies, so later training of the model does not change them.
    """
    layers = _weight_layers(model)
    return WeightSpaceBatch(
        tuple(layer.weight.detach().clone()[None, None] for layer in layers),
        tuple(layer.bias.detach().clone()[None, None] for layer in layers),
    )


def weight_space_to_sequential_(ws: WeightSpaceBatch, model: nn.Module, index: int = 0, channel: int = 0) -> None:
    """Write network ``index``, channel ``channel`` of ``ws`` into ``model``'s parameters, in place.

    This is the inverse of :func:`sequential_to_weight_space`.
    """
    layers = _weight_layers(model)
    expected = NetworkShape(
        (layers[0].weight.shape[1], *(layer.weight.shape[0] for layer in layers)),
        tuple(tuple(layer.weight.shape[2:]) for layer in layers),
    )
    if ws.shape != expected:
        raise ValueError(f"the model has weight space {expected} but the features have {ws.shape}")
    if not (0 <= index < ws.batch_size and 0 <= channel < ws.channels):
        raise IndexError(
            f"network {index}, channel {channel} is out of range for batch size {ws.batch_size} and "
            f"{ws.channels} channels"
        )
    with torch.no_grad():
        for layer, w, b in zip(layers, ws.weights, ws.biases):
            layer.weight.copy_(w[index, channel])
            layer.bias.copy_(b[index, channel])
