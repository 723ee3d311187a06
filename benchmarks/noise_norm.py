"""Parameter norms under pure-noise gradients: a learned optimizer against Adam at its rate α.

    python -m benchmarks.noise_norm                        # the shipped default
    python -m benchmarks.noise_norm --ckpt benchmarks/checkpoints/broad.nfopt

A small ReLU MLP (10-32-32-4) takes ``--steps`` steps whose gradients are N(0, 1) elementwise, a
fresh draw every step and the same draws for every optimizer; nothing can be learned, so a
well-behaved optimizer's norm grows like Adam's random walk. The report is the norm before and
after, for Adam at the rule's α and for the rule bare and with ``for_model``, and how far the
parameters moved at a few steps on the way (where an optimizer takes large steps early).
The test suite asserts the property on the shipped default (``tests/optim/test_optimizer_generic.py``).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence

import torch
from torch import nn

from nfopt import NFNOptimizer

CHECKPOINTS = (1, 3, 10, 30, 100, 300, 1000)
"""Steps at which the displacement from the initial parameters is reported."""


def noise_model() -> nn.Module:
    """The MLP the noise steps act on, from a fixed seed."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4))


def norm_under_noise(
    make: Callable[[nn.Module], torch.optim.Optimizer], steps: int = 1000
) -> tuple[float, float, dict[int, float]]:
    """The parameter norm before and after ``steps`` pure-noise steps of the optimizer ``make``
    builds for :func:`noise_model`, and the displacement ‖θ_t - θ_0‖ at the :data:`CHECKPOINTS`
    steps up to ``steps``."""
    model = noise_model()
    opt = make(model)
    g = torch.Generator().manual_seed(1)
    flat = lambda: torch.cat([p.detach().flatten() for p in model.parameters()])  # noqa: E731
    start = flat().clone()
    moved = {}
    for t in range(1, steps + 1):
        for p in model.parameters():
            p.grad = torch.randn(p.shape, generator=g)
        opt.step()
        if t in CHECKPOINTS:
            moved[t] = float((flat() - start).norm())
    return float(start.norm()), float(flat().norm()), moved


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.noise_norm", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", default=None, help="NFN checkpoint (default: the one shipped in nfopt)")
    parser.add_argument("--steps", type=int, default=1000, help="noise steps")
    args = parser.parse_args(argv)
    kwargs = {} if args.ckpt is None else {"ckpt": args.ckpt}
    alpha = float(NFNOptimizer(noise_model().parameters(), **kwargs).rule.scalars()[0])
    rows = {
        f"Adam (lr = α = {alpha:.3g})": lambda m: torch.optim.Adam(m.parameters(), lr=alpha),
        "NFN bare": lambda m: NFNOptimizer(m.parameters(), **kwargs),
        "NFN for_model": lambda m: NFNOptimizer.for_model(m, **kwargs),
    }
    shown = [t for t in CHECKPOINTS if t <= args.steps]
    print(f"| optimizer | norm before → after {args.steps} steps | " + " | ".join(f"moved by step {t}" for t in shown) + " |")
    print("|---|---|" + "---|" * len(shown))
    for name, make in rows.items():
        before, after, moved = norm_under_noise(make, args.steps)
        print(f"| {name} | {before:.3f} → {after:.3f} | " + " | ".join(f"{moved[t]:.3f}" for t in shown) + " |")


if __name__ == "__main__":
    main()
