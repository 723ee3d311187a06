"""Process groups for meta-training over several processes (``torchrun``).

Every rank trains its own tasks; what ranks exchange is one flat tensor per meta-step (summed
meta-gradients and statistics) and, at checkpoints, each rank's in-flight inner runs. With one
process (no ``WORLD_SIZE`` above 1 in the environment) nothing is initialised and every
collective is the identity, so the single-process path has no distributed overhead.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Group:
    """This process's place among the meta-training processes."""

    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        """Rank 0 writes logs and checkpoints."""
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum ``tensor`` over ranks in place; every rank gets the same result."""
        if self.active:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def gather_to_main(self, obj: Any) -> list[Any] | None:
        """Every rank's ``obj`` (picklable, CPU tensors) as a list on rank 0; ``None`` elsewhere."""
        if not self.active:
            return [obj]
        out = [None] * self.world_size if self.is_main else None
        dist.gather_object(obj, out, dst=0)
        return out


def init_from_env(device: str) -> tuple[Group, torch.device]:
    """Join the process group that ``torchrun`` describes in the environment, if it has more than one rank.

    gloo serves CPU training and nccl CUDA training (each rank on the GPU of its ``LOCAL_RANK``).
    Returns the group and the device this rank computes on.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if device == "cuda":
        local = int(os.environ.get("LOCAL_RANK", "0")) if world_size > 1 else torch.cuda.current_device()
        torch.cuda.set_device(local)
        torch_device = torch.device("cuda", local)
    else:
        torch_device = torch.device(device)
    if world_size <= 1:
        return Group(), torch_device
    if not dist.is_initialized():
        kwargs = {"device_id": torch_device} if torch_device.type == "cuda" else {}
        dist.init_process_group("nccl" if torch_device.type == "cuda" else "gloo", **kwargs)
    return Group(dist.get_rank(), dist.get_world_size()), torch_device


def shutdown(group: Group) -> None:
    """Leave the process group (after the last collective)."""
    if group.active and dist.is_initialized():
        dist.destroy_process_group()
