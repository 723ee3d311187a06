"""Optimizer features: statistics, normalisation and the context of invariants, computed for a
bucket of B same-shape tensors at once (each member as if alone)."""

from __future__ import annotations

import pytest
import torch

from nfopt.optim.features import (
    FeatureConfig, adam_direction, features, init_state, inverse_rms, polar_factor, snr_scales, update_statistics,
)

CFG = FeatureConfig()


def stacked(*states: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per-tensor statistics stacked into a bucket's (B, ...) statistics."""
    return {k: torch.stack([s[k] for s in states]) for k in states[0]}


def run(grads: list[torch.Tensor], p: torch.Tensor) -> dict[str, torch.Tensor]:
    """The statistics of ``p`` (a bucket of one) after seeing ``grads``."""
    state = stacked(init_state(p, CFG))
    one = torch.ones(1, dtype=p.dtype)
    for g in grads:
        state = update_statistics(g.unsqueeze(0), state, CFG, one)
    return state


def ewma(values: list[torch.Tensor], decay: float) -> torch.Tensor:
    """decay·m + (1 - decay)·x over ``values``, from zero."""
    m = torch.zeros_like(values[0])
    for x in values:
        m = decay * m + (1 - decay) * x
    return m


def test_statistics_match_their_definitions():
    torch.manual_seed(0)
    p = torch.randn(5, 3, dtype=torch.float64)
    grads = [torch.randn(5, 3, dtype=torch.float64) for _ in range(6)]
    state = run(grads, p)
    for i, decay in enumerate(CFG.momentum_decays):
        assert torch.allclose(state["momenta"][0, i], ewma(grads, decay))
    assert torch.allclose(state["v"][0], ewma([g * g for g in grads], CFG.beta2))
    assert state["step"].item() == 6


def test_members_of_a_bucket_are_updated_as_if_alone_and_a_held_one_does_not_move():
    torch.manual_seed(2)
    ps = [torch.randn(4, dtype=torch.float64) for _ in range(3)]
    alone = [run([torch.randn(4, dtype=torch.float64)], p) for p in ps]
    g = torch.randn(3, 4, dtype=torch.float64)
    ok = torch.tensor([1.0, 0.0, 1.0], dtype=torch.float64)
    new = update_statistics(g, stacked(*({k: v[0] for k, v in a.items()} for a in alone)), CFG, ok)
    for i, a in enumerate(alone):
        expected = a if not ok[i] else update_statistics(g[i : i + 1], a, CFG, ok[i : i + 1])
        for k in new:
            assert torch.equal(new[k][i], expected[k][0]), (i, k)
    assert not torch.equal(new["v"][0], alone[0]["v"][0])


def normalise(x: torch.Tensor) -> torch.Tensor:
    return x * inverse_rms(x, CFG.rms_eps).reshape(*x.shape[:2], 1, 1)


def test_rms_normalisation_is_per_member_and_channel_scale_free_and_finite_at_zero():
    x = torch.randn(2, 3, 10, 4, dtype=torch.float64)
    y = normalise(x)
    assert torch.allclose(y.square().mean((2, 3)), torch.ones(2, 3, dtype=torch.float64), atol=1e-9)
    assert torch.allclose(normalise(x * torch.tensor([1000.0, 1e-3], dtype=torch.float64).reshape(2, 1, 1, 1)), y)
    zero = torch.zeros(1, 2, 5, 1, requires_grad=True)
    normalise(zero).sum().backward()
    assert torch.isfinite(zero.grad).all()


def test_features_are_the_documented_channels_and_context():
    """p, g, each momentum, sqrt(v̂), Adam's direction m̂/(sqrt(v̂)+eps); the inverse RMS of each over
    the tensor; context tanh(t/s) and the log-RMS of p: a function of the step count and p alone, no horizon."""
    torch.manual_seed(0)
    p = torch.randn(6, 2, dtype=torch.float64)
    grads = [torch.randn(6, 2, dtype=torch.float64) for _ in range(3)]
    state = run(grads, p)
    u, root_v = adam_direction(state, CFG)
    x, inv, ctx = (a[0] for a in features(p.unsqueeze(0), grads[-1].unsqueeze(0), state, u, root_v, CFG))

    t = len(grads)
    momenta = [ewma(grads, d) for d in CFG.momentum_decays]
    v_hat = ewma([g * g for g in grads], CFG.beta2) / (1 - CFG.beta2**t)
    m_hat = momenta[CFG.adam_momentum] / (1 - CFG.momentum_decays[CFG.adam_momentum] ** t)
    expected = torch.stack([p, grads[-1], *momenta, v_hat.sqrt(), m_hat / (v_hat.sqrt() + CFG.eps)])
    assert torch.allclose(x, expected, rtol=1e-10, atol=1e-14)
    rms = (expected.reshape(CFG.channels, -1).square().mean(1) + CFG.rms_eps).sqrt()
    assert torch.allclose(inv, 1 / rms, rtol=1e-10)
    time_scales = torch.tensor(CFG.time_scales, dtype=torch.float64)
    assert torch.allclose(ctx, torch.cat([torch.tanh(t / time_scales), 0.1 * rms[:1].log()]), rtol=1e-10)


def test_adam_direction_is_the_step_of_torch_adam_at_learning_rate_one():
    torch.manual_seed(1)
    p = torch.randn(5, 3, dtype=torch.float64)
    q = p.clone().requires_grad_()
    adam = torch.optim.Adam([q], lr=1.0, betas=(CFG.momentum_decays[CFG.adam_momentum], CFG.beta2), eps=CFG.eps)
    state = stacked(init_state(p, CFG))
    for _ in range(5):
        g = torch.randn(5, 3, dtype=torch.float64)
        state = update_statistics(g.unsqueeze(0), state, CFG, torch.ones(1, dtype=p.dtype))
        u, _ = adam_direction(state, CFG)
        before = q.detach().clone()
        q.grad = g
        adam.step()
        assert torch.allclose(before - q.detach(), u[0], rtol=1e-9, atol=1e-12)


def test_adam_direction_at_step_zero_is_zero():
    state = stacked(init_state(torch.randn(3), CFG))
    u, root_v = adam_direction(state, CFG)
    assert torch.count_nonzero(u) == 0 and root_v.max() < 1e-14


def test_meta_gradient_is_finite_where_a_gradient_is_exactly_zero():
    p = torch.zeros(3)
    g = torch.tensor([[0.0, 1.0, -2.0]], requires_grad=True)
    state = update_statistics(g, stacked(init_state(p, CFG)), CFG, torch.ones(1))
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


@pytest.mark.parametrize("margin", [0.5, 1.0, 8.0])
def test_snr_scales_take_out_the_share_of_rho_squared_that_pure_noise_gives(margin: float) -> None:
    """The signal-to-noise gate's q = (c·m/σ)² - b, for the slow momentum m of gradients that
    are pure noise of variance σ², has expectation (1 - K)·n_t/(1 - n_t), n_t = Σ w_i² the squared
    weights the bias-corrected momentum gives the t gradients (0 for K = 1: q is unbiased); and for a
    constant gradient (m bias-corrected = g, ρ = 1) q = (1 - K·n_t)/(1 - n_t). At step 1 c = b = 0.
    Without a margin, c is the bias correction's inverse and b = 0."""
    d = CFG.momentum_decays[-1]
    steps = torch.arange(1, 200, dtype=torch.float64)
    c, b = snr_scales(steps, CFG, margin)
    assert c[0] == 0 and b[0] == 0
    for t, ct, bt in zip(steps[1:].tolist(), c[1:].tolist(), b[1:].tolist()):
        raw = (1 - d) * d ** torch.arange(int(t), dtype=torch.float64)  # the raw momentum's weights
        n = float((raw / (1 - d**t)).square().sum())
        noise = ct**2 * float(raw.square().sum()) - bt  # E[(c·m)²] - b at σ = 1
        assert noise == pytest.approx((1 - margin) * n / (1 - n), rel=1e-9, abs=1e-12), t
        assert (ct * (1 - d**t)) ** 2 - bt == pytest.approx((1 - margin * n) / (1 - n), rel=1e-9, abs=1e-12), t
    c, b = snr_scales(steps, CFG, 0.0)
    assert torch.allclose(c, 1 / (1 - d**steps), rtol=1e-15) and (b == 0).all()


@pytest.mark.parametrize("shape", [(6, 4), (3, 7), (5, 2, 3, 3), (9,), ()])
def test_the_polar_factor_keeps_the_singular_vectors_and_evens_out_the_singular_values(shape) -> None:
    """Each member's polar factor, read as a matrix (first dimension by the rest), has M's
    singular vectors (Uᵀ·X·V is diagonal to rounding) and singular values within [0.6, 1.25] of 1
    however spread M's are (here 1e-2 to 1); it is 0 for a zero tensor."""
    g = torch.Generator().manual_seed(0)
    m = torch.randn(3, *shape, generator=g, dtype=torch.float64)
    flat = m.reshape(3, shape[0] if shape else 1, -1)
    u, _, vh = torch.linalg.svd(flat, full_matrices=False)
    spread = torch.logspace(-2, 0, u.shape[-1], dtype=torch.float64)
    m = (u * spread[None, None]) @ vh
    x = polar_factor(m.reshape(3, *shape), CFG.rms_eps).reshape(flat.shape)
    core = u.transpose(1, 2) @ x @ vh.transpose(1, 2)
    diagonal = torch.diagonal(core, dim1=1, dim2=2)
    assert (core - torch.diag_embed(diagonal)).abs().max() < 1e-9
    assert diagonal.min() > 0.6 and diagonal.max() < 1.25, diagonal
    assert (polar_factor(torch.zeros(2, *shape), CFG.rms_eps) == 0).all()


def test_the_polar_factor_commutes_with_permutations_and_sign_flips_of_rows_and_columns() -> None:
    """polar(P·D·M·E·Q) = P·D·polar(M)·E·Q for permutations P, Q and sign flips D, E; the same
    check on a row-wise normalisation of M (which does not mix rows) passes, and on a
    column-coupling map that is not equivariant (a cumulative sum over rows) fails."""
    g = torch.Generator().manual_seed(1)
    m = torch.randn(2, 5, 7, generator=g, dtype=torch.float64)
    rows, cols = torch.randperm(5, generator=g), torch.randperm(7, generator=g)
    d = torch.where(torch.rand(5, 1, generator=g) < 0.5, -1.0, 1.0).double()
    e = torch.where(torch.rand(1, 7, generator=g) < 0.5, -1.0, 1.0).double()
    act = lambda t: (d * t * e)[:, rows][:, :, cols]  # noqa: E731
    for f, equivariant in ((lambda t: polar_factor(t, CFG.rms_eps), True), (lambda t: t.cumsum(1), False)):
        gap = (f(act(m)) - act(f(m))).abs().max()
        assert (gap < 1e-10) if equivariant else (gap > 1e-3)


def test_the_polar_channel_comes_after_the_momenta_and_is_left_out_of_the_dict_where_off() -> None:
    """With ``polar`` the features have one more channel, the (RMS-normalised) polar factor of
    Adam's momentum, between the momenta and sqrt(v̂), so sqrt(v̂) and u stay the last two; a
    config without it writes the dict it wrote before the option existed."""
    cfg = FeatureConfig(polar=True)
    assert cfg.channels == CFG.channels + 1 and "polar" not in CFG.to_dict() and cfg.to_dict()["polar"] is True
    assert FeatureConfig.from_dict(cfg.to_dict()) == cfg
    g = torch.Generator().manual_seed(2)
    p = torch.randn(1, 4, 6, generator=g)
    state = run([torch.randn(4, 6, generator=g) for _ in range(3)], p[0])
    u, root_v = adam_direction(state, cfg)
    grad = torch.randn(1, 4, 6, generator=g)
    x, inv, _ = features(p, grad, state, u, root_v, cfg)
    plain, _, _ = features(p, grad, state, u, root_v, CFG)
    k = 2 + len(cfg.momentum_decays)
    polar = polar_factor(state["momenta"][:, cfg.adam_momentum], cfg.rms_eps)
    assert torch.allclose(x[:, k], polar) and torch.equal(x[:, k + 1:], plain[:, k:]) and torch.equal(x[:, :k], plain[:, :k])
    assert torch.allclose(inv[:, k], inverse_rms(polar.unsqueeze(1), cfg.rms_eps)[:, 0])
