"""Persistent evolution strategies (PES): an unbiased meta-gradient estimate from truncated unrolls.

Truncated backpropagation sees how the rule's weights θ change the loss within one truncation
only; what a step does to later truncations (through the carried parameters and statistics) is
cut off, which biases it towards greedy rules. PES (Vicol, Metz and Sohl-Dickstein, 2021) unrolls
antithetic pairs of each task, one at θ + ε and one at θ - ε with a fresh Gaussian ε (std σ)
every truncation, and keeps, per task, the sum ξ of every ε it was unrolled with since the task
began. The estimate of truncation k,

    ĝ = ξ_k · (L⁺_k - L⁻_k) / (2σ²),     ξ_k = ε_1 + ... + ε_k,

is unbiased for the gradient of the whole unroll's loss (the Gaussian-smoothed one), whatever the
truncation length: the accumulated ξ credits each truncation's loss to the perturbations of every
earlier truncation that led to it. It needs no backward pass through the rule, only two forward
unrolls per task.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch


class PES:
    """The perturbations and accumulated sums of ``slots`` antithetic pairs over ``n`` parameters.

    ``perturbation(step, slot)`` is a pure function of (seed, step, slot), so that a resumed run
    continues exactly. Slots are perturbed independently, so that their estimates average to a
    better one (with one shared ε, every slot's estimate would lie along that one direction).
    """

    def __init__(self, n: int, sigma: float, slots: int, seed: int, device: torch.device | str = "cpu") -> None:
        if sigma <= 0:
            raise ValueError(f"the PES perturbation scale sigma must be positive, got {sigma}")
        self.n, self.sigma, self.seed = n, sigma, seed
        self.device = torch.device(device)
        self.xi = torch.zeros(slots, n, dtype=torch.float64, device=self.device)

    def perturbation(self, step: int, slot: int) -> torch.Tensor:
        """ε of global slot ``slot`` at meta-step ``step``: (n,) float64, entries N(0, σ²)."""
        seed = int(np.random.SeedSequence([self.seed, 0x9E5, step, slot]).generate_state(1)[0])
        g = torch.Generator().manual_seed(seed)
        return (torch.randn(self.n, generator=g, dtype=torch.float64) * self.sigma).to(self.device)

    def restart(self, slot: int) -> None:
        """A new task begins in ``slot``: nothing before it led to its losses."""
        self.xi[slot].zero_()

    def accumulate(self, slot: int, eps: torch.Tensor) -> None:
        """Slot ``slot`` is about to be unrolled at θ ± ``eps``."""
        self.xi[slot] += eps

    def estimate(self, slot: int, loss_plus: torch.Tensor | float, loss_minus: torch.Tensor | float) -> torch.Tensor:
        """The slot's gradient estimate (n,) from its pair's losses after :meth:`accumulate`."""
        return self.xi[slot] * (float(loss_plus) - float(loss_minus)) / (2 * self.sigma**2)

    def state_dict(self) -> dict[str, Any]:
        return {"xi": self.xi.cpu(), "sigma": self.sigma, "seed": self.seed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["xi"].shape != self.xi.shape:
            raise ValueError(f"PES state for {tuple(state['xi'].shape)} (slots, parameters), expected {tuple(self.xi.shape)}")
        self.xi = state["xi"].to(device=self.device, dtype=torch.float64)
        self.sigma, self.seed = state["sigma"], state["seed"]
