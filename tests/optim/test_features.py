"""Optimizer features: statistics, normalisation and the context of invariants."""

from __future__ import annotations

import pytest
import torch

from nfopt.optim.features import FeatureConfig, adam_direction, features, init_state, inverse_rms, update_statistics

CFG = FeatureConfig()


def run(grads, p):
    state = init_state(p, CFG)
    one = torch.ones((), dtype=p.dtype)
    for g in grads:
        state = update_statistics(g, state, CFG, one)
    return state


def test_statistics_match_their_definitions():
    torch.manual_seed(0)
    p = torch.randn(5, 3, dtype=torch.float64)
    grads = [torch.randn(5, 3, dtype=torch.float64) for _ in range(6)]
    state = run(grads, p)
    for i, decay in enumerate(CFG.momentum_decays):
        m = torch.zeros_like(p)
        for g in grads:
            m = decay * m + (1 - decay) * g
        assert torch.allclose(state["momenta"][i], m)
    v = torch.zeros_like(p)
    for g in grads:
        v = CFG.beta2 * v + (1 - CFG.beta2) * g * g
    assert torch.allclose(state["v"], v)
    assert state["step"].item() == 6


def test_held_statistics_do_not_move():
    p = torch.randn(4)
    state = run([torch.randn(4)], p)
    held = update_statistics(torch.randn(4), state, CFG, torch.zeros(()))
    for k in state:
        assert torch.equal(held[k], state[k])


def normalise(x):
    return x * inverse_rms(x, CFG.rms_eps).reshape(-1, 1, 1)


def test_rms_normalisation_is_scale_free_and_finite_at_zero():
    x = torch.randn(3, 10, 4, dtype=torch.float64)
    y = normalise(x)
    assert torch.allclose(y.square().mean((1, 2)), torch.ones(3, dtype=torch.float64), atol=1e-9)
    assert torch.allclose(normalise(1000 * x), y)
    zero = torch.zeros(2, 5, 1, requires_grad=True)
    normalise(zero).sum().backward()
    assert torch.isfinite(zero.grad).all()


def test_features_shape_and_horizon_free_context():
    p = torch.randn(6, 2)
    state = run([torch.randn(6, 2) for _ in range(3)], p)
    u, root_v = adam_direction(state, CFG)
    x, inv, ctx = features(p, torch.randn(6, 2), state, u, root_v, CFG)
    assert x.shape == (CFG.channels, 6, 2) and inv.shape == (CFG.channels,)
    assert ctx.shape == (CFG.context_channels,)
    assert torch.allclose(ctx[: len(CFG.time_scales)], torch.tanh(3 / torch.tensor(CFG.time_scales)))
    assert torch.isfinite(x).all()
    assert torch.allclose(ctx[-1], 0.1 * p.square().mean().sqrt().log())


def test_adam_direction_at_step_zero_is_zero():
    state = init_state(torch.randn(3), CFG)
    u, root_v = adam_direction(state, CFG)
    assert torch.count_nonzero(u) == 0 and root_v.max() < 1e-14


def test_meta_gradient_is_finite_where_a_gradient_is_exactly_zero():
    p = torch.zeros(3)
    g = torch.tensor([0.0, 1.0, -2.0], requires_grad=True)
    state = update_statistics(g, init_state(p, CFG), CFG, torch.ones(()))
    u, root_v = adam_direction(state, CFG)
    (u.sum() + root_v.sum()).backward()
    assert torch.isfinite(g.grad).all()


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"momentum_decays": (0.5, 1.0)}, "momentum decays"),
        ({"adam_momentum": 5}, "not an index"),
        ({"beta2": 1.0}, "beta2"),
        ({"eps": 0.0}, "positive"),
    ],
)
def test_bad_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        FeatureConfig(**kwargs)


def test_config_round_trips():
    cfg = FeatureConfig(momentum_decays=(0.9, 0.99), adam_momentum=0)
    assert FeatureConfig.from_dict(cfg.to_dict()) == cfg
