"""The compiled CPU loop of the optimizer step: the layouts it takes, its agreement with the
PyTorch path, and what happens where it cannot be compiled or is switched off.

Its agreement with the specification on the whole labelling zoo is in
``tests/test_reference_equivalence.py`` (``test_the_in_place_step_matches_the_reference``).
"""

from __future__ import annotations

import os
import shutil
import warnings

import pytest
import torch

from nfopt.optim import fused
from nfopt.optim.features import init_state
from nfopt.weight_space import WeightSpaceSpec

from ..rules import fresh_rule

needs_loop = pytest.mark.skipif(fused.library(torch.float32) is None, reason="no C compiler for the fused loop")

SHAPES = {
    "matrix": [(33, 70), (33,)],  # lanes along the contiguous last dim
    "short-rows": [(70, 5)],  # lanes along the first dim, read with a stride
    "conv": [(8, 6, 3, 3), (8, 6, 1, 1), (8,)],  # the last two dims together, a period of 9 (and 1)
    "conv3d": [(4, 3, 2, 2, 2)],
    "tiny": [(3,), (2, 2)],
    "long-rows": [(40000,), (3, 5000)],  # rows of many blocks: their sums move into float64 on the way
}


@pytest.mark.parametrize(
    "canonical, layout",
    [((784, 1024), (3, False)), ((10,), (3, False)), ((64, 64, 9), (2, True)), ((70, 5), (2, False)),
     ((5, 70), (3, False)), ((3, 2), (2, False)), ((64, 32, 1), (2, True)), ((4, 3, 1), (1, False))],
)
def test_layouts(canonical: tuple[int, ...], layout: tuple[int, bool]) -> None:
    """Lanes run along the contiguous last dim where it is long, along the last two where a short
    last dim sits under two others, else along the longest dim."""
    assert fused._layout(canonical) == layout


@pytest.fixture
def looped(monkeypatch) -> list:
    """The FusedPasses that finished a step (each bucket the loop took), as steps run."""
    finished = []
    finish = fused.FusedPasses.finish
    monkeypatch.setattr(fused.FusedPasses, "finish", lambda self, parts: (finished.append(self), finish(self, parts)))
    return finished


def _step(rule, params, grads, states, monkeypatch, loop: bool, lrs=None, wds=None):
    monkeypatch.setenv("NFOPT_FUSED", "1" if loop else "0")
    params = [p.clone() for p in params]
    states = [{k: v.clone() for k, v in s.items()} for s in states]
    oks = rule.step_(WeightSpaceSpec.independent(params), params, grads, states, lrs, wds)
    return params, states, oks


def _inputs(shapes, dtype: torch.dtype, seed: int = 0, **cfg):
    g = torch.Generator().manual_seed(seed)
    rule = fresh_rule(alpha=0.01, **cfg).to(dtype)
    with torch.no_grad():
        for w in rule.parameters():
            w.copy_(torch.randn(w.shape, generator=g, dtype=dtype) * 0.4)
    params = [torch.randn(s, generator=g, dtype=dtype) for s in shapes]
    states = [init_state(p, rule.config.features) for p in params]
    for _ in range(2):  # statistics of two earlier steps
        _, states, _ = _step_state(rule, params, states, g)
    grads = [torch.randn(s, generator=g, dtype=dtype) for s in shapes]
    return rule, params, grads, states


def _step_state(rule, params, states, g):
    grads = [torch.randn(p.shape, generator=g, dtype=p.dtype) for p in params]
    params = [p.clone() for p in params]
    states = [{k: v.clone() for k, v in s.items()} for s in states]
    rule.step_(WeightSpaceSpec.independent(params), params, grads, states)
    return params, states, grads


@needs_loop
@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-12), (torch.float32, 2e-5)], ids=["float64", "float32"])
@pytest.mark.parametrize("name", sorted(SHAPES))
def test_the_loop_agrees_with_the_pytorch_path(name: str, dtype: torch.dtype, tol: float, monkeypatch, looped) -> None:
    """Parameters, statistics and flags after a step through the loop are those of the PyTorch
    path, to rounding (float32: its exp and tanh are within about an ulp of PyTorch's), on one
    thread and with rows shared among threads, with per-tensor rates and weight decays."""
    rule, params, grads, states = _inputs(SHAPES[name], dtype)
    lrs, wds = [0.5 + i for i in range(len(params))], [0.1 * i for i in range(len(params))]
    expected = _step(rule, params, grads, states, monkeypatch, False, lrs, wds)
    for parallel in (fused.PARALLEL_ELEMENTS, 1):
        monkeypatch.setattr(fused, "PARALLEL_ELEMENTS", parallel)
        looped.clear()
        got = _step(rule, params, grads, states, monkeypatch, True, lrs, wds)
        assert len(looped) == len({p.shape for p in params}), "every bucket through the loop"
        for a, b in zip(got[0] + [s[k] for s in got[1] for k in ("momenta", "v", "step")],
                        expected[0] + [s[k] for s in expected[1] for k in ("momenta", "v", "step")]):
            assert a.shape == b.shape and a.is_contiguous()
            assert (a - b).abs().max() <= tol * max(b.abs().max(), 1e-30), name
        assert [bool(o) for o in got[2]] == [bool(o) for o in expected[2]]


@needs_loop
def test_a_non_finite_gradient_holds_that_tensor_still(monkeypatch, looped) -> None:
    """A member whose gradient holds inf is left as it was, parameters and statistics, and the
    other members of its bucket and the other buckets step as on the PyTorch path."""
    rule, params, grads, states = _inputs([(6, 40)] * 3 + [(5, 7)], torch.float32)
    grads[1] = grads[1].clone()
    grads[1][2, 3] = float("inf")
    looped.clear()  # (the inputs' statistics come from earlier steps)
    new, new_states, oks = _step(rule, params, grads, states, monkeypatch, True)
    assert len(looped) == 2, "both buckets went through the loop"
    assert [bool(o) for o in oks] == [True, False, True, True]
    assert torch.equal(new[1], params[1])
    for k in ("momenta", "v", "step"):
        assert torch.equal(new_states[1][k], states[1][k])
    eager, eager_states, _ = _step(rule, params, grads, states, monkeypatch, False)
    for i in (0, 2, 3):
        assert torch.allclose(new[i], eager[i], rtol=1e-5, atol=1e-7)
        assert torch.equal(new_states[i]["step"], eager_states[i]["step"])


@needs_loop
@pytest.mark.parametrize("n_layers, pooled_last, modes", [(2, True, [0, 1, 2]), (2, False, [0, 2]), (3, False, [0, 1, 3])])
def test_a_per_element_last_layer_costs_no_pass(monkeypatch, n_layers: int, pooled_last: bool, modes: list[int]) -> None:
    """Each pooled layer after the first takes a pass over the bucket to average its input; a
    per-element last layer takes none, and the step still agrees with the PyTorch path."""
    rule, params, grads, states = _inputs([(6, 40)], torch.float32, n_layers=n_layers, pooled_last=pooled_last)
    taken = []
    run = fused.FusedPasses._run
    monkeypatch.setattr(fused.FusedPasses, "_run", lambda self, s, parts=(): (taken.append(s.mode), run(self, s, parts))[1])
    new, _, _ = _step(rule, params, grads, states, monkeypatch, True)
    assert taken == modes
    eager, _, _ = _step(rule, params, grads, states, monkeypatch, False)
    assert torch.allclose(new[0], eager[0], rtol=1e-5, atol=1e-7)


def test_switched_off_by_the_environment(monkeypatch) -> None:
    monkeypatch.setenv("NFOPT_FUSED", "0")
    assert fused.library(torch.float32) is None


@pytest.mark.skipif(shutil.which(os.environ.get("CC", "cc")) is None, reason="no C compiler")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_the_loop_compiles_where_there_is_a_compiler(monkeypatch, tmp_path, dtype: torch.dtype) -> None:
    """The shipped source compiles, warning-free, with the machine's compiler (a source that did
    not would leave every user on the slower path, and the tests of the loop skipped)."""
    monkeypatch.setenv("NFOPT_FUSED", "1")
    monkeypatch.setenv("NFOPT_CACHE_DIR", str(tmp_path))
    fused._compiled.cache_clear()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert fused.library(dtype) is not None
    finally:
        fused._compiled.cache_clear()


def test_a_loop_that_does_not_compile_leaves_the_pytorch_path_with_one_warning(monkeypatch, tmp_path) -> None:
    """Where the compiler fails (here: a flag it does not know), one warning says so and the
    optimizer steps through PyTorch ops, with the same results."""
    rule, params, grads, states = _inputs([(5, 7)], torch.float32)
    monkeypatch.setenv("NFOPT_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(fused, "FLAGS", (*fused.FLAGS, "--no-such-flag"))
    fused._compiled.cache_clear()
    try:
        with pytest.warns(RuntimeWarning, match="could not be compiled"):
            got = _step(rule, params, grads, states, monkeypatch, True)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # once only
            _step(rule, params, grads, states, monkeypatch, True)
        expected = _step(rule, params, grads, states, monkeypatch, False)
        assert torch.equal(got[0][0], expected[0][0])
        assert not list(tmp_path.rglob("*.so"))
    finally:
        fused._compiled.cache_clear()


@needs_loop
def test_the_compiled_loop_is_kept_in_the_cache(monkeypatch, tmp_path) -> None:
    """The first use compiles into the cache directory; a later process (here: a cleared
    in-memory cache) loads that file instead of compiling again."""
    monkeypatch.setenv("NFOPT_FUSED", "1")
    monkeypatch.setenv("NFOPT_CACHE_DIR", str(tmp_path))
    fused._compiled.cache_clear()
    try:
        assert fused.library(torch.float64) is not None
        (built,) = tmp_path.rglob("fused_step_f64.so")
        stamp = built.stat().st_mtime_ns
        fused._compiled.cache_clear()
        assert fused.library(torch.float64) is not None
        assert built.stat().st_mtime_ns == stamp
    finally:
        fused._compiled.cache_clear()
