"""The learned update rule: Adam at initialisation, bounded steps, sign-flip equivariance.

Its checkpoint files are tested with the rest of checkpoint IO, in ``tests/test_io.py``."""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch

from nfopt.optim.features import init_state
from nfopt.optim.rule import OPTIONAL, LearnedUpdate, UpdateConfig
from nfopt.weight_space import WeightSpaceSpec

from ..rules import fresh_rule, open_rule
from ..weight_spaces import mlp_spec, monomial_mlp_spec


def test_fresh_rule_steps_like_adam():
    torch.manual_seed(0)
    rule = LearnedUpdate().double()
    params = [torch.randn(4, 3, dtype=torch.float64), torch.randn(4, dtype=torch.float64)]
    ref = [p.clone().requires_grad_() for p in params]
    adam = torch.optim.Adam(ref, lr=1e-3)
    spec = WeightSpaceSpec.independent(params)
    states = [init_state(p, rule.config.features) for p in params]
    for _ in range(20):
        grads = [torch.randn_like(p) for p in params]
        params, states, _ = rule(spec, params, grads, states)
        for r, g in zip(ref, grads):
            r.grad = g
        adam.step()
    for p, r in zip(params, ref):
        assert torch.allclose(p, r, rtol=0, atol=1e-10)


def test_meta_gradient_reaches_every_weight():
    torch.manual_seed(0)
    rule = LearnedUpdate().double()
    for p in rule.nfn.layers[-1].parameters():  # open the closed last layer
        torch.nn.init.normal_(p, std=0.1)
    spec = mlp_spec([3, 4, 2])
    params = [torch.randn(t.shape, dtype=torch.float64) for t in spec.tensors]
    states = [init_state(p, rule.config.features) for p in params]
    for _ in range(3):
        params, states, _ = rule(spec, params, [torch.randn_like(p) for p in params], states)
    sum(p.square().sum() for p in params).backward()
    for name, w in rule.named_parameters():
        assert w.grad is not None and w.grad.abs().sum() > 0, name


def test_bad_config():
    with pytest.raises(ValueError, match="positive"):
        UpdateConfig(alpha=0.0)
    for name in OPTIONAL:
        for bad in (-0.1, float("nan"), float("inf")):
            with pytest.raises(ValueError, match=f"{name} must be finite and at least 0"):
                UpdateConfig(**{name: bad, "snr_gate": 0.5} if name == "snr_margin" else {name: bad})
    with pytest.raises(ValueError, match="snr_margin 8.0 needs a signal-to-noise gate"):
        UpdateConfig(snr_margin=8.0)


def test_gate_fields_are_left_out_of_the_dict_where_off():
    """A rule without a gate writes (and fingerprints) the config it wrote before the options existed."""
    assert not set(OPTIONAL) & set(UpdateConfig().to_dict())
    assert "snr_margin" not in UpdateConfig(snr_gate=0.5).to_dict()
    d = UpdateConfig(gate_floor=0.1, snr_gate=0.5, snr_margin=8.0).to_dict()
    assert (d["gate_floor"], d["snr_gate"], d["snr_margin"]) == (0.1, 0.5, 8.0)
    assert UpdateConfig(tensor_log_scale=3.0).to_dict()["tensor_log_scale"] == 3.0
    for config in (UpdateConfig(snr_gate=0.5), UpdateConfig(snr_gate=0.5, snr_margin=8.0), UpdateConfig(tensor_log_scale=3.0)):
        assert UpdateConfig(**config.to_dict()) == config


def test_a_step_strays_from_adam_by_a_bounded_amount():
    """However large the NFN's outputs, |Δ - Δ_adam·scale| stays within α·B·e^L per element."""
    rule = LearnedUpdate().double()
    with torch.no_grad():
        rule.nfn.layers[-1].bias.fill_(1e6)  # drive both output channels far out
    cfg = rule.config
    p = torch.randn(5, 4, dtype=torch.float64)
    state = init_state(p, cfg.features)
    (new,), (state,), _ = rule(WeightSpaceSpec.independent([p]), [p], [torch.randn_like(p)], [state])
    step = (p - new).abs()
    u_max = 1 / (1 - cfg.features.momentum_decays[cfg.features.adam_momentum])  # |m̂/sqrt(v̂)| at step 1
    assert step.max() <= cfg.alpha * (u_max + cfg.max_deviation) * torch.exp(torch.tensor(cfg.max_log_scale)) + 1e-12
    assert step.min() > cfg.alpha  # and the outputs did act: larger than Adam's first step (α)


def _flip_run(rule, spec, run_spec, element, steps=4):
    """Params after ``steps`` updates from flipped inputs, and the flipped params of the plain run."""
    g = torch.Generator().manual_seed(5)
    params = [torch.randn(t.shape, generator=g, dtype=torch.float64) for t in spec.space.tensors]
    grads = [[torch.randn(t.shape, generator=g, dtype=torch.float64) for t in spec.space.tensors] for _ in range(steps)]
    flipped = spec.act(params, element)
    states = [init_state(p, rule.config.features) for p in params]
    flipped_states = [init_state(p, rule.config.features) for p in params]
    for gs in grads:
        params, states, _ = rule(run_spec, params, gs, states)
        flipped, flipped_states, _ = rule(run_spec, flipped, spec.act(gs, element), flipped_states)
    return flipped, spec.act(params, element)


def test_rule_is_equivariant_to_sign_flips_given_a_monomial_spec():
    """Flipping hidden neurons of a tanh MLP flips its trajectory under the rule, as under Adam;
    the same rule given only the permutation spec does not commute with flips."""
    spec = monomial_mlp_spec([3, 5, 4, 2], "sign")
    rule = open_rule(sign_flips=True).double()
    element = spec.random_element(torch.Generator().manual_seed(1))
    lhs, rhs = _flip_run(rule, spec, spec, element)
    assert max((a - b).abs().max().item() for a, b in zip(lhs, rhs)) < 1e-12
    lhs, rhs = _flip_run(rule, spec, spec.space, element)
    assert max((a - b).abs().max().item() for a, b in zip(lhs, rhs)) > 1e-6


def test_a_rule_trained_without_sign_flips_ignores_them():
    spec = monomial_mlp_spec([3, 5, 2], "sign")
    rule = open_rule().double()
    params = [torch.randn(t.shape, dtype=torch.float64) for t in spec.space.tensors]
    grads = [torch.randn_like(p) for p in params]
    states = [init_state(p, rule.config.features) for p in params]
    for a, b in zip(rule(spec, params, grads, states)[0], rule(spec.space, params, grads, states)[0]):
        assert torch.equal(a, b)


def test_rule_refuses_scalings():
    spec = monomial_mlp_spec([3, 5, 2], "scale")
    rule = fresh_rule(sign_flips=True).double()
    params = [torch.randn(t.shape, dtype=torch.float64) for t in spec.space.tensors]
    states = [init_state(p, rule.config.features) for p in params]
    with pytest.raises(ValueError, match="admit scalings"):
        rule(spec, params, params, states)


BATCH_CASES = ["zoo-cnn_flatten", "independent-mlp2_tanh", "signs-mlp2_tanh", "random0", "every_relation"]


def _batch_inputs(rule: LearnedUpdate):
    from ..test_reference_equivalence import CASES, random_inputs
    from nfopt.weight_space import MonomialSpec

    specs, inputs = [], []
    for i, name in enumerate(BATCH_CASES):
        spec = CASES[name].spec()
        specs.append(spec)
        inputs.append(random_inputs(rule, spec.space if isinstance(spec, MonomialSpec) else spec, i, None))
    return specs, inputs


def _joined(inputs, field: str) -> list:
    return [v for x in inputs for v in getattr(x, field)]


@pytest.mark.parametrize("gate_floor", [0.0, 0.5])
def test_a_batch_of_weight_spaces_steps_each_as_alone(gate_floor: float) -> None:
    """One rule call on a batch of weight spaces (different models, with and without sign flips)
    gives every tensor the update and statistics it gets when its space is stepped alone, in
    float64 to 1e-10; joined without the batch's components, the global term would couple them.
    With the gate, its mean of v̂ is each space's own; the optimizer's in-place step agrees."""
    from ..test_reference_equivalence import assert_close, random_rule
    from nfopt.weight_space import WeightSpaceSpec, as_monomial, batch

    rule = random_rule(0, sign_flips=True, gate_floor=gate_floor)
    specs, inputs = _batch_inputs(rule)
    alone = [rule(s, x.params, x.grads, x.states, x.lrs, x.weight_decays) for s, x in zip(specs, inputs)]
    args = [_joined(inputs, f) for f in ("params", "grads", "states", "lrs", "weight_decays")]
    together = rule(batch(specs), *args)
    expected = [p for a in alone for p in a[0]]
    expected_states = [s for a in alone for s in a[1]]
    for i, (got, want) in enumerate(zip(together[0], expected)):
        assert_close(got, want, f"param {i}")
    for i, (got, want) in enumerate(zip(together[1], expected_states)):
        for k in ("momenta", "v", "step"):
            assert_close(got[k], want[k], f"{k} {i}")
    params = [p.clone() for p in args[0]]
    states = [{k: v.clone() for k, v in st.items()} for st in args[2]]
    rule.step_(batch(specs), params, args[1], states, args[3], args[4])
    for i, (got, want) in enumerate(zip(params, expected)):
        assert_close(got, want, f"param {i} in place")
    spaces = batch([as_monomial(s).space for s in specs])
    one_space = WeightSpaceSpec(spaces.tensors)  # the same sets, but one component
    coupled = rule(one_space, *args)
    plain = rule(spaces, *args)
    assert any((a - b).abs().max() > 1e-6 for a, b in zip(coupled[0], plain[0]))


# ---- the gate on the learned part (UpdateConfig.gate_floor) -----------------------------------------


def _gated_rule(
    gate_floor: float, seed: int = 0, dtype: torch.dtype = torch.float64, snr_gate: float = 0.0, snr_margin: float = 0.0,
    **config,
) -> LearnedUpdate:
    """A rule of the default shape with every weight random (the NFN is far from Adam)."""
    from ..test_reference_equivalence import random_rule

    return random_rule(seed, gate_floor=gate_floor, snr_gate=snr_gate, snr_margin=snr_margin, **config).to(dtype)


def _zero_history_run(rule: LearnedUpdate, dtype: torch.dtype, steps: int = 3):
    """Steps of an MLP's space where b0 never has a gradient and row 0 of w1 never has one, the
    rest random: the params before and after."""
    spec = mlp_spec([5, 6, 4])
    g = torch.Generator().manual_seed(3)
    params = [torch.randn(t.shape, generator=g, dtype=dtype) for t in spec.tensors]
    before = [p.clone() for p in params]
    states = [init_state(p, rule.config.features) for p in params]
    with torch.no_grad():
        for _ in range(steps):
            grads = [torch.randn(t.shape, generator=g, dtype=dtype) for t in spec.tensors]
            grads[1].zero_()
            grads[2][0].zero_()
            params, states, _ = rule(spec, params, grads, states)
    return before, params


@pytest.mark.parametrize(
    "floor,snr,margin,tensor",
    [(0.1, 0.0, 0.0, 0.0), (1e-50, 0.0, 0.0, 0.0), (0.0, 0.5, 0.0, 0.0), (1e-50, 1e-30, 0.0, 0.0), (0.0, 0.5, 1.0, 0.0),
     (0.0, 0.5, 8.0, 3.0)],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_with_a_gate_elements_without_gradient_history_do_not_move(dtype, floor, snr, margin, tensor):
    """Whatever the NFN's weights: a tensor with no gradient yet, and the elements of another
    with none, keep their values to the bit while the rest move, with either gate (also with a
    floor so small that F·ref underflows, κ² below the smallest normal number, the
    signal-to-noise gate's margin, and a per-tensor step factor); without a gate they move."""
    rule = _gated_rule(floor, dtype=dtype, snr_gate=snr, snr_margin=margin, tensor_log_scale=tensor)
    before, after = _zero_history_run(rule, dtype)
    assert torch.equal(after[1], before[1]) and torch.equal(after[2][0], before[2][0])
    assert (after[2][1:] != before[2][1:]).all() and (after[0] != before[0]).all()
    before, after = _zero_history_run(_gated_rule(0.0, dtype=dtype), dtype)
    assert (after[1] != before[1]).any() and (after[2][0] != before[2][0]).any()


def _noise_steps(rule: LearnedUpdate, steps: int = 20) -> tuple[torch.Tensor, torch.Tensor]:
    """|Δ| per step of a bias whose gradients are 1e-7 of the other tensors', under the rule and
    under torch's Adam (lr = the rule's α, its betas and eps) from the same gradients: (steps, 6) each."""
    f = rule.config.features
    spec = mlp_spec([5, 6, 4])
    g = torch.Generator().manual_seed(4)
    params = [torch.randn(t.shape, generator=g, dtype=torch.float64) for t in spec.tensors]
    states = [init_state(p, f) for p in params]
    noisy = params[1].clone().requires_grad_()
    adam = torch.optim.Adam([noisy], lr=rule.scalars()[0].item(), betas=(f.momentum_decays[f.adam_momentum], f.beta2), eps=f.eps)
    ours, theirs = [], []
    with torch.no_grad():
        for _ in range(steps):
            grads = [torch.randn(t.shape, generator=g, dtype=torch.float64) for t in spec.tensors]
            grads[1] *= 1e-7
            new, states, _ = rule(spec, params, grads, states)
            ours.append((new[1] - params[1]).abs())
            params = new
            old = noisy.detach().clone()
            noisy.grad = grads[1]
            adam.step()
            theirs.append((noisy.detach() - old).abs())
    return torch.stack(ours), torch.stack(theirs)


def test_with_a_gate_noise_level_gradients_step_no_further_than_adam():
    """Gradients at 1e-7 of the rest of the model's (a conv bias before BatchNorm) get steps no
    larger than Adam's, elementwise, to 2e-3 of the learning rate, at every one of 20 steps;
    without the gate the learned part gives them steps far larger."""
    tol = 2e-3
    for floor in (1e-3, 0.1):
        rule = _gated_rule(floor)
        ours, adam = _noise_steps(rule)
        alpha = rule.scalars()[0].item()
        assert (ours <= adam * (1 + tol) + tol * alpha).all(), floor
    rule = _gated_rule(0.0)
    ours, adam = _noise_steps(rule)
    alpha = rule.scalars()[0].item()
    assert (ours > adam * (1 + tol) + tol * alpha).any()
    assert (ours - adam).max() > 0.1 * alpha


def _noise_walk(rule: LearnedUpdate, steps: int = 300) -> tuple[torch.Tensor, torch.Tensor]:
    """An MLP space's parameters, flat, before and after ``steps`` steps of pure-noise gradients
    (N(0, 1), a fresh draw every step)."""
    spec = mlp_spec([5, 6, 4])
    g = torch.Generator().manual_seed(6)
    params = [torch.randn(t.shape, generator=g, dtype=torch.float64) for t in spec.tensors]
    states = [init_state(p, rule.config.features) for p in params]
    start = torch.cat([p.flatten() for p in params])
    with torch.no_grad():
        for _ in range(steps):
            params, states, _ = rule(spec, params, [torch.randn(t.shape, generator=g, dtype=torch.float64) for t in spec.tensors], states)
    return start, torch.cat([p.flatten() for p in params])


def _noise_growth(rule: LearnedUpdate, steps: int = 300) -> float:
    """How far the parameter norm grows over :func:`_noise_walk`."""
    start, end = _noise_walk(rule, steps)
    return float(end.norm() - start.norm())


def test_the_signal_to_noise_gate_damps_the_learned_part_under_pure_noise():
    """A rule whose NFN is far from Adam random-walks (and drifts) far under pure-noise gradients;
    with the signal-to-noise gate (κ = 0.5), which reads the slow momentum averaging the noise
    away, its norm grows a small fraction as much, with the floor's gate too; the floor's gate
    alone, which reads only the gradients' scale, does not damp it."""
    free = _noise_growth(_gated_rule(0.0))
    assert free > 0
    for floor in (0.0, 0.1):
        assert _noise_growth(_gated_rule(floor, snr_gate=0.5)) < 0.2 * free, floor
    assert _noise_growth(_gated_rule(0.1)) > 0.5 * free


def _adam_gaps(rule: LearnedUpdate, grads: Callable[[int], list[torch.Tensor]], steps: int) -> list[float]:
    """Per step, the largest |Δ - Δ_adam| / α over an MLP's space, Δ_adam torch's Adam's step (lr =
    the rule's α, its betas and eps) from the same parameters and gradients ``grads(step)``."""
    f = rule.config.features
    spec = mlp_spec([5, 6, 4])
    g = torch.Generator().manual_seed(7)
    params = [torch.randn(t.shape, generator=g, dtype=torch.float64) for t in spec.tensors]
    states = [init_state(p, f) for p in params]
    alpha = rule.scalars()[0].item()
    twins = [p.clone().requires_grad_() for p in params]
    adam = torch.optim.Adam(twins, lr=alpha, betas=(f.momentum_decays[f.adam_momentum], f.beta2), eps=f.eps)
    gaps = []
    with torch.no_grad():
        for t in range(steps):
            gs = grads(t)
            params, states, _ = rule(spec, params, gs, states)
            for twin, grad in zip(twins, gs):
                twin.grad = grad
            adam.step()
            gaps.append(max(float((p - q).abs().max()) for p, q in zip(params, twins)) / alpha)
            for p, twin in zip(params, twins):
                twin.copy_(p)
    return gaps


def test_the_margin_holds_the_learned_part_back_until_noise_could_not_explain_a_gradient():
    """With margin K = 8 and an NFN far from Adam: while pure noise's share n_t of ρ² is at least
    1/K (steps 1 to 8), even a gradient that never changes gets Adam's step exactly (to rounding);
    from step 9 it gets the learned part. Without the margin, it gets it from step 1."""
    spec = mlp_spec([5, 6, 4])
    g = torch.Generator().manual_seed(8)
    constant = [torch.randn(t.shape, generator=g, dtype=torch.float64) for t in spec.tensors]
    gaps = _adam_gaps(_gated_rule(0.0, snr_gate=0.5, snr_margin=8.0), lambda t: constant, 10)
    assert max(gaps[:8]) < 1e-9 and min(gaps[8:]) > 1e-2, gaps
    assert min(_adam_gaps(_gated_rule(0.0, snr_gate=0.5), lambda t: constant, 10)) > 1e-2


def test_the_margin_keeps_the_first_steps_of_pure_noise_nearly_adams():
    """Over the first 30 steps of pure-noise gradients, the rule with margin K = 8 steps within
    1% of α of Adam's step, where without the margin its learned part moves elements by a
    sizeable fraction of α (noise's ρ² is about 1/t, so it passes the gate early on)."""
    spec = mlp_spec([5, 6, 4])
    g = torch.Generator().manual_seed(9)
    noise = lambda t: [torch.randn(s.shape, generator=g, dtype=torch.float64) for s in spec.tensors]  # noqa: E731
    assert max(_adam_gaps(_gated_rule(0.0, snr_gate=0.5, snr_margin=8.0), noise, 30)) < 1e-2
    assert max(_adam_gaps(_gated_rule(0.0, snr_gate=0.5), noise, 30)) > 0.1


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("zero", ["all", "one tensor"])
def test_with_a_gate_meta_gradients_are_finite_at_zero_gradients(dtype, zero):
    """Two differentiated steps from fresh statistics with every gradient zero (or one tensor's):
    the meta-gradients with respect to every rule weight and every input are finite."""
    rule = _gated_rule(0.1, dtype=dtype)
    spec = mlp_spec([5, 6, 4])
    g = torch.Generator().manual_seed(5)
    params = [torch.randn(t.shape, generator=g, dtype=dtype).requires_grad_() for t in spec.tensors]
    leaves = list(params)
    states = [init_state(p, rule.config.features) for p in params]
    for s in states:
        for k in ("momenta", "v"):
            s[k].requires_grad_()
            leaves.append(s[k])
    current = params
    for _ in range(2):
        grads = [torch.zeros(t.shape, dtype=dtype) for t in spec.tensors]
        if zero == "one tensor":
            grads = [torch.randn(t.shape, generator=g, dtype=dtype) for t in spec.tensors]
            grads[1] = torch.zeros_like(grads[1])
        grads = [(gr + 0 * p).requires_grad_() if not gr.requires_grad else gr for gr, p in zip(grads, current)]
        leaves += grads
        current, states, _ = rule(spec, current, grads, states)
    loss = sum((p * p).sum() for p in current)
    weights = list(rule.parameters())
    got = torch.autograd.grad(loss, weights + leaves, allow_unused=True, materialize_grads=True)
    for what, d in zip([n for n, _ in rule.named_parameters()] + ["input"] * len(leaves), got):
        assert torch.isfinite(d).all(), what
    if zero == "one tensor":
        assert all(d.abs().sum() > 0 for d in got[: len(weights)])


# ---- the per-tensor step factor (UpdateConfig.tensor_log_scale) --------------------------------------


def _growing_rule(**config) -> LearnedUpdate:
    """A rule that is Adam but for a per-tensor step factor that asks for the most it may grow
    (e^3), in float64."""
    rule = fresh_rule(tensor_log_scale=3.0, **config).double()
    with torch.no_grad():
        rule.tensor_head[-1].bias.fill_(20.0)
    return rule


def _step_ratios(rule: LearnedUpdate, grads: Callable[[int], list[torch.Tensor]], steps: int) -> torch.Tensor:
    """Per step and tensor of an MLP's space, ‖Δ‖/‖Δ_adam‖, Δ_adam torch's Adam's step (lr = the
    rule's α) from the same parameters and gradients ``grads(step)``: (steps, tensors)."""
    f = rule.config.features
    spec = mlp_spec([5, 6, 4])
    g = torch.Generator().manual_seed(10)
    params = [torch.randn(t.shape, generator=g, dtype=torch.float64) for t in spec.tensors]
    states = [init_state(p, f) for p in params]
    twins = [p.clone().requires_grad_() for p in params]
    adam = torch.optim.Adam(twins, lr=rule.scalars()[0].item(), betas=(f.momentum_decays[f.adam_momentum], f.beta2), eps=f.eps)
    ratios = []
    with torch.no_grad():
        for t in range(steps):
            gs = grads(t)
            new, states, _ = rule(spec, params, gs, states)
            for twin, grad in zip(twins, gs):
                twin.grad = grad
            adam.step()
            ratios.append(torch.stack([(a - p).norm() / (b - p).norm() for a, b, p in zip(new, twins, params)]))
            params = new
            for p, twin in zip(params, twins):
                twin.copy_(p)
    return torch.stack(ratios)


def test_the_per_tensor_step_grows_only_where_the_tensor_has_signal():
    """A per-tensor factor that asks for e^3: under a gradient that never changes, each tensor's
    step is Adam's while the margin of the signal-to-noise gate holds it (steps 1 to 8), then grows
    step by step towards e^(3·S), S → 1/(1 + κ²) = 0.8 (past e^2.1 by step 40); under pure noise it
    stays within Adam's for 300 steps; without the gate it is e^3 times Adam's under noise too."""
    spec = mlp_spec([5, 6, 4])
    g = torch.Generator().manual_seed(11)
    fixed = [torch.randn(t.shape, generator=g, dtype=torch.float64) for t in spec.tensors]
    noise = lambda t: [torch.randn(s.shape, generator=g, dtype=torch.float64) for s in spec.tensors]  # noqa: E731
    gated = _growing_rule(snr_gate=0.5, snr_margin=8.0)
    ratios = _step_ratios(gated, lambda t: fixed, 40)
    assert torch.allclose(ratios[:8], torch.ones_like(ratios[:8]), atol=1e-9), ratios[:8]
    assert (ratios[8:].diff(dim=0) > 0).all() and (ratios[-1] > math.exp(2.1)).all(), ratios
    assert (ratios <= math.exp(3.0 * 0.8) + 1e-9).all()
    assert (_step_ratios(gated, noise, 300) <= 1 + 1e-9).all()
    assert torch.allclose(_step_ratios(_growing_rule(), noise, 20), torch.full((20, 4), math.exp(3.0), dtype=torch.float64), rtol=1e-9)


def test_the_per_tensor_step_can_shrink_under_noise():
    """Decreases are not gated: a factor that asks for e^-3 gives e^-3 times Adam's step from step
    1, under pure noise and with the gate."""
    rule = fresh_rule(tensor_log_scale=3.0, snr_gate=0.5, snr_margin=8.0).double()
    with torch.no_grad():
        rule.tensor_head[-1].bias.fill_(-20.0)
    g = torch.Generator().manual_seed(12)
    spec = mlp_spec([5, 6, 4])
    noise = lambda t: [torch.randn(s.shape, generator=g, dtype=torch.float64) for s in spec.tensors]  # noqa: E731
    assert torch.allclose(_step_ratios(rule, noise, 10), torch.full((10, 4), math.exp(-3.0), dtype=torch.float64), rtol=1e-9)


def test_pure_noise_moves_parameters_no_further_with_a_per_tensor_step():
    """300 steps of pure noise: with the signal-to-noise gate, a per-tensor factor that asks for
    e^3 leaves the parameters where Adam's steps take them (to rounding) and their norm no larger;
    ungated, it moves them e^3 times as far."""
    start, adam = _noise_walk(fresh_rule().double())
    _, gated = _noise_walk(_growing_rule(snr_gate=0.5, snr_margin=8.0))
    _, free = _noise_walk(_growing_rule())
    assert (gated - adam).abs().max() < 1e-12 and gated.norm() <= adam.norm() * (1 + 1e-12)
    assert (free - start).norm() > 10 * (adam - start).norm()


def test_noise_level_gradients_step_no_further_than_adam_with_a_per_tensor_step():
    """A bias whose gradients are pure noise at 1e-7 of the rest's (a conv bias before BatchNorm):
    a per-tensor factor that asks for e^3 leaves its steps Adam's, to 2e-3 of α, over 20 steps
    (its slow momentum's mean square falls below the features' RMS floor, which the gate must not
    read as signal); a constant gradient at the same scale still grows its step past e^2."""
    rule = _growing_rule(gate_floor=1e-3, snr_gate=0.5, snr_margin=8.0)
    ours, adam = _noise_steps(rule)
    alpha = rule.scalars()[0].item()
    assert (ours <= adam * 1.002 + 2e-3 * alpha).all(), float((ours - adam).max() / alpha)
    g = torch.Generator().manual_seed(13)
    fixed = [torch.randn(t.shape, generator=g, dtype=torch.float64) * 1e-7 for t in mlp_spec([5, 6, 4]).tensors]
    assert (_step_ratios(rule, lambda t: fixed, 40)[-1] > math.exp(2.0)).all()
