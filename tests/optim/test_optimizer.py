"""NFNOptimizer as a torch.optim.Optimizer: Adam at initialisation, groups, schedulers, state, bad input."""

from __future__ import annotations

import copy
import io
import warnings

import pytest
import torch
from torch import nn

from nfopt import NFNOptimizer
from nfopt.optim.rule import LearnedUpdate

from ..rules import fresh_rule, open_rule


def mlp(dtype=torch.float32, seed=0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3)).to(dtype)


def batch(i: int, dtype=torch.float32):
    g = torch.Generator().manual_seed(1000 + i)
    return torch.randn(16, 6, generator=g, dtype=dtype), torch.randint(0, 3, (16,), generator=g)


def train(model, opt, steps, start=0, scheduler=None):
    for i in range(start, start + steps):
        x, y = batch(i, next(model.parameters()).dtype)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        if scheduler:
            scheduler.step()


@pytest.mark.parametrize("lr_mult,weight_decay", [(1.0, 0.0), (0.5, 0.0), (1.0, 0.1)])
def test_fresh_rule_is_adam(lr_mult, weight_decay):
    a, b = mlp(), mlp()
    opt = NFNOptimizer(a.parameters(), rule=fresh_rule(), lr=lr_mult, weight_decay=weight_decay)
    ref = torch.optim.AdamW(b.parameters(), lr=1e-3 * lr_mult, weight_decay=weight_decay)
    train(a, opt, 50)
    train(b, ref, 50)
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.allclose(p, q, rtol=1e-5, atol=1e-6)
    assert max((p - q).abs().max().item() for p, q in zip(a.parameters(), mlp().parameters())) > 1e-3


def test_default_checkpoint_loads_and_trains():
    model = mlp()
    opt = NFNOptimizer(model.parameters())
    x, y = batch(0)
    losses = []
    for _ in range(30):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert isinstance(opt.rule.provenance, dict) and opt.rule.provenance


def test_param_groups_and_scheduler_scale_the_learned_step():
    a, b = mlp(), mlp()
    groups = lambda m: [  # noqa: E731
        {"params": m[0].parameters(), "lr": 0.5},
        {"params": list(m[2].parameters()) + list(m[4].parameters())},
    ]
    opt = NFNOptimizer(groups(a), rule=fresh_rule())
    ref = torch.optim.Adam([{**g, "lr": 1e-3 * g.get("lr", 1.0)} for g in groups(b)], lr=1e-3)
    train(a, opt, 20, scheduler=torch.optim.lr_scheduler.StepLR(opt, 5, gamma=0.5))
    train(b, ref, 20, scheduler=torch.optim.lr_scheduler.StepLR(ref, 5, gamma=0.5))
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.allclose(p, q, rtol=1e-5, atol=1e-6)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.5 * 0.5**4)


def test_add_param_group():
    model = mlp()
    opt = NFNOptimizer(model[0].parameters(), rule=open_rule())
    opt.add_param_group({"params": model[2].parameters(), "lr": 0.1})
    before = [p.clone() for p in model.parameters()]
    train(model, opt, 1)
    moved = [not torch.equal(p, q) for p, q in zip(model.parameters(), before)]
    assert moved == [True, True, True, True, False, False]


def test_step_returns_closure_loss():
    model = mlp()
    opt = NFNOptimizer(model.parameters(), rule=open_rule())
    x, y = batch(0)

    def closure():
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert isinstance(loss, torch.Tensor) and loss.item() > 0


def test_parameters_without_gradient_are_skipped():
    model = mlp()
    opt = NFNOptimizer(model.parameters(), rule=open_rule())
    model[4].weight.requires_grad_(False)
    before = model[4].weight.clone()
    train(model, opt, 3)
    assert torch.equal(model[4].weight, before)
    assert model[4].weight not in opt.state


def test_state_dict_round_trip_is_bit_identical(tmp_path):
    straight = mlp()
    opt = NFNOptimizer.for_model(straight, rule=open_rule(), weight_decay=0.01)
    train(straight, opt, 20)

    first = mlp()
    opt1 = NFNOptimizer.for_model(first, rule=open_rule(), weight_decay=0.01)
    train(first, opt1, 10)
    buf = io.BytesIO()
    torch.save({"model": first.state_dict(), "opt": opt1.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)

    resumed = mlp(seed=123)
    resumed.load_state_dict(saved["model"])
    opt2 = NFNOptimizer.for_model(resumed, rule=open_rule(), weight_decay=0.5)
    opt2.load_state_dict(saved["opt"])
    assert opt2.param_groups[0]["weight_decay"] == 0.01
    train(resumed, opt2, 10, start=10)
    for p, q in zip(straight.parameters(), resumed.parameters()):
        assert torch.equal(p, q)


def test_loading_state_from_another_rule_warns():
    model = mlp()
    opt = NFNOptimizer(model.parameters(), rule=open_rule(seed=0))
    train(model, opt, 2)
    other = NFNOptimizer(model.parameters(), rule=open_rule(seed=1))
    with pytest.warns(UserWarning, match="different learned rule"):
        other.load_state_dict(opt.state_dict())


def test_nonfinite_gradient_skips_that_tensor_and_warns_once():
    model = mlp()
    opt = NFNOptimizer(model.parameters(), rule=open_rule())
    train(model, opt, 2)
    state_before = copy.deepcopy(opt.state[model[2].weight])
    params_before = [p.clone() for p in model.parameters()]
    x, y = batch(5)
    opt.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    model[2].weight.grad[0, 0] = float("nan")
    model[0].bias.grad[1] = float("inf")
    with pytest.warns(RuntimeWarning, match="inf or NaN"):
        opt.step()
    assert torch.equal(model[2].weight, params_before[2])
    assert torch.equal(model[0].bias, params_before[1])
    assert not torch.equal(model[4].weight, params_before[4])
    for k in ("momenta", "v", "step"):
        assert torch.equal(opt.state[model[2].weight][k], state_before[k])
    assert opt.state[model[2].weight]["nonfinite_skips"].item() == 1
    assert all(torch.isfinite(p).all() for p in model.parameters())
    model[2].weight.grad[0, 0] = float("nan")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt.step()  # warned once already
    assert opt.state[model[2].weight]["nonfinite_skips"].item() == 2


def test_bf16_parameters_keep_their_dtype_and_float32_state():
    model = mlp(torch.bfloat16)
    opt = NFNOptimizer(model.parameters(), rule=open_rule())
    before = [p.clone() for p in model.parameters()]
    train(model, opt, 3)
    for p, q in zip(model.parameters(), before):
        assert p.dtype == torch.bfloat16 and not torch.equal(p, q)
        assert opt.state[p]["momenta"].dtype == torch.float32


def one_update(rule, grad_00: float) -> torch.Tensor:
    """A 4x5 tensor of ones after one step whose gradient is a ramp with entry (0, 0) set."""
    w = nn.Parameter(torch.ones(4, 5, dtype=torch.float64))
    opt = NFNOptimizer([w], rule=rule.double())
    g = torch.linspace(-1, 1, 20, dtype=torch.float64).reshape(4, 5)
    g[0, 0] = grad_00
    w.grad = g
    opt.step()
    return w.detach()


def test_update_of_an_element_reads_other_elements():
    """An NFN, not an elementwise rule: changing one gradient entry moves another entry's update."""
    a, b = one_update(open_rule(), 0.3), one_update(open_rule(), 5.0)
    assert (a[3, 4] - b[3, 4]).abs() > 1e-9
    # with a closed NFN (Adam) the other entries do not move
    assert one_update(fresh_rule(), 0.3)[3, 4] == one_update(fresh_rule(), 5.0)[3, 4]


def test_bad_input(tmp_path):
    with pytest.raises(ValueError, match="complex"):
        NFNOptimizer([nn.Parameter(torch.zeros(3, dtype=torch.complex64))], rule=fresh_rule())
    with pytest.raises(ValueError, match="learning rate"):
        NFNOptimizer(mlp().parameters(), rule=fresh_rule(), lr=-1.0)
    with pytest.raises(ValueError, match="weight_decay"):
        NFNOptimizer(mlp().parameters(), rule=fresh_rule(), weight_decay=-1.0)
    emb = nn.Embedding(10, 3, sparse=True)
    opt = NFNOptimizer(emb.parameters(), rule=fresh_rule())
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(RuntimeError, match="sparse gradients"):
        opt.step()
    bad = tmp_path / "bad.nfopt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match=str(bad)):
        NFNOptimizer(mlp().parameters(), ckpt=bad)


def test_rule_is_shared_not_trained():
    rule = open_rule()
    opt = NFNOptimizer(mlp().parameters(), rule=rule)
    assert all(not p.requires_grad for p in opt.rule.parameters())
    assert isinstance(opt.rule, LearnedUpdate)
