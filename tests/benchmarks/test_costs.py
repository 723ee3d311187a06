"""Tests of the cost measurements, on tiny models: their structure and sanity, never their times."""

from __future__ import annotations

import pytest
import torch

from benchmarks.costs import (
    MODELS,
    OPTIMIZERS,
    QUICK_SKIPS,
    BenchModel,
    Timing,
    count_aten_ops,
    default_models,
    markdown,
    mlp,
    nf_layer_cost,
    peak_memory,
    state_bytes_per_param,
    step_cost,
    time_ms,
    train_step_cost,
)

TINY = BenchModel("tiny", lambda: mlp([8, 16, 10]), (8,), train_batch=4)
ONCE = Timing(blocks=1, block_s=1e-4)
CPU = torch.device("cpu")


def test_op_counter_counts_each_dispatched_op_exactly():
    x = torch.ones(3)
    assert count_aten_ops(lambda: None) == 0
    assert count_aten_ops(lambda: (x + 1).mul(2).sum()) == 3

    def five_adds() -> None:
        for _ in range(5):
            x.add(1)

    assert count_aten_ops(five_adds) == 5


def test_op_counter_runs_the_ops_unchanged():
    x = torch.arange(4.0)
    out = []
    count_aten_ops(lambda: out.append(torch.cumsum(x, 0) * 2))
    assert torch.equal(out[0], torch.tensor([0.0, 2.0, 6.0, 12.0]))


def _state_bytes_per_param_after_a_step(model: torch.nn.Module, opt: torch.optim.Optimizer) -> float:
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    opt.step()
    return state_bytes_per_param(opt)


@pytest.mark.parametrize(("name", "expected"), [("adam", 8.0), ("nfn_bare", 16.0), ("nfn_model", 16.0)])
def test_state_bytes_per_param(name, expected):
    model = mlp([256, 256, 256])  # 131,584 parameters: the per-tensor step counters add under 0.001
    opt = OPTIMIZERS[name](model, torch.randn(2, 256))
    assert _state_bytes_per_param_after_a_step(model, opt) == pytest.approx(expected, abs=1e-3)


@pytest.mark.parametrize(
    ("name", "parameters", "tensors"),
    [("mlp_1m", 1_068_810, 6), ("deep_narrow", 100_490, 50), ("resnet6", 446_410, 41), ("resnet18", 11_173_962, 62)],
)
def test_models_have_their_stated_size_and_classify_their_inputs(name, parameters, tensors):
    spec = MODELS[name]
    with torch.device("meta"):  # shapes only: no memory, no initialisation
        model = spec.build()
        assert model(torch.randn(2, *spec.input_shape)).shape == (2, 10)
    assert sum(p.numel() for p in model.parameters()) == parameters
    assert len(list(model.parameters())) == tensors


@pytest.mark.parametrize(("name", "nominal"), [("step_1m", 1e6), ("step_10m", 1e7), ("step_50m", 5e7)])
def test_step_only_models_hit_their_parameter_count(name, nominal):
    with torch.device("meta"):
        model = MODELS[name].build()
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(nominal, rel=5e-3)


def test_quick_skips_the_largest_model_only():
    assert default_models(quick=False) == list(MODELS)
    assert default_models(quick=True) == [m for m in MODELS if m not in QUICK_SKIPS]
    assert "step_50m" in QUICK_SKIPS


def test_time_ms_reports_every_function_per_call():
    calls = {"a": 0, "b": 0}

    def count(k: str):
        def f() -> None:
            calls[k] += 1

        return f

    ms = time_ms({k: count(k) for k in calls}, CPU, Timing(blocks=2, block_s=1e-4))
    assert set(ms) == {"a", "b"} and all(v > 0 for v in ms.values())
    assert all(n >= 2 + 3 + 2 for n in calls.values())  # calibration, warm-up, blocks


def test_step_cost_structure():
    r = step_cost(TINY, CPU, ONCE)
    assert (r["model"], r["parameters"], r["tensors"]) == ("tiny", 8 * 16 + 16 + 16 * 10 + 10, 4)
    assert set(r["step"]) == set(OPTIMIZERS)
    assert r["step"]["adam"]["ratio_vs_adam"] == 1.0
    for o in r["step"].values():
        assert o["ms"] > 0 and o["ratio_vs_adam"] > 0
    ops = {k: o["aten_ops"] for k, o in r["step"].items()}
    assert 0 < ops["adam"] < min(ops["nfn_bare"], ops["nfn_model"])
    assert r["step"]["adam"]["state_bytes_per_param"] == pytest.approx(8 + 4 * 4 / r["parameters"])


def test_train_step_cost_structure():
    r = train_step_cost(TINY, CPU, ONCE)
    assert r["batch"] == 4 and r["forward_backward_ms"] > 0
    assert r["adam"]["ratio_vs_adam"] == 1.0
    assert all(r[k]["ms"] > 0 for k in OPTIMIZERS)
    with pytest.raises(ValueError, match="no training-step"):
        train_step_cost(BenchModel("step_only", TINY.build, TINY.input_shape), CPU, ONCE)


@pytest.mark.parametrize("optimizer", ["adam", "nfn_bare"])
def test_peak_memory_child_counts_at_least_the_state(optimizer):
    r = peak_memory("step_1m", optimizer, CPU)  # tensors of 1 MB: their state is fresh pages
    assert r["state_bytes_per_param"] == pytest.approx(8.0 if optimizer == "adam" else 16.0, abs=1e-3)
    assert r["peak_bytes_per_param"] >= r["state_bytes_per_param"]
    assert r["peak_bytes_per_param"] < 1000  # a few steps, not the process's whole history


def test_peak_memory_child_failure_says_why():
    with pytest.raises(RuntimeError, match="KeyError"):
        peak_memory("no_such_model", "adam", CPU)


def test_nf_layer_cost_structure():
    model = mlp([6, 5, 3])
    for backward in (False, True):
        r = nf_layer_cost(model, 4, backward, CPU, ONCE)
        assert r["pass"] == ("forward+backward" if backward else "forward")
        assert r["elements"] == 6 * 5 + 5 + 5 * 3 + 3
        assert r["ratio"] == pytest.approx(r["pooled_ms_per_M"] / r["per_element_ms_per_M"])


def test_markdown_has_a_row_per_model_and_optimizer():
    step = step_cost(TINY, CPU, ONCE)
    for o in step["step"].values():
        o["peak_bytes_per_param"] = 1.0
    results = {
        "command": "python -m benchmarks.costs --quick",
        "machine": {"cpu": "a cpu", "cores": 2, "torch": "x", "device": "cpu", "gpu": None, "threads": 1},
        "models": [
            {**step, "train_step": train_step_cost(TINY, CPU, ONCE)},
            {**step, "model": "other", "train_step": None},
        ],
        "nf_layer": [nf_layer_cost(mlp([6, 5, 3]), 4, False, CPU, ONCE)],
    }
    text = markdown(results)
    assert "`python -m benchmarks.costs --quick`" in text and "a cpu, 2 cores, 1 torch threads" in text
    assert "nothing else runs" in text
    for k in OPTIMIZERS:
        assert text.count(f"| tiny | 314 | 4 | {k} |") == 1
        assert text.count(f"| other | 314 | 4 | {k} |") == 1
    assert text.count("| tiny | 4 | ") == 3 and "| other | 4 |" not in text  # training-step rows: tiny only
