"""The library's update rule computes the math of the plain specification in ``tests/reference.py``.

On every model of the labelling zoo (as ``label_model`` couples it, and as independent tensors),
on the sign-flip spaces of the zoo's models whose tanh neurons can flip (with rules that take the
flips and rules that ignore them), and on synthetic spaces that reach what the zoo does not
(scalars, fixed-only tensors, labelled axes after fixed ones, every neighbour relation): in
float64, from random parameters, gradients and a few steps' worth of statistics, with a rule whose
every weight is random, the new parameters and statistics agree to 1e-10 of their scale, and so do
the meta-gradients of a scalar function of the new parameters with respect to every rule weight
and to the parameters, gradients, momenta and second moments that went in. The specification
itself is checked against torch's AdamW where the rule is Adam.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
import torch
from torch import Tensor

from nfopt.labelling import label_model, label_monomial
from nfopt.optim.features import init_state
from nfopt.optim import fused as fused_module
from nfopt.optim import rule as rule_module
from nfopt.optim.rule import LearnedUpdate
from nfopt.weight_space import MonomialSpec, WeightSpaceSpec

from . import reference
from .rules import fresh_rule
from .weight_spaces import every_relation_spec, random_spec
from .zoo import ZOO

TOL = 1e-10

CONFIGS: list[dict] = [
    {},
    {"activation": "gelu", "n_layers": 3, "hidden_channels": 5, "alpha": 0.03, "gamma": 1.0, "max_log_scale": 0.3},
    {"activation": "tanh", "alpha": 0.01, "beta": 3.0, "max_deviation": 0.3},
]
"""Rule shapes the cases cycle through: the default; a deeper GELU NFN whose step-size clamp binds on
some elements; a tanh NFN whose direction bound binds."""

SIGN_MODELS = ("mlp2_tanh", "shared_layer", "train_only_flip", "weird")
"""The zoo's models with tanh neurons that can flip (the others' tanh neurons sit on a residual
stream or feed an output); ``test_sign_models_are_the_zoo_models_whose_neurons_flip`` keeps this
list honest."""


def _labelled(name: str) -> WeightSpaceSpec:
    model, x = ZOO[name]()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # models the labeller understands only in part warn
        return label_model(model, (x,)).params


def _independent(name: str) -> WeightSpaceSpec:
    model, _ = ZOO[name]()
    return WeightSpaceSpec.independent(list(model.parameters()))


def _signs(name: str) -> MonomialSpec:
    model, x = ZOO[name]()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return label_monomial(model, (x,)).params.only("sign")


@dataclass(frozen=True)
class Case:
    """A weight space, the shape of the rule that steps it, and which gradient (if any) holds a NaN."""

    spec: Callable[[], WeightSpaceSpec | MonomialSpec]
    config: dict = field(default_factory=dict)
    nonfinite: int | None = None


def _cases() -> dict[str, Case]:
    cases: dict[str, Case] = {}
    for i, name in enumerate(sorted(ZOO)):
        cases[f"zoo-{name}"] = Case(lambda name=name: _labelled(name), CONFIGS[i % len(CONFIGS)])
        cases[f"independent-{name}"] = Case(lambda name=name: _independent(name), CONFIGS[(i + 1) % len(CONFIGS)])
    for i, name in enumerate(SIGN_MODELS):
        config = CONFIGS[i % len(CONFIGS)]
        cases[f"signs-{name}"] = Case(lambda name=name: _signs(name), {**config, "sign_flips": True})
        cases[f"signs-{name}-ignored"] = Case(lambda name=name: _signs(name), config)
    cases["nan-zoo-cnn_flatten"] = Case(lambda: _labelled("cnn_flatten"), CONFIGS[1], nonfinite=4)
    cases["nan-signs-mlp2_tanh"] = Case(lambda: _signs("mlp2_tanh"), {"sign_flips": True}, nonfinite=2)
    cases["every_relation"] = Case(every_relation_spec, CONFIGS[1])
    cases["per_element-every_relation"] = Case(every_relation_spec, {"pooled": False})
    cases["per_element_last-every_relation"] = Case(every_relation_spec, {"pooled_last": False})
    cases["per_element_last-zoo-cnn_flatten"] = Case(lambda: _labelled("cnn_flatten"), {**CONFIGS[1], "pooled_last": False})
    for seed in range(3):
        cases[f"random{seed}"] = Case(lambda seed=seed: random_spec(seed), CONFIGS[seed])
    # the gate on the learned part: floors where it is near 1, near 0, and in between
    cases["gated-zoo-cnn_flatten"] = Case(lambda: _labelled("cnn_flatten"), {**CONFIGS[1], "gate_floor": 0.5})
    cases["gated-independent-mlp2_tanh"] = Case(lambda: _independent("mlp2_tanh"), {"gate_floor": 0.05})
    cases["gated-signs-mlp2_tanh"] = Case(lambda: _signs("mlp2_tanh"), {**CONFIGS[2], "sign_flips": True, "gate_floor": 2.0})
    cases["gated-nan-signs-weird"] = Case(lambda: _signs("weird"), {"sign_flips": True, "gate_floor": 0.3}, nonfinite=1)
    cases["gated-every_relation"] = Case(every_relation_spec, {"pooled_last": False, "gate_floor": 0.5})
    cases["gated-random1"] = Case(lambda: random_spec(1), {**CONFIGS[1], "gate_floor": 1.0})
    # the signal-to-noise factor of the gate, alone and with the floor's
    cases["snr-zoo-cnn_flatten"] = Case(lambda: _labelled("cnn_flatten"), {**CONFIGS[1], "snr_gate": 0.5})
    cases["snr-gated-independent-mlp2_tanh"] = Case(lambda: _independent("mlp2_tanh"), {"gate_floor": 0.05, "snr_gate": 0.25})
    cases["snr-signs-mlp2_tanh"] = Case(lambda: _signs("mlp2_tanh"), {"sign_flips": True, "snr_gate": 0.3})
    cases["snr-gated-signs-mlp2_tanh"] = Case(
        lambda: _signs("mlp2_tanh"), {**CONFIGS[2], "sign_flips": True, "gate_floor": 2.0, "snr_gate": 1.0}
    )
    cases["snr-nan-signs-weird"] = Case(lambda: _signs("weird"), {"sign_flips": True, "snr_gate": 0.3}, nonfinite=1)
    cases["snr-gated-nan-zoo-cnn_flatten"] = Case(
        lambda: _labelled("cnn_flatten"), {"gate_floor": 0.3, "snr_gate": 0.5}, nonfinite=2
    )
    cases["snr-gated-every_relation"] = Case(every_relation_spec, {"pooled_last": False, "gate_floor": 0.5, "snr_gate": 0.5})
    # the factor's margin, which takes noise's share out of ρ² (so that it is 0 at step 1)
    cases["snr-margin-zoo-cnn_flatten"] = Case(lambda: _labelled("cnn_flatten"), {**CONFIGS[1], "snr_gate": 0.5, "snr_margin": 1.0})
    cases["snr-margin-gated-signs-mlp2_tanh"] = Case(
        lambda: _signs("mlp2_tanh"), {"sign_flips": True, "gate_floor": 0.05, "snr_gate": 0.3, "snr_margin": 0.5}
    )
    cases["snr-margin-nan-independent-mlp2_tanh"] = Case(
        lambda: _independent("mlp2_tanh"), {"snr_gate": 0.25, "snr_margin": 0.5}, nonfinite=1
    )
    # the polar factor of Adam's momentum as one more input channel
    cases["polar-zoo-cnn_flatten"] = Case(lambda: _labelled("cnn_flatten"), {**CONFIGS[1], "features": {"polar": True}})
    cases["polar-signs-mlp2_tanh"] = Case(lambda: _signs("mlp2_tanh"), {"sign_flips": True, "features": {"polar": True}})
    cases["polar-gated-every_relation"] = Case(
        every_relation_spec, {"pooled_last": False, "gate_floor": 0.5, "snr_gate": 0.5, "features": {"polar": True}}
    )
    cases["tensor-zoo-cnn_flatten"] = Case(lambda: _labelled("cnn_flatten"), {**CONFIGS[1], "tensor_log_scale": 2.0})
    cases["tensor-snr-signs-mlp2_tanh"] = Case(
        lambda: _signs("mlp2_tanh"), {"sign_flips": True, "snr_gate": 0.3, "snr_margin": 0.5, "tensor_log_scale": 1.5}
    )
    cases["tensor-gated-random1"] = Case(
        lambda: random_spec(1), {**CONFIGS[1], "gate_floor": 1.0, "snr_gate": 0.5, "tensor_log_scale": 3.0}, nonfinite=2
    )
    # the momentum the factor reads is the last of the decays, here not the slowest nor Adam's
    cases["snr-decays-random0"] = Case(
        lambda: random_spec(0), {"features": {"momentum_decays": (0.95, 0.5), "adam_momentum": 0}, "snr_gate": 0.5}
    )
    return cases


CASES = _cases()


def random_rule(seed: int, **config) -> LearnedUpdate:
    """A float64 rule of this config with every weight random: biases, the last layer, log-scalars."""
    rule = fresh_rule(**config).double()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for w in rule.parameters():
            w.copy_(torch.randn(w.shape, generator=g, dtype=torch.float64) * 0.4)
        if config.get("tensor_log_scale"):  # a per-tensor factor that varies across tensors, mostly above 1
            rule.tensor_head[0].weight.mul_(5)
            rule.tensor_head[-1].bias.fill_(0.5)
    return rule


@dataclass
class Inputs:
    """What one step of a rule reads."""

    params: list[Tensor]
    grads: list[Tensor]
    states: list[dict[str, Tensor]]
    lrs: list[float]
    weight_decays: list[float]

    def differentiable(self) -> tuple[Inputs, list[Tensor], list[str]]:
        """A copy whose parameters, gradients, momenta and second moments are fresh leaves that
        require grad; those leaves; and what each is (the step counters stay counters)."""
        params = [p.clone().requires_grad_() for p in self.params]
        grads = [g.clone().requires_grad_() for g in self.grads]
        states = [
            {"step": s["step"], "momenta": s["momenta"].clone().requires_grad_(), "v": s["v"].clone().requires_grad_()}
            for s in self.states
        ]
        leaves = params + grads + [s[key] for s in states for key in ("momenta", "v")]
        names = [f"param {i}" for i in range(len(params))] + [f"grad {i}" for i in range(len(grads))]
        names += [f"{key} {i}" for i in range(len(states)) for key in ("momenta", "v")]
        return Inputs(params, grads, states, self.lrs, self.weight_decays), leaves, names


def random_inputs(rule: LearnedUpdate, space: WeightSpaceSpec, seed: int, nonfinite: int | None) -> Inputs:
    """Parameters and gradients of a different scale per tensor; statistics after 0-3 earlier steps
    (tensor i after i mod 4, so some start fresh); the first element of the first tensor's gradient
    0 at every step (so v = 0 and u = 0 there: the sqrt floor and sign(0) act); a NaN in the last
    element of gradient ``nonfinite``; learning-rate multipliers and weight decays per tensor."""
    f = rule.config.features
    g = torch.Generator().manual_seed(seed)

    def randn(shape: tuple[int, ...]) -> Tensor:
        scale = 10 ** (2 * torch.rand((), generator=g, dtype=torch.float64) - 1)
        return torch.randn(shape, generator=g, dtype=torch.float64) * scale

    def gradient(ti: int, shape: tuple[int, ...]) -> Tensor:
        grad = randn(shape)
        if ti == 0 and grad.numel():
            grad.view(-1)[0] = 0.0
        return grad

    params, grads, states = [], [], []
    for ti, t in enumerate(space.tensors):
        p = randn(t.shape)
        state = init_state(p, f)
        for _ in range(ti % 4):
            state = reference.updated_statistics(gradient(ti, t.shape), state, f.momentum_decays, f.beta2)
        grad = gradient(ti, t.shape)
        if ti == nonfinite:
            grad.view(-1)[-1] = float("nan")
        params.append(p)
        grads.append(grad)
        states.append(state)
    lrs = (torch.rand(len(params), generator=g, dtype=torch.float64) + 0.5).tolist()
    weight_decays = [0.1 * (i % 3) for i in range(len(params))]
    return Inputs(params, grads, states, lrs, weight_decays)


StepResult = tuple[list[Tensor], list[dict[str, Tensor]], list]
"""New parameters, new statistics, and per-tensor finite flags (0-d tensors or bools)."""


def library_step(rule: LearnedUpdate, spec: WeightSpaceSpec | MonomialSpec, x: Inputs) -> StepResult:
    """One step as the library computes it."""
    return rule(spec, x.params, x.grads, x.states, x.lrs, x.weight_decays)


def reference_step(rule: LearnedUpdate, spec: WeightSpaceSpec | MonomialSpec, x: Inputs) -> StepResult:
    """One step as the specification computes it."""
    return reference.learned_update(rule, spec, x.params, x.grads, x.states, x.lrs, x.weight_decays)


def assert_close(got: Tensor, expected: Tensor, what: str) -> None:
    """Agreement to TOL of the larger of the two tensors' largest magnitudes (so exact where both are 0)."""
    assert got.shape == expected.shape, what
    if got.numel():
        scale = max(got.abs().max().item(), expected.abs().max().item())
        error = (got - expected).abs().max().item()
        assert error <= TOL * scale, f"{what}: error {error:.3g} at scale {scale:.3g}"


def test_sign_models_are_the_zoo_models_whose_neurons_flip() -> None:
    assert {name for name in ZOO if _signs(name).symmetries} == set(SIGN_MODELS)


@pytest.mark.parametrize("name", sorted(CASES))
def test_step_and_meta_gradients_match_the_reference(name: str) -> None:
    case = CASES[name]
    spec = case.spec()
    space = spec.space if isinstance(spec, MonomialSpec) else spec
    seed = sorted(CASES).index(name)
    rule = random_rule(seed, **case.config)
    inputs = random_inputs(rule, space, seed, case.nonfinite)
    g = torch.Generator().manual_seed(seed)
    weights = [torch.randn(t.shape, generator=g, dtype=torch.float64) for t in space.tensors]

    results = []
    for step in (library_step, reference_step):
        x, leaves, leaf_names = inputs.differentiable()
        new_params, new_states, oks = step(rule, spec, x)
        loss = sum((w * p.square()).sum() for w, p in zip(weights, new_params))
        grads = torch.autograd.grad(loss, [*rule.parameters(), *leaves], allow_unused=True, materialize_grads=True)
        results.append(([p.detach() for p in new_params], new_states, [bool(ok) for ok in oks], grads))
    (p_lib, s_lib, ok_lib, g_lib), (p_ref, s_ref, ok_ref, g_ref) = results

    assert ok_lib == ok_ref == [i != case.nonfinite for i in range(len(space))]
    for i, t in enumerate(space.tensors):
        assert_close(p_lib[i], p_ref[i], f"new {t.name}")
        for key in ("step", "momenta", "v"):
            assert_close(s_lib[i][key].detach(), s_ref[i][key].detach(), f"{key} of {t.name}")
    names = [f"d/d {n}" for n, _ in rule.named_parameters()] + [f"d/d {n}" for n in leaf_names]
    for what, a, b in zip(names, g_lib, g_ref, strict=True):
        assert_close(a, b, what)
    if case.nonfinite is not None:
        held = case.nonfinite
        assert torch.equal(p_lib[held], inputs.params[held])
        assert all(torch.equal(s_lib[held][k].detach(), inputs.states[held][k]) for k in ("step", "momenta", "v"))


def test_the_reference_of_a_fresh_rule_is_adamw() -> None:
    """With the NFN's last layer zero the specification is AdamW at learning rate lr·α, as documented."""
    rule = fresh_rule().double()
    f = rule.config.features
    g = torch.Generator().manual_seed(0)
    params = [torch.randn(4, 3, generator=g, dtype=torch.float64), torch.randn(4, generator=g, dtype=torch.float64)]
    spec = WeightSpaceSpec.independent(params)
    states = [init_state(p, f) for p in params]
    lr, wd = 2.0, 0.1
    ref = [p.clone().requires_grad_() for p in params]
    adamw = torch.optim.AdamW(
        ref, lr=lr * rule.config.alpha, betas=(f.momentum_decays[f.adam_momentum], f.beta2), eps=f.eps, weight_decay=wd
    )
    with torch.no_grad():
        for _ in range(5):
            grads = [torch.randn(p.shape, generator=g, dtype=torch.float64) for p in params]
            params, states, _ = reference.learned_update(rule, spec, params, grads, states, [lr] * 2, [wd] * 2)
            for r, grad in zip(ref, grads):
                r.grad = grad
            adamw.step()
    for p, r in zip(params, ref):
        assert_close(p, r.detach(), "AdamW")


IN_PLACE_PATHS = {
    "fused": (True, None, 1 << 15),
    "fused-threads": (True, 1, 1 << 15),  # every bucket's rows shared among the threads
    "torch-whole": (False, None, 1 << 15),
    "torch-chunked": (False, None, 5),
}
"""How ``step_`` is run: the compiled loop (one thread or all) or PyTorch ops (whole or in chunks
of a few elements)."""


def take_in_place_path(path: str, monkeypatch) -> tuple[bool, list]:
    """Make ``step_`` run by ``path`` of :data:`IN_PLACE_PATHS`: whether it takes the compiled loop,
    and the list that records each pass that finished in it."""
    use_loop, parallel, chunk = IN_PLACE_PATHS[path]
    monkeypatch.setenv("NFOPT_FUSED", "1" if use_loop else "0")
    monkeypatch.setattr(rule_module, "CHUNK_ELEMENTS", chunk)
    if parallel is not None:
        monkeypatch.setattr(fused_module, "PARALLEL_ELEMENTS", parallel)
    looped: list = []
    monkeypatch.setattr(fused_module.FusedPasses, "finish", _spy(fused_module.FusedPasses.finish, looped))
    return use_loop, looped


@pytest.mark.parametrize("path", sorted(IN_PLACE_PATHS))
@pytest.mark.parametrize("name", sorted(CASES))
def test_the_in_place_step_matches_the_reference(name: str, path: str, monkeypatch) -> None:
    """The optimizer's in-place step (``LearnedUpdate.step_``), through the compiled loop and
    through PyTorch ops whole and in chunks, writes the parameters and statistics the
    specification computes."""
    use_loop, looped = take_in_place_path(path, monkeypatch)
    case = CASES[name]
    spec = case.spec()
    space = spec.space if isinstance(spec, MonomialSpec) else spec
    seed = sum(map(ord, name))
    rule = random_rule(seed, **case.config)
    x = random_inputs(rule, space, seed, case.nonfinite)
    expected_params, expected_states, expected_oks = reference_step(rule, spec, x)
    params = [p.clone() for p in x.params]
    states = [{k: v.clone() for k, v in s.items()} for s in x.states]
    oks = rule.step_(spec, params, x.grads, states, x.lrs, x.weight_decays)
    for i, (p, e) in enumerate(zip(params, expected_params)):
        assert_close(p, e, f"param {i}")
    for i, (s, e) in enumerate(zip(states, expected_states)):
        for k in ("momenta", "v", "step"):
            assert_close(s[k], e[k], f"{k} {i}")
    assert [bool(o) for o in oks] == [bool(o) for o in expected_oks]
    loops = use_loop and not rule.config.features.polar  # the loop does not compute the polar factor
    if loops and fused_module.library(torch.float64) is not None:
        assert looped, "no bucket took the compiled loop"
    elif not loops:
        assert not looped


def _spy(method: Callable, calls: list) -> Callable:
    def spied(self, *args, **kwargs):
        calls.append(self)
        return method(self, *args, **kwargs)

    return spied
