"""PES on a toy unroll whose full gradient is known: its estimate matches the full-unroll gradient
in expectation, and truncated backpropagation's does not."""

from __future__ import annotations

import pytest
import torch

from meta_train.pes import PES

CURVATURES = torch.tensor([1.0, 0.3, 0.05], dtype=torch.float64)
X0 = torch.tensor([1.0, -2.0, 3.0], dtype=torch.float64)
TRUNCATIONS, LENGTH = 6, 5
THETA = torch.tensor([0.4, 0.05], dtype=torch.float64)  # learning rate, weight decay of the inner steps


def truncation(theta: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``LENGTH`` inner steps x <- x - θ0·∇f(x) - θ1·x on f(x) = Σ c x²/2; the mean loss after each."""
    losses = []
    for _ in range(LENGTH):
        x = x - theta[0] * CURVATURES * x - theta[1] * x
        losses.append(0.5 * (CURVATURES * x * x).sum())
    return torch.stack(losses).mean(), x


def full_gradient() -> torch.Tensor:
    """d/dθ of the sum of every truncation's loss, backpropagated through the whole unroll."""
    theta, x, total = THETA.clone().requires_grad_(), X0, 0.0
    for _ in range(TRUNCATIONS):
        loss, x = truncation(theta, x)
        total = total + loss
    return torch.autograd.grad(total, theta)[0]


def truncated_gradient() -> torch.Tensor:
    """The same with the state detached between truncations, as truncated backpropagation has it."""
    theta, x, grad = THETA.clone().requires_grad_(), X0, torch.zeros(2, dtype=torch.float64)
    for _ in range(TRUNCATIONS):
        loss, x = truncation(theta, x.detach())
        grad += torch.autograd.grad(loss, theta)[0]
    return grad


def pes_estimates(particles: int, sigma: float) -> torch.Tensor:
    """Per particle, the sum over truncations of PES's estimate, each from its own antithetic pair
    carried across truncations."""
    pes = PES(2, sigma, particles, seed=0)
    plus = minus = X0.expand(particles, 3)
    total = torch.zeros(particles, 2, dtype=torch.float64)
    with torch.no_grad():
        for k in range(TRUNCATIONS):
            for i in range(particles):
                eps = pes.perturbation(k, i)
                pes.accumulate(i, eps)
                lp, xp = truncation(THETA + eps, plus[i])
                lm, xm = truncation(THETA - eps, minus[i])
                total[i] += pes.estimate(i, lp, lm)
                plus, minus = plus.clone(), minus.clone()
                plus[i], minus[i] = xp, xm
    return total


def test_pes_is_unbiased_for_the_full_unroll_and_truncated_backprop_is_not() -> None:
    full, truncated = full_gradient(), truncated_gradient()
    estimates = pes_estimates(particles=800, sigma=1e-3)
    mean, stderr = estimates.mean(0), estimates.std(0) / estimates.shape[0] ** 0.5
    assert ((mean - full).abs() < 4 * stderr).all(), (mean, full, stderr)
    # the bias of truncated backprop is far outside PES's error bars: the check can tell them apart
    assert ((truncated - full).abs() > 10 * stderr).any(), (truncated, full, stderr)


def test_restarting_a_slot_forgets_its_perturbations() -> None:
    """Without the accumulated sum (ξ = this truncation's ε only), PES is as biased as truncated
    backprop would be; with a restart, a slot starts from nothing."""
    pes = PES(2, 0.1, 2, seed=1)
    for k in range(3):
        pes.accumulate(0, pes.perturbation(k, 0))
    assert pes.xi[0].abs().sum() > 0 and pes.xi[1].abs().sum() == 0
    pes.restart(0)
    assert pes.xi.abs().sum() == 0
    assert not torch.equal(pes.perturbation(0, 0), pes.perturbation(0, 1))
    assert torch.equal(pes.perturbation(2, 1), PES(2, 0.1, 2, seed=1).perturbation(2, 1))


def test_state_round_trips_and_bad_input_is_refused() -> None:
    pes = PES(3, 0.01, 2, seed=2)
    pes.accumulate(1, pes.perturbation(0, 1))
    again = PES(3, 0.01, 2, seed=2)
    again.load_state_dict(pes.state_dict())
    assert torch.equal(again.xi, pes.xi)
    with pytest.raises(ValueError, match="sigma must be positive"):
        PES(3, 0.0, 2, seed=0)
    with pytest.raises(ValueError, match=r"expected \(3, 3\)"):
        PES(3, 0.01, 3, seed=0).load_state_dict(pes.state_dict())
