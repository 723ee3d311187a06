"""NFNOptimizer against the conventions every torch.optim optimizer keeps, in the style of
PyTorch's generic optimizer tests: copies and pickles, learning rates (Adam's units, tensors,
schedulers), mixed dtypes, foreign and older state dicts, wrapped models, zero gradients."""

from __future__ import annotations

import copy
import io
import pickle
import warnings

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from benchmarks.noise_norm import noise_model, norm_under_noise
from nfopt import NFNOptimizer
from nfopt.labelling import label_model
from nfopt.optim import rule as rule_module

from ..rules import fresh_rule, open_rule
from .test_optimizer import batch, mlp, train

DTYPES = [torch.float32, torch.float64]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_a_copy_steps_as_the_original(how: str, dtype: torch.dtype) -> None:
    """A deep copy or an unpickled optimizer (with its model) has the rule, the labelling and the
    state, and goes on exactly as the original does."""
    model = mlp(dtype)
    opt = NFNOptimizer.for_model(model, rule=open_rule())
    train(model, opt, 3)
    twin, twin_opt = copy.deepcopy((model, opt)) if how == "deepcopy" else pickle.loads(pickle.dumps((model, opt)))
    assert twin_opt.rule_fingerprint == opt.rule_fingerprint and twin_opt.rule is not opt.rule
    assert twin_opt.spec_for(list(twin.parameters())) == opt.spec_for(list(model.parameters()))
    train(model, opt, 2, start=3)
    train(twin, twin_opt, 2, start=3)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), twin.parameters()))
    assert twin_opt.state_dict()["rule_fingerprint"] == opt.state_dict()["rule_fingerprint"]


def test_the_default_learning_rate_is_the_rules_alpha() -> None:
    rule = open_rule()
    opt = NFNOptimizer(mlp().parameters(), rule=rule)
    assert opt.param_groups[0]["lr"] == float(rule.scalars()[0])


@pytest.mark.parametrize("dtype", DTYPES)
def test_a_tensor_learning_rate_steps_as_the_number(dtype: torch.dtype) -> None:
    a, b = mlp(dtype), mlp(dtype)
    opt_a = NFNOptimizer(a.parameters(), rule=open_rule(), lr=2e-3)
    opt_b = NFNOptimizer(b.parameters(), rule=open_rule(), lr=torch.tensor(2e-3))
    train(a, opt_a, 3)
    train(b, opt_b, 3)
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("lr, message", [(torch.tensor([1e-3, 1e-3]), "1-element"), (-1e-3, "Invalid learning rate")])
def test_bad_learning_rates_are_refused(lr, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        NFNOptimizer(mlp().parameters(), rule=open_rule(), lr=lr)
    opt = NFNOptimizer(mlp()[0].parameters(), rule=open_rule())
    with pytest.raises(ValueError, match=message):
        opt.add_param_group({"params": mlp()[2].parameters(), "lr": lr})


def test_a_scheduler_in_adams_units_schedules_as_for_adam() -> None:
    """OneCycleLR(max_lr=1e-3) on the Adam-equivalent rule gives Adam's trajectory under the same
    schedule: ``lr`` is a learning rate, not a multiplier."""
    a, b = mlp(), mlp()
    opt = NFNOptimizer(a.parameters(), rule=fresh_rule())
    ref = torch.optim.Adam(b.parameters())
    schedules = [torch.optim.lr_scheduler.OneCycleLR(o, max_lr=1e-3, total_steps=20, cycle_momentum=False) for o in (opt, ref)]
    train(a, opt, 20, scheduler=schedules[0])
    train(b, ref, 20, scheduler=schedules[1])
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


class _Mixed(nn.Module):
    """A float64 layer feeding a float32 one."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b = nn.Linear(6, 8).double(), nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.tanh(self.a(x.double())).float())


def test_float32_and_float64_parameters_step_together() -> None:
    """Parameters of both dtypes in one optimizer: the step runs in float32 and each tensor's
    statistics stay in their own dtype."""
    model = _Mixed()
    opt = NFNOptimizer(model.parameters(), rule=open_rule())
    before = [p.clone() for p in model.parameters()]
    train(model, opt, 2)
    assert all(not torch.equal(p, q) for p, q in zip(model.parameters(), before))
    for p in model.parameters():
        assert opt.state[p]["v"].dtype == p.dtype and opt.state[p]["momenta"].dtype == p.dtype


def test_state_from_another_optimizer_is_refused_and_loses_nothing() -> None:
    model = mlp()
    adam = torch.optim.Adam(model.parameters())
    train(model, adam, 1)
    opt = NFNOptimizer(model.parameters(), rule=open_rule())
    train(model, opt, 1)
    saved = copy.deepcopy(opt.state_dict())
    with pytest.raises(ValueError, match="made by another optimizer"):
        opt.load_state_dict(adam.state_dict())
    kept = opt.state_dict()
    assert kept["param_groups"] == saved["param_groups"]
    assert all(torch.equal(kept["state"][i][k], saved["state"][i][k]) for i in saved["state"] for k in ("momenta", "v"))


def test_state_saved_when_lr_was_a_multiplier_loads_as_learning_rates() -> None:
    """State dicts from before ``lr`` was a learning rate hold multipliers of α; they load with a
    warning, as the learning rates they meant."""
    model = mlp()
    opt = NFNOptimizer(model.parameters(), rule=open_rule())
    train(model, opt, 1)
    old = opt.state_dict()
    del old["lr_is_learning_rate"]
    old["param_groups"][0]["lr"] = 0.5  # half the learned step, as it was written then
    buf = io.BytesIO()
    torch.save(old, buf)
    buf.seek(0)
    fresh = NFNOptimizer(model.parameters(), rule=open_rule())
    with pytest.warns(UserWarning, match="multiplier"):
        fresh.load_state_dict(torch.load(buf, weights_only=True))
    assert fresh.param_groups[0]["lr"] == pytest.approx(0.5 * float(fresh.rule.scalars()[0]))


def test_for_model_reads_through_wrappers(tmp_path) -> None:
    """A compiled or DDP-wrapped model is labelled as the model inside it: the same coupled
    weight space, not independent tensors."""
    import torch.distributed as dist

    model = mlp()
    plain = NFNOptimizer.for_model(model, rule=open_rule()).spec_for(list(model.parameters()))
    assert plain == label_model(model).params
    compiled = torch.compile(model)
    assert NFNOptimizer.for_model(compiled, rule=open_rule()).spec_for(list(model.parameters())) == plain
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        wrapped = nn.parallel.DistributedDataParallel(model)
        assert NFNOptimizer.for_model(wrapped, rule=open_rule()).spec_for(list(model.parameters())) == plain
    finally:
        dist.destroy_process_group()


def test_sharded_parameters_are_refused(tmp_path) -> None:
    """A shard (a DTensor, as FSDP2 makes; FSDP's flat parameter) is refused with the reason:
    pooled statistics over a shard are not those over the tensor."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    flat = nn.Parameter(torch.zeros(6))
    flat._is_flat_param = True
    with pytest.raises(ValueError, match="sharded parameters"):
        NFNOptimizer([flat], rule=fresh_rule())
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        shard = nn.Parameter(distribute_tensor(torch.randn(4, 3), mesh, [Shard(0)]))
        with pytest.raises(ValueError, match="sharded parameters"):
            NFNOptimizer([shard], rule=fresh_rule())
        opt = NFNOptimizer(mlp().parameters(), rule=fresh_rule())
        with pytest.raises(ValueError, match="sharded parameters"):
            opt.add_param_group({"params": [shard]})
    finally:
        dist.destroy_process_group()


def test_a_skipped_gradient_on_a_device_is_told_at_state_dict(monkeypatch) -> None:
    """Where checking would wait for the device (here the CPU made to act as one), a skipped
    non-finite gradient warns at the next state_dict(), once; nothing is lost meanwhile."""
    monkeypatch.setattr(rule_module, "READ_AT_ONCE", set())
    model = mlp()
    opt = NFNOptimizer(model.parameters(), rule=open_rule())
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    model[0].weight.grad[0, 0] = float("nan")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt.step()
    with pytest.warns(RuntimeWarning, match="inf or NaN"):
        sd = opt.state_dict()
    assert sd["state"][0]["nonfinite_skips"] == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt.step()
        opt.state_dict()


_HOST_READS = {"_local_scalar_dense", "is_nonzero", "nonzero", "masked_select", "equal", "unique", "_unique2"}
"""ATen ops that read a tensor's values on the host: on a GPU, each waits for the device."""


class _HostReads(TorchDispatchMode):
    """Counts the ops of :data:`_HOST_READS` dispatched while it is active."""

    def __init__(self) -> None:
        super().__init__()
        self.reads: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name.split("::")[-1]
        if name in _HOST_READS:
            self.reads.append(name)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("labels", ["bare", "for_model"])
@pytest.mark.parametrize("chunk", [None, 5])
def test_a_step_on_a_device_reads_nothing_on_the_host(monkeypatch, labels: str, chunk: int | None) -> None:
    """What a GPU step runs (the PyTorch path, the CPU here made to act as a device) reads no
    tensor value on the host, so it never waits for the device: with finite gradients and with
    a non-finite one, whole and in chunks of rows. The CUDA test below checks the same on a GPU."""
    monkeypatch.setattr(rule_module, "READ_AT_ONCE", set())
    monkeypatch.setattr(rule_module, "fused_library", lambda dtype: None)
    if chunk is not None:
        monkeypatch.setattr(rule_module, "CHUNK_ELEMENTS", chunk)
    model = mlp()
    opt = NFNOptimizer(model.parameters(), rule=open_rule()) if labels == "bare" else NFNOptimizer.for_model(model, rule=open_rule())
    train(model, opt, 1)
    for bad in (False, True):
        for p in model.parameters():
            p.grad = torch.randn_like(p)
        if bad:
            model[2].weight.grad[0, 0] = float("nan")
        with _HostReads() as mode:
            opt.step()
        assert mode.reads == [], mode.reads
    monkeypatch.setattr(rule_module, "READ_AT_ONCE", {"cpu"})
    with _HostReads() as mode:
        opt.step()
    assert mode.reads, "the counter sees reads where the step makes them"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_cuda_step_does_not_synchronize() -> None:
    """After the first step (which makes the state), steps run without waiting for the device."""
    model = mlp().cuda()
    opt = NFNOptimizer(model.parameters(), rule=open_rule())
    grads = [[torch.randn_like(p) for p in model.parameters()] for _ in range(4)]
    for p, g in zip(model.parameters(), grads[0]):
        p.grad = g
    opt.step()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for step in grads[1:]:
            for p, g in zip(model.parameters(), step):
                p.grad = g
            opt.step()
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_a_cuda_step_follows_the_cpu_step(dtype: torch.dtype) -> None:
    """The same steps on CUDA and on the CPU (to float rounding: the CPU runs the compiled loop)."""
    cpu, gpu = mlp(dtype), mlp(dtype).cuda()
    opts = [NFNOptimizer(m.parameters(), rule=open_rule()) for m in (cpu, gpu)]
    for i in range(3):
        for m, opt in zip((cpu, gpu), opts):
            for p in m.parameters():
                p.grad = torch.randn(p.shape, generator=torch.Generator().manual_seed(i), dtype=dtype).to(p.device)
            opt.step()
    tol = {torch.float64: 1e-10, torch.float32: 1e-5}.get(dtype, 2e-2)
    for p, q in zip(cpu.parameters(), gpu.parameters()):
        torch.testing.assert_close(q.cpu(), p, rtol=tol, atol=tol)


def test_compiling_the_step_compiles_nothing() -> None:
    """torch.compile(opt.step) runs the step as it is: no frame is traced (each would recompile
    and break the graph), and the trajectory is the eager one."""
    from torch._dynamo.testing import CompileCounter

    a, b = mlp(), mlp()
    opt_a, opt_b = (NFNOptimizer(m.parameters(), rule=open_rule()) for m in (a, b))
    counter = CompileCounter()
    opt_a.step = torch.compile(opt_a.step, backend=counter)
    train(a, opt_a, 3)
    train(b, opt_b, 3)
    assert counter.frame_count == 0
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


def _gated_rule(gate_floor: float = 0.1, snr_gate: float = 0.0):
    """A rule with every weight random (the NFN far from Adam) and a gate on its learned part."""
    from ..test_reference_equivalence import random_rule

    return random_rule(0, gate_floor=gate_floor, snr_gate=snr_gate).float()


ZERO_GRADIENT_PATHS = [("1", torch.float32), ("0", torch.float32), ("1", torch.float64), ("0", torch.float64)]
"""(NFOPT_FUSED, dtype): the compiled loop and PyTorch ops, in both dtypes."""
ZERO_GRADIENT_IDS = ["loop-float32", "torch-float32", "loop-float64", "torch-float64"]


@pytest.mark.parametrize(
    "rule",
    [
        "default",
        "gated",
        "gated, F·ref underflowing",
        "signal-to-noise gated",
    ],
)
@pytest.mark.parametrize("fused,dtype", ZERO_GRADIENT_PATHS, ids=ZERO_GRADIENT_IDS)
def test_zero_gradients_leave_the_parameters_where_they_are(rule: str, fused: str, dtype: torch.dtype, monkeypatch) -> None:
    """PyTorch's test_step_is_noop_for_zero_grads, for the shipped default and for a rule with
    random weights and a gate (``gate_floor`` or ``snr_gate``), whose learned part cannot move an
    element whose gradient history is zero."""
    monkeypatch.setenv("NFOPT_FUSED", fused)
    model = mlp(dtype)
    gates = {"gated": (0.1, 0.0), "gated, F·ref underflowing": (1e-40, 0.0), "signal-to-noise gated": (0.0, 0.5)}
    opt = NFNOptimizer(model.parameters(), rule=_gated_rule(*gates[rule])) if rule in gates else NFNOptimizer(model.parameters())
    before = [p.clone() for p in model.parameters()]
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))


@pytest.mark.parametrize("fused,dtype", ZERO_GRADIENT_PATHS, ids=ZERO_GRADIENT_IDS)
def test_with_a_gate_tensors_without_gradients_stay_while_the_others_train(fused: str, dtype: torch.dtype, monkeypatch) -> None:
    """Labelled for the model (the tensors coupled): a bias whose gradient is always zero and a
    weight row whose gradient is always zero keep their values to the bit over steps in which the
    rest trains; the same rule without the gate moves them."""
    monkeypatch.setenv("NFOPT_FUSED", fused)
    moved = {}
    for floor in (0.1, 0.0):
        model = mlp(dtype)
        opt = NFNOptimizer.for_model(model, rule=_gated_rule(floor))
        first, bias = model[0], model[2].bias
        before = (bias.detach().clone(), first.weight.detach()[0].clone())
        for i in range(3):
            opt.zero_grad()
            x, y = batch(i, dtype)
            nn.functional.cross_entropy(model(x), y).backward()
            bias.grad.zero_()
            first.weight.grad[0] = 0
            opt.step()
        moved[floor] = (not torch.equal(bias.detach(), before[0]), not torch.equal(first.weight.detach()[0], before[1]))
        assert (first.weight.detach()[1:] != mlp(dtype)[0].weight.detach()[1:]).any()
    assert moved == {0.1: (False, False), 0.0: (True, True)}


NOISE_GROWTH_SLACK = 1.1
"""How much more than Adam's a learned optimizer's parameter norm may grow under pure noise."""


@pytest.mark.parametrize("mode", ["bare", "for_model"])
def test_pure_noise_grows_the_norm_no_more_than_adam(mode: str) -> None:
    """1000 steps of pure-noise gradients: the shipped default's parameter norm grows no more
    than Adam's (at the rule's learning rate α) does, within 10% (the margin of its
    signal-to-noise gate keeps the learned part out of the first steps, where noise looks like
    signal)."""
    alpha = float(NFNOptimizer(noise_model().parameters()).rule.scalars()[0])
    start, adam, _ = norm_under_noise(lambda m: torch.optim.Adam(m.parameters(), lr=alpha))
    build = NFNOptimizer if mode == "bare" else NFNOptimizer.for_model
    _, ours, _ = norm_under_noise(lambda m: build(m.parameters() if mode == "bare" else m))
    assert ours - start <= NOISE_GROWTH_SLACK * (adam - start), (start, adam, ours)


def test_noise_level_gradients_of_the_default_step_no_further_than_adam() -> None:
    """A bias whose gradients are 1e-7 of the rest's (a conv bias before BatchNorm): the shipped
    default's steps on it are no larger than Adam's, elementwise, to 2e-3 of α, over 20 steps."""
    from nfopt.io import load_rule
    from nfopt.optim.optimizer import default_checkpoint_path

    from .test_rule import _noise_steps

    rule = load_rule(default_checkpoint_path()).double()
    ours, adam = _noise_steps(rule)
    alpha = rule.scalars()[0].item()
    assert (ours <= adam * 1.002 + 2e-3 * alpha).all(), float((ours - adam).max() / alpha)
