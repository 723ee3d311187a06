"""NFNOptimizer as a torch.optim.Optimizer: Adam at initialisation, groups, schedulers, state, bad
input, the rule it steps with, and the labellings it accepts."""

from __future__ import annotations

import copy
import importlib
import io
import shutil
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

from benchmarks.costs import count_aten_ops
import nfopt
from nfopt import NFNOptimizer, label_model, label_monomial
from nfopt.optim.features import FeatureConfig

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
    opt = NFNOptimizer(a.parameters(), rule=fresh_rule(), lr=1e-3 * lr_mult, weight_decay=weight_decay)
    ref = torch.optim.AdamW(b.parameters(), lr=1e-3 * lr_mult, weight_decay=weight_decay)
    train(a, opt, 50)
    train(b, ref, 50)
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.allclose(p, q, rtol=1e-5, atol=1e-6)
    assert max((p - q).abs().max().item() for p, q in zip(a.parameters(), mlp().parameters())) > 1e-3


def teacher_batch(g: torch.Generator, n: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs labelled by a fixed linear teacher: a task whose held-out loss can fall."""
    teacher = torch.randn(6, 3, generator=torch.Generator().manual_seed(7))
    x = torch.randn(n, 6, generator=g)
    return x, (x @ teacher).argmax(1)


def test_default_checkpoint_loads_and_trains():
    """The shipped rule, on fresh minibatches, lowers the loss on examples it never saw."""
    model = mlp()
    opt = NFNOptimizer(model.parameters())
    assert opt.rule.provenance.get("config"), "the shipped checkpoint records how it was meta-trained"
    held_out = teacher_batch(torch.Generator().manual_seed(1), 512)
    initial = nn.functional.cross_entropy(model(held_out[0]), held_out[1]).item()
    data = torch.Generator().manual_seed(2)
    for _ in range(200):
        x, y = teacher_batch(data)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    with torch.no_grad():
        final = nn.functional.cross_entropy(model(held_out[0]), held_out[1]).item()
    assert final < 0.5 * initial


def test_a_copy_of_the_package_under_another_name_reads_its_own_default(tmp_path, monkeypatch):
    """A vendored or side-by-side copy of the package loads the default rule beside it, not the
    installed package's."""
    shutil.copytree(Path(nfopt.__file__).parent, tmp_path / "nfopt_copy", ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.syspath_prepend(str(tmp_path))
    copy = importlib.import_module("nfopt_copy")
    assert copy.optim.default_checkpoint_path() == tmp_path / "nfopt_copy" / "default.nfopt"


def test_param_groups_and_scheduler_scale_the_learned_step():
    a, b = mlp(), mlp()
    groups = lambda m: [  # noqa: E731
        {"params": m[0].parameters(), "lr": 5e-4},
        {"params": list(m[2].parameters()) + list(m[4].parameters())},
    ]
    opt = NFNOptimizer(groups(a), rule=fresh_rule())
    ref = torch.optim.Adam(groups(b), lr=1e-3)
    train(a, opt, 20, scheduler=torch.optim.lr_scheduler.StepLR(opt, 5, gamma=0.5))
    train(b, ref, 20, scheduler=torch.optim.lr_scheduler.StepLR(ref, 5, gamma=0.5))
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.allclose(p, q, rtol=1e-5, atol=1e-6)
    assert opt.param_groups[0]["lr"] == pytest.approx(5e-4 * 0.5**4)


def test_add_param_group():
    model = mlp()
    opt = NFNOptimizer(model[0].parameters(), rule=open_rule())
    opt.add_param_group({"params": model[2].parameters(), "lr": 1e-4})
    before = [p.clone() for p in model.parameters()]
    train(model, opt, 1)
    moved = [not torch.equal(p, q) for p, q in zip(model.parameters(), before)]
    assert moved == [True, True, True, True, False, False]


def test_step_returns_closure_loss():
    """step(closure) evaluates the closure at the parameters before the step and returns its loss."""
    model = mlp()
    opt = NFNOptimizer(model.parameters(), rule=open_rule())
    x, y = batch(0)
    with torch.no_grad():
        before = nn.functional.cross_entropy(model(x), y)
    calls = []

    def closure():
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        calls.append(loss)
        return loss

    loss = opt.step(closure)
    assert len(calls) == 1 and loss is calls[0]
    assert loss.item() == before.item()
    with torch.no_grad():
        assert nn.functional.cross_entropy(model(x), y).item() != before.item()  # and then it stepped


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


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_parameters_keep_their_dtype_and_float32_state(dtype):
    model = mlp(dtype)
    opt = NFNOptimizer(model.parameters(), rule=open_rule())
    before = [p.clone() for p in model.parameters()]
    train(model, opt, 3)
    for p, q in zip(model.parameters(), before):
        assert p.dtype == dtype and not torch.equal(p, q) and torch.isfinite(p).all()
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
    """Optimizers given one rule step with that very object, for float32 and float64 parameters
    alike, and stepping leaves its weights as they were, frozen."""
    rule = open_rule()
    weights = copy.deepcopy(rule.state_dict())
    models = [mlp(), mlp(torch.float64)]
    opts = [NFNOptimizer(m.parameters(), rule=rule) for m in models]
    for m, opt in zip(models, opts):
        assert opt.rule is rule
        train(m, opt, 3)
    for k, v in rule.state_dict().items():
        assert torch.equal(v, weights[k]), k
    assert all(not p.requires_grad and p.grad is None for p in rule.parameters())
    twins = [copy.deepcopy((m, opt)) for m, opt in zip(models, opts)]  # with a copy of the rule as it was
    with torch.no_grad():
        rule.nfn.layers[-1].bias[:, 1] = -100.0  # the step-size channel at its floor: every step shrinks
    for (m, opt), (twin, twin_opt) in zip(zip(models, opts), twins):
        train(m, opt, 1, start=3)
        train(twin, twin_opt, 1, start=3)
        assert all(not torch.equal(p, q) for p, q in zip(m.parameters(), twin.parameters()))


def next_step_by_a_fresh_optimizer(model: nn.Module, opt: NFNOptimizer, step: int) -> list[torch.Tensor]:
    """The parameters after one more step of ``model`` from ``opt``'s state, taken by a new
    optimizer with a copy of ``opt.rule`` as it is now."""
    twin = copy.deepcopy(model)
    fresh = NFNOptimizer.for_model(twin, rule=copy.deepcopy(opt.rule))
    fresh.load_state_dict(opt.state_dict())
    train(twin, fresh, 1, start=step)
    return list(twin.parameters())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("change", ["in place", "assigned"])
def test_changing_the_rule_after_a_step_changes_the_next_step(dtype, change):
    model = mlp(dtype)
    opt = NFNOptimizer.for_model(model, rule=open_rule())
    train(model, opt, 2)
    unchanged = next_step_by_a_fresh_optimizer(model, opt, 2)
    if change == "in place":
        opt.rule.log_gamma.add_(1.0)
    else:
        opt.rule = open_rule(seed=1)
    expected = next_step_by_a_fresh_optimizer(model, opt, 2)
    train(model, opt, 1, start=2)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), expected))
    assert not all(torch.equal(p, q) for p, q in zip(model.parameters(), unchanged))


def test_state_dict_fingerprint_follows_the_rule():
    model = mlp()
    opt = NFNOptimizer(model.parameters(), rule=open_rule())
    train(model, opt, 2)
    before = opt.state_dict()["rule_fingerprint"]
    opt.rule.log_alpha.add_(1.0)
    edited = opt.state_dict()
    assert edited["rule_fingerprint"] != before
    assert edited["rule_fingerprint"] == NFNOptimizer(mlp().parameters(), rule=copy.deepcopy(opt.rule)).rule_fingerprint
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        NFNOptimizer(model.parameters(), rule=copy.deepcopy(opt.rule)).load_state_dict(edited)
    with pytest.warns(UserWarning, match="different learned rule"):
        NFNOptimizer(model.parameters(), rule=open_rule()).load_state_dict(edited)


def test_fingerprint_tells_configs_apart():
    """Fresh rules have equal weights whatever their config; their fingerprints still differ."""
    params = list(mlp().parameters())
    a = NFNOptimizer(params, rule=fresh_rule(alpha=1e-3)).rule_fingerprint
    b = NFNOptimizer(params, rule=fresh_rule(alpha=3e-3)).rule_fingerprint
    assert a != b
    assert a == NFNOptimizer(params, rule=fresh_rule(alpha=1e-3).double()).rule_fingerprint
    assert a != NFNOptimizer(params, rule=fresh_rule(alpha=1e-3, gate_floor=0.1)).rule_fingerprint


def test_assigning_a_rule_checks_it():
    model = mlp()
    opt = NFNOptimizer(model.parameters(), rule=open_rule())
    with pytest.raises(TypeError, match="LearnedUpdate"):
        opt.rule = open_rule().state_dict()
    other = fresh_rule(features=FeatureConfig(momentum_decays=(0.9,), adam_momentum=0))
    opt.rule = other  # before the first step any rule will do
    assert opt.rule is other and not any(p.requires_grad for p in other.parameters())
    train(model, opt, 1)
    with pytest.raises(ValueError, match="other statistics"):
        opt.rule = open_rule()


@pytest.mark.parametrize("sign_flips", [False, True])
def test_labelling_from_the_labellers_steps_as_for_model(sign_flips):
    x = batch(0)[0]

    def trajectory(make_opt) -> list[torch.Tensor]:
        model = mlp()
        train(model, make_opt(model), 5)
        return list(model.parameters())

    rule = open_rule(sign_flips=sign_flips)
    expected = trajectory(lambda m: NFNOptimizer.for_model(m, rule=rule))
    unlabelled = trajectory(lambda m: NFNOptimizer(m.parameters(), rule=rule))
    assert not all(torch.equal(p, q) for p, q in zip(unlabelled, expected))  # the labelling matters
    labellers = [label_monomial] if sign_flips else [label_model, label_monomial]
    for labeller in labellers:
        got = trajectory(lambda m: NFNOptimizer(m.parameters(), rule=rule, labelling=labeller(m, x)))
        assert all(torch.equal(p, q) for p, q in zip(got, expected)), labeller.__name__


def test_labelling_of_another_type_is_a_type_error():
    model = mlp()
    with pytest.raises(TypeError, match="ModelLabelling or MonomialLabelling"):
        NFNOptimizer(model.parameters(), rule=fresh_rule(), labelling=[p.shape for p in model.parameters()])
    with pytest.raises(TypeError, match="infers the labelling"):
        NFNOptimizer.for_model(model, rule=fresh_rule(), labelling=label_model(model))


def ops_per_step(model: nn.Module, labelled: bool) -> int:
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    opt = NFNOptimizer.for_model(model) if labelled else NFNOptimizer(model.parameters())
    opt.step()  # lazy state and plans
    return count_aten_ops(opt.step)


@pytest.mark.parametrize("labelled", [False, True], ids=["bare", "for_model"])
def test_ops_per_step_do_not_grow_with_the_number_of_tensors(labelled):
    """A step's ATen ops grow with the number of distinct tensor shapes, not of tensors: 48 tensors
    of a deep narrow MLP cost at most 1.5x the ops of 6 tensors of a wide one."""
    torch.manual_seed(0)
    wide = nn.Sequential(nn.Linear(20, 24), nn.ReLU(), nn.Linear(24, 16), nn.ReLU(), nn.Linear(16, 10))
    deep = nn.Sequential(*[m for _ in range(24) for m in (nn.Linear(16, 16), nn.ReLU())])
    few, many = ops_per_step(wide, labelled), ops_per_step(deep, labelled)
    assert many <= 1.5 * few, (few, many)
