"""NFNOptimizer inside ``higher.innerloop_ctx``: same trajectory, meta-gradients that flow."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from nfopt.optim.optimizer import NFNOptimizer

from ..rules import open_rule

higher = pytest.importorskip("higher")
pytest.importorskip("nfopt.optim.higher")  # registers the differentiable NFNOptimizer


def setup(seed: int = 0) -> tuple[nn.Module, NFNOptimizer, list[tuple[torch.Tensor, torch.Tensor]]]:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3))
    opt = NFNOptimizer.for_model(model, rule=open_rule(std=0.1), weight_decay=0.01)
    batches = [(torch.randn(16, 5), torch.randn(16, 3)) for _ in range(4)]
    return model, opt, batches


def loss_fn(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return (out - y).square().mean()


def test_differentiable_trajectory_equals_nfn_optimizer():
    model, opt, batches = setup()
    twin = copy.deepcopy(model)
    initial = [p.detach().clone() for p in model.parameters()]
    twin_opt = NFNOptimizer.for_model(twin, rule=opt.rule, weight_decay=0.01)
    with higher.innerloop_ctx(twin, twin_opt) as (fmodel, diffopt):
        assert type(diffopt).__name__ == "DifferentiableNFNOptimizer"
        for x, y in batches:
            diffopt.step(loss_fn(fmodel(x), y))
        fast = [p.detach() for p in fmodel.parameters()]
    for x, y in batches:
        opt.zero_grad()
        loss_fn(model(x), y).backward()
        opt.step()
    for p, q, p0 in zip(model.parameters(), fast, initial):
        torch.testing.assert_close(q, p, rtol=1e-6, atol=1e-7)
        assert not torch.equal(p, p0)


def test_meta_gradients_reach_initial_weights_lr_and_the_rule():
    model, opt, batches = setup()
    opt.rule.requires_grad_(True)
    lr = torch.tensor(opt.param_groups[0]["lr"], requires_grad=True)
    with higher.innerloop_ctx(model, opt, copy_initial_weights=False, override={"lr": [lr]}) as (fmodel, diffopt):
        for x, y in batches[:3]:
            diffopt.step(loss_fn(fmodel(x), y))
        loss_fn(fmodel(batches[3][0]), batches[3][1]).backward()
    for name, t in [*model.named_parameters(), ("lr", lr), *(("rule." + n, w) for n, w in opt.rule.named_parameters())]:
        if name == "rule.log_alpha":  # lr is the learning rate: α only set its default
            assert t.grad is not None and t.grad.abs() < 1e-6 * (lr.grad * lr).abs()  # rounding only
            continue
        assert t.grad is not None and torch.isfinite(t.grad).all() and t.grad.abs().sum() > 0, name
