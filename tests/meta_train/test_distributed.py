"""Meta-training over two processes (gloo on CPU): different tasks per rank, identical rules, and
the same result as one process holding both ranks' task slots."""

from __future__ import annotations

import dataclasses
import os

import torch

from meta_train.distributed import init_from_env, shutdown
from meta_train.trainer import MetaConfig, MetaTrainer

from ..spawn import run_ranks


CONFIG = MetaConfig(tasks_per_step=2, unroll_length=2, horizon_min=4, horizon_max=4, first_order=True)
STEPS = 4


def worker(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE="2")
    torch.set_num_threads(1)
    group, device = init_from_env("cpu")
    trainer = MetaTrainer(CONFIG, group, device)
    for _ in range(STEPS):
        trainer.meta_step()
    state = trainer.state_dict()  # a collective: gathers every rank's runs on rank 0
    torch.save({"rule": trainer.rule.state_dict(), "state": state, "counters": trainer.counters},
               os.path.join(out_dir, f"rank{rank}.pt"))
    shutdown(group)


def run_single(config: MetaConfig) -> MetaTrainer:
    trainer = MetaTrainer(config)
    for _ in range(STEPS):
        trainer.meta_step()
    return trainer


def test_two_ranks_train_different_tasks_into_one_identical_rule(tmp_path):
    run_ranks(worker, (str(tmp_path),), 2)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    for k, v in r0["rule"].items():
        assert torch.equal(v, r1["rule"][k]), k
    assert r0["counters"] == r1["counters"] and r0["counters"]["inner_steps"] == 2 * STEPS * 2
    ranks = r0["state"]["ranks"]
    assert r1["state"] is None and len(ranks) == 2
    assert ranks[0]["runs"][0]["task"] != ranks[1]["runs"][0]["task"]

    # One process holding both slots draws the same tasks and takes the same average (to
    # rounding: it unrolls the two tasks together, in batched operations)...
    both = run_single(CONFIG)
    assert [r.task.config.to_dict() for r in both.runs] == [ranks[0]["runs"][0]["task"], ranks[1]["runs"][0]["task"]]
    for k, v in both.rule.state_dict().items():
        torch.testing.assert_close(v, r0["rule"][k], rtol=1e-5, atol=1e-6, msg=k)
    # ... and rank 1's tasks mattered: rank 0's slot alone gives another rule.
    alone = run_single(dataclasses.replace(CONFIG, tasks_per_step=1))
    assert any(not torch.equal(v, r0["rule"][k]) for k, v in alone.rule.state_dict().items())
