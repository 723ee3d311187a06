"""The learned update rule: Adam at initialisation, bounded steps, sign-flip equivariance.

Its checkpoint files are tested with the rest of checkpoint IO, in ``tests/test_io.py``."""

from __future__ import annotations

import pytest
import torch

from nfopt.optim.features import init_state
from nfopt.optim.rule import LearnedUpdate, UpdateConfig
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


def test_a_batch_of_weight_spaces_steps_each_as_alone() -> None:
    """One rule call on a batch of weight spaces (different models, with and without sign flips)
    gives every tensor the update and statistics it gets when its space is stepped alone, in
    float64 to 1e-10; joined without the batch's components, the global term would couple them."""
    from ..test_reference_equivalence import assert_close, random_rule
    from nfopt.weight_space import WeightSpaceSpec, as_monomial, batch

    rule = random_rule(0, sign_flips=True)
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
    spaces = batch([as_monomial(s).space for s in specs])
    one_space = WeightSpaceSpec(spaces.tensors)  # the same sets, but one component
    coupled = rule(one_space, *args)
    plain = rule(spaces, *args)
    assert any((a - b).abs().max() > 1e-6 for a, b in zip(coupled[0], plain[0]))
