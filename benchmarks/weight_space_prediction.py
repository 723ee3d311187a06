"""Predicting how well a small network performs from its weights alone, with nfopt's invariant layers.

    python -m benchmarks.weight_space_prediction           # full: benchmarks/results/monomial/prediction.{json,md}
    python -m benchmarks.weight_space_prediction --quick   # smaller zoos, shorter training (under a minute):
                                                           #   benchmarks/results/monomial/quick/

Two zoos of MLPs on scikit-learn's digits (64-16-16-10), one with tanh and one with ReLU, are
trained here, deterministically from the seed: each network with Adam for a random number of steps
at a random learning rate from a random init scale, so that their test accuracies spread from
chance to about 97%. A model reads a network's raw weights and regresses its test accuracy:
an NFN, then an invariant pool, then an MLP head. It is built twice with the same seed and
training budget: on the monomial spec (tanh: hidden neurons may flip sign; ReLU: be scaled by any
c > 0) and on the permutation-only weight space. Both are evaluated on the test zoo as it is and on
the test zoo moved by random function-preserving group elements (hidden permutations with random
signs, or with scalings log-uniform over two orders of magnitude): every moved network computes
the same function, so its accuracy is unchanged. The monomial model's predictions are unchanged
too (up to rounding); the permutation-only model meets weights it has never seen.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import os
import platform
import shlex
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import vmap

from meta_train.tasks.data import load_dataset
from nfopt.weight_space import MonomialElement, MonomialSpec
from nfopt.nn.nfn import NFN, InvariantPool
from nfopt.weight_space import TensorSpec, WeightSpaceSpec

from .report import json_ready

RESULTS = Path(__file__).parent / "results" / "monomial"

ACTIVATIONS: dict[str, tuple[Any, str]] = {"tanh": (torch.tanh, "sign"), "relu": (torch.relu, "scale")}
"""Zoo activation -> (the function, the symmetry its hidden neurons admit beyond permutations)."""

INPUTS, CLASSES = 64, 10
IN, OUT = "in", "out"
"""Neuron sets of the input pixels and output classes: labelled, but never moved (they are not symmetries)."""

TARGET = "test_accuracy"


@dataclass(frozen=True)
class Config:
    """Sizes of one run: the zoos, the property models and how they are trained."""

    networks: int = 512  # per zoo; the first train_fraction are the training split
    train_fraction: float = 0.75
    hidden: int = 16  # zoo MLP width
    max_steps: int = 400  # zoo training steps are log-uniform in [1, max_steps]
    batch_size: int = 32  # zoo training minibatch
    lr_range: tuple[float, float] = (1e-4, 3e-2)  # log-uniform, Adam
    init_scale_range: tuple[float, float] = (0.3, 3.0)  # log-uniform, times 1/sqrt(fan_in)
    channels: int = 16  # NFN hidden and output channels
    head_width: int = 64
    epochs: int = 60
    model_batch: int = 32
    model_lr: float = 2e-3
    log10_scale: float = 1.0  # ReLU zoo moved by scalings in [10**-s, 10**s]


FULL = Config()
QUICK = Config(networks=192, max_steps=200, epochs=25)


# ---- the zoo ------------------------------------------------------------------------------------


def mlp_space(hidden: int) -> WeightSpaceSpec:
    """The weight space of a 64-h-h-10 MLP in nn.Linear layout, hidden sets coupled layer to layer."""
    widths, sets = (INPUTS, hidden, hidden, CLASSES), (IN, "h1", "h2", OUT)
    tensors = []
    for i in range(3):
        tensors.append(TensorSpec((widths[i + 1], widths[i]), (sets[i + 1], sets[i]), f"w{i}"))
        tensors.append(TensorSpec((widths[i + 1],), (sets[i + 1],), f"b{i}"))
    return WeightSpaceSpec(tuple(tensors))


def zoo_spec(activation: str, hidden: int) -> MonomialSpec:
    """The MLP's weight space with its hidden sets admitting the activation's symmetry."""
    return MonomialSpec(mlp_space(hidden), (("h1", ACTIVATIONS[activation][1]), ("h2", ACTIVATIONS[activation][1])))


def mlp_forward(weights: Sequence[torch.Tensor], x: torch.Tensor, activation: str) -> torch.Tensor:
    """Logits (N, B, 10) of N stacked MLPs (weights (N, *shape)) on inputs (N, B, 64) or (B, 64)."""
    act = ACTIVATIONS[activation][0]
    h = x.expand(len(weights[0]), *x.shape[-2:])
    for i in range(3):
        w, b = weights[2 * i], weights[2 * i + 1]
        h = torch.baddbmm(b[:, None], h, w.transpose(1, 2))
        if i < 2:
            h = act(h)
    return h


@dataclass(frozen=True)
class Zoo:
    """N trained networks: stacked weights (one (N, *shape) tensor per tensor of the space), the
    property, and the training hyperparameters that produced it."""

    activation: str
    weights: list[torch.Tensor]
    test_accuracy: torch.Tensor
    train_loss: torch.Tensor
    lr: torch.Tensor
    steps: torch.Tensor
    init_scale: torch.Tensor

    def split(self, n_train: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Weights of the first ``n_train`` networks and of the rest."""
        return [w[:n_train] for w in self.weights], [w[n_train:] for w in self.weights]


def _log_uniform(n: int, low: float, high: float, g: torch.Generator) -> torch.Tensor:
    return torch.exp(torch.empty(n).uniform_(math.log(low), math.log(high), generator=g))


def make_zoo(activation: str, config: Config, seed: int) -> Zoo:
    """Train ``config.networks`` MLPs at once on digits, each with its own init scale, Adam learning
    rate and number of steps, all drawn from ``seed``: the same seed gives the same zoo."""
    g = torch.Generator().manual_seed(seed * len(ACTIVATIONS) + list(ACTIVATIONS).index(activation))
    data = load_dataset("digits", seed)
    x_train, x_test = data.x_train.flatten(1), data.x_test.flatten(1)
    n = config.networks
    init_scale = _log_uniform(n, *config.init_scale_range, g)
    lr = _log_uniform(n, *config.lr_range, g)
    steps = _log_uniform(n, 1.0, config.max_steps + 1.0, g).floor().long().clamp(1, config.max_steps)
    weights = []
    for t in mlp_space(config.hidden).tensors:
        if len(t.shape) == 2:
            bound = init_scale.view(n, 1, 1) / math.sqrt(t.shape[1])
            weights.append((torch.rand(n, *t.shape, generator=g) * 2 - 1) * bound)
        else:
            weights.append(torch.zeros(n, *t.shape))
    for w in weights:
        w.requires_grad_()
    moments = [(torch.zeros_like(w), torch.zeros_like(w)) for w in weights]
    beta1, beta2, eps = 0.9, 0.999, 1e-8
    for step in range(1, int(steps.max()) + 1):
        idx = torch.randint(len(x_train), (n, config.batch_size), generator=g)
        logits = mlp_forward(weights, x_train[idx], activation)
        # Summed over networks: each network's gradient is that of its own mean loss.
        loss = F.cross_entropy(logits.flatten(0, 1), data.y_train[idx].flatten(), reduction="sum") / config.batch_size
        grads = torch.autograd.grad(loss, weights)
        rate = lr * (steps >= step) * math.sqrt(1 - beta2**step) / (1 - beta1**step)
        with torch.no_grad():
            for w, gw, (m, v) in zip(weights, grads, moments):
                m.lerp_(gw, 1 - beta1)
                v.lerp_(gw.square(), 1 - beta2)
                w.sub_(rate.view(-1, *[1] * (w.dim() - 1)) * m / (v.sqrt() + eps))
    weights = [w.detach() for w in weights]
    with torch.no_grad():
        accuracy = (mlp_forward(weights, x_test, activation).argmax(-1) == data.y_test).float().mean(1)
        train_logits = mlp_forward(weights, x_train, activation)
        train_loss = F.cross_entropy(
            train_logits.flatten(0, 1), data.y_train.repeat(n), reduction="none"
        ).view(n, -1).mean(1)
    return Zoo(activation, weights, accuracy, train_loss, lr, steps, init_scale)


def function_preserving_element(spec: MonomialSpec, g: torch.Generator, log10_scale: float) -> MonomialElement:
    """A random group element that leaves the network's function unchanged: the spec's random
    element with the input and output sets left in place."""
    e = spec.random_element(g, log10_scale)
    fixed = {s: torch.arange(spec.space.set_sizes[s]) for s in (IN, OUT)}
    return MonomialElement({**e.perm, **fixed}, e.factors)


def move_networks(
    spec: MonomialSpec, weights: Sequence[torch.Tensor], seed: int, log10_scale: float
) -> list[torch.Tensor]:
    """Stacked networks, each moved by its own random function-preserving element."""
    g = torch.Generator().manual_seed(seed)
    moved = [
        spec.act([w[i] for w in weights], function_preserving_element(spec, g, log10_scale))
        for i in range(len(weights[0]))
    ]
    return [torch.stack(ts) for ts in zip(*moved)]


# ---- the property model -------------------------------------------------------------------------


class PropertyPredictor(nn.Module):
    """Raw weights (1 channel) -> NFN -> invariant pool -> MLP head -> one number per network.

    On a :class:`MonomialSpec` the prediction is invariant to the monomial group, on a plain
    :class:`WeightSpaceSpec` to permutations only. Networks are batched with ``vmap``.
    """

    def __init__(self, spec: WeightSpaceSpec | MonomialSpec, channels: int, head_width: int) -> None:
        super().__init__()
        self.spec = spec
        self.nfn = NFN(1, channels, channels, n_layers=2)
        self.pool = InvariantPool(channels)
        self.head = nn.Sequential(nn.Linear(self.pool.out_features, head_width), nn.ReLU(), nn.Linear(head_width, 1))

    def _one(self, *xs: torch.Tensor) -> torch.Tensor:
        return self.head(self.pool(self.spec, self.nfn(self.spec, [x[None] for x in xs])))[0]

    def forward(self, weights: Sequence[torch.Tensor]) -> torch.Tensor:
        """Predictions (N,) for N stacked networks (weights (N, *shape))."""
        return vmap(self._one)(*weights)

    def predict(self, weights: Sequence[torch.Tensor], chunk: int = 128) -> torch.Tensor:
        """:meth:`forward` without gradients, in chunks."""
        with torch.no_grad():
            return torch.cat([self([w[i : i + chunk] for w in weights]) for i in range(0, len(weights[0]), chunk)])


def used_parameters(model: nn.Module, weights: Sequence[torch.Tensor]) -> int:
    """How many parameter elements the prediction depends on (nonzero gradient on a batch): the
    monomial spec drops the NF-layer terms that would break the symmetry."""
    model.zero_grad(set_to_none=True)
    model(weights).square().sum().backward()
    used = sum(int(torch.count_nonzero(p.grad)) for p in model.parameters() if p.grad is not None)
    model.zero_grad(set_to_none=True)
    return used


def train_predictor(
    spec: WeightSpaceSpec | MonomialSpec,
    weights: Sequence[torch.Tensor],
    targets: torch.Tensor,
    config: Config,
    seed: int,
) -> tuple[PropertyPredictor, float, float]:
    """Fit a predictor by MSE on standardised targets; return it with the targets' mean and std.

    The same seed gives the same initialisation (where the architectures coincide) and batches.
    """
    torch.manual_seed(seed)
    model = PropertyPredictor(spec, config.channels, config.head_width)
    mean, std = float(targets.mean()), float(targets.std())
    z = (targets - mean) / std
    opt = torch.optim.Adam(model.parameters(), lr=config.model_lr)
    g = torch.Generator().manual_seed(seed)
    n = len(targets)
    for _ in range(config.epochs):
        order = torch.randperm(n, generator=g)
        for i in range(0, n, config.model_batch):
            idx = order[i : i + config.model_batch]
            loss = F.mse_loss(model([w[idx] for w in weights]), z[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return model, mean, std


# ---- metrics ------------------------------------------------------------------------------------


def r2_score(y: np.ndarray, pred: np.ndarray) -> float:
    """Coefficient of determination: 1 - SSE / total sum of squares."""
    y, pred = np.asarray(y, np.float64), np.asarray(pred, np.float64)
    return float(1 - np.square(y - pred).sum() / np.square(y - y.mean()).sum())


def kendall_tau(x: np.ndarray, y: np.ndarray) -> float:
    """Kendall's tau-b (ties in either variable accounted for), over all pairs: O(n^2) memory."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    i, j = np.triu_indices(len(x), k=1)
    dx, dy = np.sign(x[i] - x[j]), np.sign(y[i] - y[j])
    denom = math.sqrt(np.count_nonzero(dx) * np.count_nonzero(dy))
    return float((dx * dy).sum() / denom) if denom else float("nan")


def _scores(y: torch.Tensor, pred: torch.Tensor) -> dict[str, float]:
    return {"r2": r2_score(y.numpy(), pred.numpy()), "kendall_tau": kendall_tau(y.numpy(), pred.numpy())}


# ---- the experiment -----------------------------------------------------------------------------

INVARIANCE_TOL = 1e-4
"""Largest change (in accuracy, float32) the monomial model's prediction may show on a moved network."""


def run_zoo(activation: str, config: Config, seed: int) -> dict[str, Any]:
    """Generate one zoo, train both models on its training split, evaluate on its test split as is
    and moved by random function-preserving elements."""
    t0 = time.perf_counter()
    zoo = make_zoo(activation, config, seed)
    zoo_s = time.perf_counter() - t0
    spec = zoo_spec(activation, config.hidden)
    n_train = int(config.networks * config.train_fraction)
    train_w, test_w = zoo.split(n_train)
    y_train, y_test = zoo.test_accuracy[:n_train], zoo.test_accuracy[n_train:]
    moved_w = move_networks(spec, test_w, seed, config.log10_scale)
    x_test = load_dataset("digits", seed).x_test.flatten(1)
    with torch.no_grad():
        before, after = mlp_forward(test_w, x_test, activation), mlp_forward(moved_w, x_test, activation)
    out: dict[str, Any] = {
        "symmetry": spec.symmetry("h1"),
        "moved_by": "hidden permutations and signs" if spec.symmetry("h1") == "sign"
        else f"hidden permutations and scalings in [1e-{config.log10_scale:g}, 1e{config.log10_scale:g}]",
        "n_train": n_train,
        "n_test": config.networks - n_train,
        "zoo_time_s": zoo_s,
        "target_range": [float(zoo.test_accuracy.min()), float(zoo.test_accuracy.max())],
        "target_std": float(zoo.test_accuracy.std()),
        "moved_logit_change": float((after - before).abs().max() / before.abs().max()),
        "models": {},
    }
    for name, model_spec in (("monomial", spec), ("permutation", spec.space)):
        t0 = time.perf_counter()
        model, mean, std = train_predictor(model_spec, train_w, y_train, config, seed)
        train_s = time.perf_counter() - t0
        pred = model.predict(test_w) * std + mean
        pred_moved = model.predict(moved_w) * std + mean
        out["models"][name] = {
            "parameters": sum(p.numel() for p in model.parameters()),
            "used_parameters": used_parameters(model, [w[: config.model_batch] for w in train_w]),
            "train_time_s": train_s,
            "test": _scores(y_test, pred),
            "moved": _scores(y_test, pred_moved),
            "max_prediction_change": float((pred_moved - pred).abs().max()),
        }
    change = out["models"]["monomial"]["max_prediction_change"]
    if not change < INVARIANCE_TOL:
        raise AssertionError(f"{activation} zoo: the monomial model's prediction changed by {change:.3g} when moved")
    return out


def run(config: Config, seed: int) -> dict[str, Any]:
    """Both zoos, both models: the results dict written to prediction.json."""
    return {
        "target": TARGET,
        "seed": seed,
        "config": dataclasses.asdict(config),
        "zoos": {activation: run_zoo(activation, config, seed) for activation in ACTIVATIONS},
    }


def markdown(results: dict[str, Any]) -> str:
    """The results as a short report with one table."""
    r, c = results["run"], results["config"]
    lines = [
        "# Predicting test accuracy from weights: monomial vs permutation-only invariance",
        "",
        f"`{r['command']}` (seed {results['seed']}), {r['wall_time_s']:.0f} s on {r['machine']}, "
        f"{r['threads']} thread(s), torch {r['torch']}, {r['date']}.",
        "",
        f"Zoos of 64-h-h-10 MLPs on digits (h = {c['hidden']}), {c['networks']} per activation, trained with Adam "
        f"for log-uniform steps in [1, {c['max_steps']}], learning rates in [{c['lr_range'][0]:g}, "
        f"{c['lr_range'][1]:g}] and init scales in [{c['init_scale_range'][0]:g}, {c['init_scale_range'][1]:g}]; "
        f"the first {c['train_fraction']:.0%} train the models, the rest test them. Models: NFN(1, {c['channels']}, "
        f"{c['channels']}, 2 layers) -> InvariantPool -> MLP head, trained {c['epochs']} epochs with the same seed. "
        "*Moved*: every test network moved by a random function-preserving element of its monomial group "
        "(its accuracy is unchanged). *Used*: parameters with a nonzero gradient.",
        "",
        "| zoo | model | params (used) | R² | Kendall τ | R² moved | τ moved | max Δ prediction |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for activation, zoo in results["zoos"].items():
        for name, m in zoo["models"].items():
            lines.append(
                f"| {activation} ({zoo['symmetry']}) | {name} | {m['parameters']:,} ({m['used_parameters']:,}) | "
                f"{m['test']['r2']:.3f} | {m['test']['kendall_tau']:.3f} | {m['moved']['r2']:.3f} | "
                f"{m['moved']['kendall_tau']:.3f} | {m['max_prediction_change']:.2g} |"
            )
    lines += [
        "",
        "| zoo | moved by | train / test networks | test accuracy range | max relative logit change when moved |",
        "|---|---|---|---|---|",
    ]
    for activation, zoo in results["zoos"].items():
        lo, hi = zoo["target_range"]
        lines.append(
            f"| {activation} | {zoo['moved_by']} | {zoo['n_train']} / {zoo['n_test']} | {lo:.3f} – {hi:.3f} | "
            f"{zoo['moved_logit_change']:.1e} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run as the command line asks, write prediction.json and prediction.md, print the table."""
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(
        prog="python -m benchmarks.weight_space_prediction", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--quick", action="store_true", help=f"{QUICK.networks} networks per zoo, {QUICK.epochs} epochs")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (the tensors are tiny)")
    ap.add_argument("--out", type=Path, help=f"output folder (default {RESULTS}, or its quick/ with --quick)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    results = run(QUICK if args.quick else FULL, args.seed)
    results["run"] = {
        "command": shlex.join(["python", "-m", "benchmarks.weight_space_prediction", *argv]),
        "quick": args.quick,
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "wall_time_s": time.perf_counter() - start,
    }
    results = json_ready(results)
    out = args.out or (RESULTS / "quick" if args.quick else RESULTS)
    out.mkdir(parents=True, exist_ok=True)
    (out / "prediction.json").write_text(json.dumps(results, indent=2) + "\n")
    table = markdown(results)
    (out / "prediction.md").write_text(table)
    print(table)
    return results


if __name__ == "__main__":
    main()
