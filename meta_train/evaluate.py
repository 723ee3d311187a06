"""Compare meta-trained rules by held-out loss on tasks of the distribution's held-out split.

    python -m meta_train.evaluate --ckpt my.nfopt --tasks 8 --steps 300 --seed 1

Draws ``--tasks`` configs with ``sample_task_config(split="held_out")`` from ``--seed`` (tasks
meta-training never draws: it samples the train split only). Each task holds out its validation
split (``Task(holdout=True)``) and is trained from its seeded initialisation for ``--steps``
minibatches as a user would train it, by ``NFNOptimizer(model.parameters(), ckpt=...)`` (bare:
no labelling) and by Adam at lr 1e-3 on the same batches. Reported for each optimizer: the mean
over tasks of the final training loss (on the rows it trained on) and of the held-out loss (on
the validation rows), both in eval mode, and the means of their logs (scale-free across
regression and classification). The test split is left for the benchmarks. A run whose loss
turns non-finite stops and scores inf. ``--distribution v2`` draws the held-out split of the
broader task distribution instead (``v1`` by default).
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from nfopt.optim.optimizer import NFNOptimizer

from .tasks import DISTRIBUTIONS, Task, TaskConfig, sample_task_config
from .trainer import MetaConfig

ADAM_LR = 1e-3


def task_configs(n: int, seed: int, steps: int, distribution: str = "v1") -> list[TaskConfig]:
    """``n`` held-out-split task configs of ``distribution`` drawn from ``seed``, with horizon ``steps``."""
    rng = np.random.default_rng(seed)
    return [sample_task_config(rng, "held_out", (steps, steps), distribution=distribution) for _ in range(n)]


def train_and_score(config: TaskConfig, build: Callable[[nn.Module], torch.optim.Optimizer], steps: int) -> dict[str, float]:
    """Train ``config``'s task (validation split held out) for ``steps`` steps with ``build(module)``;
    return its final ``train_loss`` and held-out ``val_loss``."""
    task = Task(config, holdout=True)
    module = task.build_module(task.generator("init"))
    optimizer = build(module)
    data = task.generator("data")
    for _ in range(steps):
        x, y = task.sample_batch(data)
        optimizer.zero_grad(set_to_none=True)
        loss = task.criterion(module(x), y)
        if not torch.isfinite(loss):
            return {"train_loss": math.inf, "val_loss": math.inf}
        loss.backward()
        optimizer.step()
    params, buffers = dict(module.named_parameters()), dict(module.named_buffers())
    with torch.no_grad():
        scores = {"train_loss": task.full_train_loss(params, buffers).item(),
                  "val_loss": task.full_val_loss(params, buffers).item()}
    return {k: v if math.isfinite(v) else math.inf for k, v in scores.items()}


LOG_EPS = MetaConfig.loss_eps
"""Added to every loss inside the log means (as in the meta-loss), so that a loss of exactly 0
scores log(eps), not -inf."""


def evaluate(
    ckpt: str | None, tasks: int, steps: int, seed: int, distribution: str = "v1"
) -> dict[str, dict[str, float]]:
    """For ``"nfn"`` (the rule at ``ckpt``; the packaged default if ``None``) and ``"adam"``: the
    mean ``train_loss`` and ``val_loss`` over the tasks, and ``log_train_loss``, ``log_val_loss``
    (means of log(loss + :data:`LOG_EPS`))."""
    optimizers: dict[str, Callable[[nn.Module], torch.optim.Optimizer]] = {
        "nfn": lambda m: NFNOptimizer(m.parameters(), ckpt=ckpt),
        "adam": lambda m: torch.optim.Adam(m.parameters(), lr=ADAM_LR),
    }
    configs = task_configs(tasks, seed, steps, distribution)
    out = {}
    for name, build in optimizers.items():
        runs = [train_and_score(config, build, steps) for config in configs]
        out[name] = {}
        for key in ("train_loss", "val_loss"):
            values = np.array([r[key] for r in runs])
            out[name][key] = float(values.mean())
            out[name][f"log_{key}"] = float(np.log(values + LOG_EPS).mean())
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m meta_train.evaluate", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ckpt", help="rule checkpoint (default: the packaged default rule)")
    ap.add_argument("--tasks", type=int, default=8, help="number of held-out-split tasks")
    ap.add_argument("--steps", type=int, default=300, help="training steps per task")
    ap.add_argument("--seed", type=int, default=1, help="seed of the task draws")
    ap.add_argument("--distribution", choices=DISTRIBUTIONS, default="v1",
                    help="the task distribution whose held-out split is drawn")
    ap.add_argument("--json", action="store_true", help="print the results as JSON")
    args = ap.parse_args(argv)
    if args.tasks < 1 or args.steps < 1:
        ap.error("--tasks and --steps must be >= 1")
    results = evaluate(args.ckpt, args.tasks, args.steps, args.seed, args.distribution)
    if args.json:
        print(json.dumps(results, indent=2))
        return
    print(f"{args.tasks} held-out-split tasks of {args.distribution} (seed {args.seed}), {args.steps} steps each")
    print(f"{'optimizer':<10} {'train loss':>11} {'held-out loss':>14} {'log train':>10} {'log held-out':>13}")
    for name, r in results.items():
        print(f"{name:<10} {r['train_loss']:>11.4g} {r['val_loss']:>14.4g} {r['log_train_loss']:>10.3f} "
              f"{r['log_val_loss']:>13.3f}")


if __name__ == "__main__":
    main()
