"""How many weights an equivariant linear layer needs, with and without sign flips and scalings.

    python -m benchmarks.monomial_params       # prints the table, writes results/monomial/params.{json,md}

For MLPs of growing depth it counts, per pair of input and output channels:

- the dimension of the space of *all* linear maps of the fixed weight space (hidden neurons
  symmetric, input and output axes indexed) that commute with the group: permutations only, with
  sign flips (tanh networks), with positive scalings (ReLU networks), biases included. This is
  the parameter count of the most general fixed-shape layer (the seed papers' setting);
- the seed paper's reference HNP and NP layers (:mod:`nfopt.nn.reference`), as built;
- nfopt's shared NF-layer: its weights in total (the same for any network) and the ones that act
  on the network under each group (those that get a gradient).

The dimension counts orbits of (output index, input index) pairs: under a product of symmetric
groups an orbit is a partition of the pair's labelled positions into blocks of equal indices,
each block within one neuron set and no set with more blocks than neurons. Sign flips and
scalings keep every index, so an orbit carries a map only if they multiply both ends alike:
per block of a flipped set an even number of positions, per block of a scaled set output
exponents summing to the input ones. Fixed axes multiply the count by their sizes.
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from nfopt.weight_space import MonomialSpec
from nfopt.nn.layer import NFLayer
from nfopt.nn.reference import HNPLinear, NetworkShape, NPLinear
from nfopt.weight_space import TensorSpec, WeightSpaceSpec

from .report import save_experiment

OUT = Path(__file__).parent / "results" / "monomial"
GROUPS = ("perm", "sign", "scale")


def hidden_mlp_spec(widths: Sequence[int], symmetry: str) -> MonomialSpec:
    """An MLP's weight space with hidden neurons as sets admitting ``symmetry``; input and output
    axes fixed (indexed), as in the seed paper's HNP setting."""
    depth = len(widths) - 1

    def label(layer: int) -> str | None:
        return f"h{layer}" if 0 < layer < depth else None

    tensors = []
    for i in range(depth):
        tensors.append(TensorSpec((widths[i + 1], widths[i]), (label(i + 1), label(i)), f"W{i + 1}"))
        tensors.append(TensorSpec((widths[i + 1],), (label(i + 1),), f"b{i + 1}"))
    space = WeightSpaceSpec(tuple(tensors))
    return MonomialSpec(space, tuple((f"h{j}", symmetry) for j in range(1, depth)))


def _partitions(items: list) -> list[list[list]]:
    """Every set partition of ``items`` (as lists of blocks)."""
    if not items:
        return [[]]
    first, rest = items[0], items[1:]
    out = []
    for p in _partitions(rest):
        out.append([[first], *p])
        for i in range(len(p)):
            out.append(p[:i] + [[first, *p[i]]] + p[i + 1 :])
    return out


def _orbits(spec: MonomialSpec, positions: list[tuple[object, int]]) -> int:
    """Orbits of index tuples over labelled ``positions`` (set, signed exponent) that carry a map."""
    by_set: dict[object, list[int]] = {}
    for label, e in positions:
        by_set.setdefault(label, []).append(e)
    total = 1
    for label, exps in by_set.items():
        symmetry, size = spec.symmetry(label), spec.space.set_sizes[label]
        ok = 0
        for blocks in _partitions(exps):
            if len(blocks) > size:
                continue
            if symmetry == "sign" and any(len(b) % 2 for b in blocks):
                continue
            if symmetry == "scale" and any(sum(b) != 0 for b in blocks):
                continue
            ok += 1
        total *= ok
    return total


def _positions(spec: MonomialSpec, index: int, sign: int) -> tuple[list[tuple[object, int]], int]:
    """A tensor's labelled positions with exponents times ``sign``, and the product of its fixed sizes."""
    t = spec.space.tensors[index]
    labelled = [(a, sign * e) for a, e in zip(t.axes, spec.exponents[index]) if a is not None]
    fixed = math.prod(n for n, a in zip(t.shape, t.axes) if a is None)
    return labelled, fixed


def equivariant_dimension(spec: MonomialSpec) -> int:
    """Dimension of the equivariant affine maps of the weight space (one input and output channel)."""
    n = len(spec.space.tensors)
    total = 0
    for o in range(n):
        out_pos, out_fixed = _positions(spec, o, 1)
        total += _orbits(spec, out_pos) * out_fixed  # constant (bias) maps
        for i in range(n):
            in_pos, in_fixed = _positions(spec, i, -1)
            total += _orbits(spec, out_pos + in_pos) * out_fixed * in_fixed
    return total


def shared_layer_weights(spec: MonomialSpec | WeightSpaceSpec) -> int:
    """Weights of nfopt's shared NF-layer (one channel in and out) that act on ``spec``."""
    space = spec.space if isinstance(spec, MonomialSpec) else spec
    layer = NFLayer(1, 1).double()
    torch.nn.init.normal_(layer.bias)  # nonzero everywhere so that every used weight gets a gradient
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(1, *t.shape, generator=g, dtype=torch.float64) for t in space.tensors]
    sum((y * torch.randn(y.shape, generator=g, dtype=torch.float64)).sum() for y in layer(spec, xs)).backward()
    return sum(int((p.grad != 0).sum()) for p in layer.parameters() if p.grad is not None)


def rows(depths: Sequence[int], width: int, n_in: int, n_out: int) -> list[dict]:
    """One row of counts per depth (number of weight layers)."""
    out = []
    for depth in depths:
        widths = [n_in] + [width] * (depth - 1) + [n_out]
        specs = {g: hidden_mlp_spec(widths, g) for g in GROUPS}
        shape = NetworkShape(tuple(widths))
        row = {"depth": depth, "widths": widths}
        row.update({f"max_{g}": equivariant_dimension(s) for g, s in specs.items()})
        row["hnp"] = sum(p.numel() for p in HNPLinear(shape, 1, 1).parameters())
        row["np"] = sum(p.numel() for p in NPLinear(shape, 1, 1).parameters())
        row["shared_total"] = sum(p.numel() for p in NFLayer(1, 1).parameters())
        row.update({f"shared_{g}": shared_layer_weights(s) for g, s in specs.items()})
        out.append(row)
    return out


def markdown(table: list[dict], command: str) -> str:
    lines = [
        "# Equivariant linear layers: weights per channel pair",
        "",
        f"Produced by `{command}`. MLPs with hidden width {table[0]['widths'][1]}, "
        f"{table[0]['widths'][0]} inputs, {table[0]['widths'][-1]} outputs; depth = weight layers.",
        "",
        "| depth | most general layer: permutations | + sign flips | + scalings | seed HNP layer | seed NP layer "
        "| shared NF-layer: total | acting, permutations | acting, sign flips | acting, scalings |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in table:
        lines.append(
            f"| {r['depth']} | {r['max_perm']:,} | {r['max_sign']:,} | {r['max_scale']:,} | {r['hnp']:,} | {r['np']:,} "
            f"| {r['shared_total']:,} | {r['shared_perm']:,} | {r['shared_sign']:,} | {r['shared_scale']:,} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--depths", default="2,3,4,5,6,8", help="comma-separated numbers of weight layers")
    ap.add_argument("--width", type=int, default=32)
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args(argv)
    start = time.perf_counter()
    table = rows([int(d) for d in args.depths.split(",")], args.width, 64, 10)
    seconds = time.perf_counter() - start
    save_experiment(args.out, "params", "benchmarks.monomial_params", argv, table, seconds,
                    lambda command: markdown(table, command))


if __name__ == "__main__":
    main()
