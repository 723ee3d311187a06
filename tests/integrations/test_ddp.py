"""NFNOptimizer under DistributedDataParallel: two processes on gloo (CPU), each on its own shard
of the data, step with the learned optimizer and stay identical, because DDP all-reduces the
gradients and the step is a deterministic function of parameters, gradients and state. Both the
bare optimizer and ``for_model`` (which reads through the DDP wrapper) are run."""

from __future__ import annotations

import datetime
import os
from typing import Any

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from nfopt import NFNOptimizer

from ..spawn import run_ranks

WORLD_SIZE = 2
STEPS = 6
BATCH = 16
"""Per rank; one process holding the whole data takes batches of WORLD_SIZE * BATCH."""


def make_model() -> nn.Module:
    """The same seeded MLP in every process (tanh and ReLU neurons, so that for_model's labelling
    has sign-flip symmetries as well as couplings)."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 2))


def dataset() -> TensorDataset:
    """STEPS batches for every rank of a fixed nonlinear regression task."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(STEPS * BATCH * WORLD_SIZE, 6, generator=g)
    return TensorDataset(x, torch.stack([torch.tanh(x[:, :3].sum(1)), x[:, 3] * x[:, 4]], 1))


def make_optimizer(model: nn.Module, structured: bool) -> NFNOptimizer:
    """The optimizer under test: ``for_model`` (labelled through any wrapper) or bare parameters."""
    return NFNOptimizer.for_model(model) if structured else NFNOptimizer(model.parameters())


def train(model: nn.Module, opt: NFNOptimizer, loader: DataLoader) -> list[float]:
    """One pass over ``loader``, a step per batch; the losses, in order."""
    losses = []
    for x, y in loader:
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def worker(rank: int, port: int, out_dir: str, structured: bool) -> None:
    """One rank: DDP over the seeded model, its own shard (DistributedSampler, no shuffling), STEPS
    steps; writes its initial and final parameters and its local losses to ``rank{rank}.pt``."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    # a bounded wait: a rank that died leaves the other failing, not hanging the suite
    dist.init_process_group("gloo", rank=rank, world_size=WORLD_SIZE, timeout=datetime.timedelta(seconds=60))
    try:
        model = make_model()
        initial = {k: v.clone() for k, v in model.state_dict().items()}
        ddp = nn.parallel.DistributedDataParallel(model)
        opt = make_optimizer(ddp, structured)
        data = dataset()
        sampler = DistributedSampler(data, num_replicas=WORLD_SIZE, rank=rank, shuffle=False)
        losses = train(ddp, opt, DataLoader(data, batch_size=BATCH, sampler=sampler, num_workers=0))
        torch.save(
            {"initial": initial, "final": model.state_dict(), "losses": losses},
            os.path.join(out_dir, f"rank{rank}.pt"),
        )
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module", params=[False, True], ids=["bare", "for_model"])
def ranks(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Both ranks' results of one two-process DDP run (one run per optimizer kind, shared by the
    tests below), and whether the optimizer was ``for_model``'s."""
    out = tmp_path_factory.mktemp("ddp")
    run_ranks(worker, (str(out), request.param), WORLD_SIZE)
    results = [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(WORLD_SIZE)]
    return {"structured": request.param, "results": results}


def test_ddp_ranks_end_with_identical_parameters(ranks: dict[str, Any]) -> None:
    """After STEPS steps on different shards, every parameter is bitwise the same on both ranks
    (the shards did differ: the ranks' local losses differ at every step)."""
    r0, r1 = ranks["results"]
    assert len(r0["losses"]) == len(r1["losses"]) == STEPS
    assert all(a != b for a, b in zip(r0["losses"], r1["losses"]))
    assert r0["final"].keys() == r1["final"].keys()
    for k, v in r0["final"].items():
        assert torch.equal(v, r1["final"][k]), k


def test_ddp_training_moves_every_parameter(ranks: dict[str, Any]) -> None:
    """The steps changed every parameter tensor from its initial value (the ranks agree because
    they trained, not because nothing happened), and the ranks started identical."""
    r0, r1 = ranks["results"]
    for k, v in r0["initial"].items():
        assert torch.equal(v, r1["initial"][k]), k
        assert not torch.equal(v, r0["final"][k]), k


def test_ddp_matches_one_process_on_the_whole_batch(ranks: dict[str, Any]) -> None:
    """DDP with equal shards averages the ranks' gradients, which is the gradient of the mean loss
    over both shards: one process stepping on the union of the ranks' batches (the same samples,
    as DistributedSampler without shuffling deals them) ends at the same parameters, to
    rounding (the all-reduce sums in another order; seen: 3e-8, against 2e-2 for rank 0's shard
    alone)."""
    model = make_model()
    opt = make_optimizer(model, ranks["structured"])
    train(model, opt, DataLoader(dataset(), batch_size=WORLD_SIZE * BATCH, shuffle=False))
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, ranks["results"][0]["final"][k], rtol=1e-5, atol=1e-6, msg=k)
