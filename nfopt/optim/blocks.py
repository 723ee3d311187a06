"""Blocked tensors (an LSTM's gates stacked in one weight) read by the rule as their blocks.

A tensor whose first axis holds ``b`` blocks of one neuron set (:class:`TensorSpec` ``blocks``)
is, to an NF-layer, ``b`` tensors of that set: the blocks are viewed (not copied) as tensors of
their own, with their statistics, and the rule's results are joined back. A blocked tensor keeps
one step count per block (``step`` of shape ``(b,)``), since a block whose gradient is not finite
is held alone, as a tensor would be.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypeVar

import torch

from ..weight_space import MonomialSpec, WeightSpaceSpec

T = TypeVar("T")


def block_views(x: torch.Tensor, blocks: int, axis: int = 0) -> tuple[torch.Tensor, ...]:
    """``x``'s ``blocks`` equal blocks along ``axis``, as views."""
    return x.unflatten(axis, (blocks, -1)).unbind(axis)


def block_state(state: dict[str, torch.Tensor], blocks: int) -> list[dict[str, torch.Tensor]]:
    """The statistics of each block of a blocked tensor, as views of ``state``'s."""
    step = state["step"]
    steps = step.unbind(0) if step.dim() else (step,) * blocks
    momenta, v = block_views(state["momenta"], blocks, 1), block_views(state["v"], blocks)
    return [{"step": s, "momenta": m, "v": w} for s, m, w in zip(steps, momenta, v)]


@dataclass(frozen=True)
class Blocks:
    """How a weight space's tensors map to the tensors the rule reads: ``counts[i]`` blocks of
    tensor i, in order."""

    counts: tuple[int, ...]

    @classmethod
    def of(cls, spec: WeightSpaceSpec | MonomialSpec) -> Blocks | None:
        """The map for a space with blocked tensors, None for one without."""
        space = spec.space if isinstance(spec, MonomialSpec) else spec
        return None if all(b == 1 for b in space.blocks) else cls(space.blocks)

    def count_per_block_(self, states: Sequence[dict[str, torch.Tensor]]) -> None:
        """Give each blocked tensor's state one step count per block (a fresh state has one)."""
        for state, b in zip(states, self.counts):
            if b > 1 and state["step"].dim() == 0:
                state["step"] = state["step"].expand(b).clone()

    def repeat(self, values: Sequence[T]) -> list[T]:
        """One value per tensor as one per block."""
        return [v for v, b in zip(values, self.counts) for _ in range(b)]

    def split(self, tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Tensors as their blocks (views)."""
        return [part for x, b in zip(tensors, self.counts) for part in (block_views(x, b) if b > 1 else (x,))]

    def split_states(self, states: Sequence[dict[str, torch.Tensor]]) -> list[dict[str, torch.Tensor]]:
        return [part for s, b in zip(states, self.counts) for part in (block_state(s, b) if b > 1 else (s,))]

    def groups(self, items: Sequence[T]) -> list[list[T]]:
        """Per-block items gathered per tensor."""
        out, start = [], 0
        for b in self.counts:
            out.append(list(items[start : start + b]))
            start += b
        return out

    def join(self, parts: Sequence[torch.Tensor], axis: int = 0) -> list[torch.Tensor]:
        """Per-block results as one per tensor (new tensors where a tensor is blocked)."""
        return [group[0] if len(group) == 1 else torch.cat(group, axis) for group in self.groups(parts)]

    def join_states(self, parts: Sequence[dict[str, torch.Tensor]]) -> list[dict[str, torch.Tensor]]:
        out = []
        for group in self.groups(parts):
            if len(group) == 1:
                out.append(group[0])
                continue
            out.append({
                "step": torch.stack([s["step"] for s in group]),
                "momenta": torch.cat([s["momenta"] for s in group], 1),
                "v": torch.cat([s["v"] for s in group], 0),
            })
        return out

    def join_flags(self, flags: torch.Tensor) -> torch.Tensor:
        """Per-block flags (N_blocks,) as per-tensor ones: a tensor is finite when all its blocks are."""
        if len(flags) == len(self.counts):
            return flags
        index = torch.repeat_interleave(torch.arange(len(self.counts), device=flags.device),
                                        torch.tensor(self.counts, device=flags.device))
        return torch.ones(len(self.counts), dtype=flags.dtype, device=flags.device).scatter_reduce(
            0, index, flags, "amin"
        )
