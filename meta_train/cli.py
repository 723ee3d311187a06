"""Command line of meta-training: configs, overrides, resume, progress, checkpoints, the final rule.

    python -m meta_train --config meta_train/configs/default.json --out my.nfopt --log-dir runs/a
    python -m meta_train --config meta_train/configs/default.json --out my.nfopt --resume
    torchrun --nproc_per_node=2 -m meta_train --config meta_train/configs/default.json

``--set key=value`` overrides a config field (typed by the field). Training checkpoints go to
``<out>.train.pt`` (or the config's ``checkpoint``) every ``checkpoint_every`` meta-steps and at
the end; ``--resume`` continues from there with the same config (only where it writes, how often
and ``meta_steps`` may change) and ends with the same rule as a run that was never stopped. The
final rule is written to ``out`` in the format ``NFNOptimizer(ckpt=...)`` loads.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from nfopt.io import save_rule

from . import checkpointing
from .distributed import init_from_env, shutdown
from .monitor import Monitor
from .trainer import MetaConfig, MetaTrainer


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="python -m meta_train", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--config", type=Path, help="JSON file of MetaConfig fields (default: the dataclass defaults)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="override one config field (rule.<field> for the rule's); repeatable")
    ap.add_argument("--resume", action="store_true", help="continue from the training checkpoint")
    ap.add_argument("--device", choices=("cpu", "cuda"), help="override the config's device")
    ap.add_argument("--out", help="where the meta-trained rule is written (overrides the config)")
    ap.add_argument("--log-dir", help="TensorBoard directory (overrides the config)")
    return ap.parse_args(argv)


def build_config(args: argparse.Namespace) -> MetaConfig:
    """The config file (or defaults) with ``--set`` and the dedicated flags applied, in that order."""
    config = MetaConfig.from_dict(json.loads(args.config.read_text())) if args.config else MetaConfig()
    flags = [f"{key}={value}" for key, value in (("device", args.device), ("out", args.out), ("log_dir", args.log_dir))
             if value is not None]
    return config.with_overrides([*args.overrides, *flags])


def task_distribution(config: MetaConfig) -> str:
    """The call that drew the run's tasks, as recorded in its provenance (v1 as it always was)."""
    if config.distribution == "v1":
        return "meta_train.tasks.sample_task_config(split='train')"
    return f"meta_train.tasks.sample_task_config(split='train', distribution={config.distribution!r})"


def git_commit() -> str | None:
    """The commit of the checkout this package runs from, if it is a git checkout."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                             text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def run(config: MetaConfig, resume: bool = False, command: str = "") -> dict[str, Any] | None:
    """Meta-train as ``config`` says, on every rank of the process group in the environment.

    Returns the provenance written with the rule on rank 0, ``None`` on other ranks. Its commit
    is the checkout's when the run starts (a commit made while it runs is not the code it ran).
    """
    commit = git_commit()
    group, device = init_from_env(config.device)
    try:
        torch.set_num_threads(config.threads)
        trainer = MetaTrainer(config, group, device)
        wall_before = 0.0
        path = Path(config.checkpoint_path)
        if resume:
            if not path.exists():
                raise FileNotFoundError(f"--resume: no training checkpoint at {path}")
            state = checkpointing.load(path)
            trainer.load_state_dict(state)
            wall_before = state["wall_time"]
        start = time.perf_counter()

        def save_training_checkpoint() -> None:
            state = trainer.state_dict()
            if state is not None:
                checkpointing.save_atomic({**state, "wall_time": wall_before + time.perf_counter() - start}, path)

        with Monitor(config.meta_steps, trainer.step, config.log_dir, config.log_every, group.is_main) as monitor:
            while trainer.step < config.meta_steps:
                stats = trainer.meta_step()
                monitor.update(trainer.step, stats)
                if trainer.step % config.checkpoint_every == 0 or trainer.step == config.meta_steps:
                    save_training_checkpoint()
        wall = wall_before + time.perf_counter() - start
        if not group.is_main:
            return None
        provenance = {
            "meta_trained": True,
            "config": config.to_dict(),
            "meta_steps": trainer.step,
            "seed": config.seed,
            "world_size": group.world_size,
            "task_distribution": task_distribution(config),
            **trainer.counters,
            "inner_steps_per_s": trainer.counters["inner_steps"] / wall if wall > 0 else None,
            "wall_time_s": wall,
            "command": command,
            "git_commit": commit,
        }
        save_rule(trainer.rule, config.out, provenance=provenance)
        return provenance
    finally:
        shutdown(group)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    config = build_config(args)
    provenance = run(config, args.resume, shlex.join(["python", "-m", "meta_train", *argv]))
    if provenance is not None:
        print(f"wrote {config.out}: {provenance['meta_steps']} meta-steps, {provenance['inner_steps_per_s']:.1f} "
              f"inner steps/s, {provenance['wall_time_s']:.0f} s", file=sys.stderr)
