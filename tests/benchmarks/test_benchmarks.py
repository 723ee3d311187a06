"""Tests of the benchmark suite: a tiny run through the command line, the metrics, the extra tasks."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch

from benchmarks.__main__ import main
from benchmarks.extra_tasks import EXTRA_TASKS
from benchmarks.metrics import Speedup, median_speedup, select_lr, speedup, win_record
from benchmarks.report import NAMES, json_ready, markdown
from benchmarks.runs import OptimizerSpec, RunSpec, build_task, evaluate, smoothed_curve, train
from benchmarks.suite import ALL_TASKS, check_same_start
from nfopt.io import save_rule
from nfopt.optim.rule import LearnedUpdate, UpdateConfig

ROOT = Path(__file__).resolve().parents[2]
OPTIMIZER_METRICS = (
    "final_loss_mean", "final_loss_std", "smoothed_loss_mean", "test_loss_mean", "test_accuracy_mean",
    "step_ms", "train_step_ms", "state_bytes_per_param",
)
TINY = ["--tasks", "mlp_wine", "--seeds", "1", "--horizon", "6", "--adam-grid", "1e-3,3e-2", "--sgd-grid", "1e-1,1e6",
        "--workers", "1", "--no-progress"]


def _run(tmp_path, *extra: str) -> tuple[dict, str]:
    main([*TINY, "--out", str(tmp_path), "--markdown", str(tmp_path / "RESULTS.md"), *extra])
    return json.loads((tmp_path / "benchmark.json").read_text()), (tmp_path / "RESULTS.md").read_text()


@pytest.fixture(scope="module")
def with_ablation(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bench")
    ckpt = tmp / "per_element.nfopt"
    save_rule(LearnedUpdate(UpdateConfig(pooled=False)), ckpt, provenance={"note": "test"})
    return _run(tmp, "--ablation-ckpt", str(ckpt))


def test_json_has_every_metric_for_every_optimizer(with_ablation):
    results, _ = with_ablation
    (task,) = results["tasks"]
    assert set(task["optimizers"]) == set(NAMES)  # the report has a column for every optimizer compared
    for name in NAMES:
        for metric in OPTIMIZER_METRICS:
            assert task["optimizers"][name][metric] is not None, (name, metric)
    for name in ("nfn", "per_element"):
        assert task["speedup_vs_adam_tuned"][name]["value"] is not None
    for name in ("nfn", "adam_tuned"):
        assert task["long_horizon"][name]["steps"] == 5 * 6
        assert task["long_horizon"][name]["loss_at_end_mean"] is not None
    for key in ("nfn_vs_adam_1e-3", "nfn_vs_adam_tuned", "nfn_vs_sgd_tuned", "nfn_vs_per_element"):
        assert results["summary"][key]["tasks"] == 1
    assert results["summary"]["median_speedup_nfn"]["value"] is not None
    assert results["checkpoint"]["provenance"] and results["ablation"]["provenance"] == {"note": "test"}


def test_optimizers_start_alike_within_a_seed(with_ablation):
    results, _ = with_ablation
    runs = [r for group in results["tasks"][0]["runs"].values() for r in group]
    assert len(runs) == 1 + 2 + 2 + 1 + 1  # NFN, Adam grid, SGD grid, ablation, tuned Adam long
    assert len({r["first_loss"] for r in runs}) == 1
    assert len({r["batch_checksum"] for r in runs if not r["stopped_nonfinite"]}) == 1


def test_a_run_stopped_before_the_horizon_still_starts_alike():
    config = dataclasses.replace(ALL_TASKS["mlp_wine"], horizon=10)
    diverged = train(RunSpec(config, 0, OptimizerSpec("sgd", 1e6), 10))
    adam = train(RunSpec(config, 0, OptimizerSpec("adam", 1e-3), 10))
    assert diverged["stopped_nonfinite"] and diverged["batch_checksum"] is None
    assert diverged["curve"][-1] == math.inf
    check_same_start({"sgd": [diverged], "adam": [adam]})
    with pytest.raises(RuntimeError, match="first loss"):
        check_same_start({"adam": [adam], "other seed's start": [train(RunSpec(config, 1, OptimizerSpec("adam", 1e-3), 10)) | {"seed": 0}]})


def test_tuned_rates_are_the_grid_points_with_the_lowest_loss(with_ablation):
    (task,) = with_ablation[0]["tasks"]
    for algorithm in ("adam", "sgd"):
        grid = task["grid_final_loss_mean"][algorithm]
        assert f"{task['tuned_lr'][algorithm]:g}" == min(grid, key=lambda lr: math.inf if grid[lr] is None else grid[lr])
        assert task["optimizers"][f"{algorithm}_tuned"]["final_loss_mean"] == min(v for v in grid.values() if v is not None)


def test_a_diverging_grid_point_is_never_tuned(with_ablation):
    (task,) = with_ablation[0]["tasks"]
    assert task["grid_final_loss_mean"]["sgd"]["1e+06"] is None  # non-finite: the run blew up
    assert task["tuned_lr"]["sgd"] == 0.1


def test_report_states_its_provenance_and_plots(with_ablation):
    results, text = with_ablation
    assert results["run"]["command"] in text and "sha256" in text and '"note": "test"' in text
    assert "missing" not in text
    for task in results["tasks"]:
        assert f"plots/{task['name']}.png" in text


def test_committed_report_is_rebuilt_from_its_saved_json():
    """The report reads nothing but the saved results, so results saved by earlier versions, whose run
    records may name fields differently (an optimizer's ``kind`` before it became ``algorithm``), still
    rebuild into the committed report."""
    folder = ROOT / "benchmarks" / "results" / "quick"
    results = json.loads((folder / "benchmark.json").read_text())
    plots = [folder / "plots" / f"{t['name']}.png" for t in results["tasks"]]
    assert markdown(results, plots, folder / "RESULTS.md") == (folder / "RESULTS.md").read_text()


def test_missing_ablation_is_reported_not_fatal(tmp_path):
    results, text = _run(tmp_path, "--ablation-ckpt", str(tmp_path / "absent.nfopt"))
    assert results["ablation"]["missing"]
    assert results["tasks"][0]["optimizers"]["per_element"] == {"missing": str(tmp_path / "absent.nfopt")}
    assert "**missing**" in text and "| missing |" in text
    assert "nfn_vs_per_element" not in results["summary"]


def test_speedup_on_synthetic_curves():
    steps, curve = [10, 20, 30, 40], [4.0, 3.0, 2.0, 1.0]
    assert speedup(steps, curve, target=2.0, horizon=20) == Speedup(1.5, False, 30)
    assert speedup(steps, curve, target=5.0, horizon=20) == Speedup(0.5, False, 10)
    assert speedup(steps, curve, target=0.5, horizon=20) == Speedup(2.0, True, None)
    assert speedup(steps, curve, target=math.inf, horizon=20).value is None
    # A lower bound below the median could hide a larger median; one above it cannot.
    assert median_speedup([Speedup(1.0, False, 1), Speedup(2.0, False, 2), Speedup(5.0, True, None)]) == Speedup(2.0, False, None)
    assert median_speedup([Speedup(1.0, True, None), Speedup(2.0, False, 2), Speedup(3.0, False, 3)]).lower_bound


def test_select_lr_and_win_record():
    assert select_lr({1e-3: [1.0, 2.0], 3e-3: [0.5, math.nan], 1e-2: [1.4, 1.0]}) == 1e-2
    assert select_lr({1e-2: [1.0], 1e-3: [1.0]}) == 1e-3  # ties go to the smaller rate
    assert win_record([1.0, 2.0, 3.0, math.inf], [2.0, 2.0001, 1.0, 1.0]) == {
        "wins": 1, "ties": 1, "losses": 2, "tasks": 4, "win_rate": 0.25
    }


def test_smoothed_curve_windows_and_divergence():
    steps, curve = smoothed_curve([4.0, 2.0, 6.0, 8.0, math.nan, 1.0], horizon=3)  # stride 1, window 1
    assert steps == [1, 2, 3, 4, 5, 6]
    assert curve[:4] == [4.0, 2.0, 6.0, 8.0] and curve[4:] == [math.inf, math.inf]
    steps, curve = smoothed_curve([float(i) for i in range(400)], horizon=250)  # stride 2, window 12
    assert 250 in steps and curve[steps.index(250)] == sum(range(238, 250)) / 12
    assert json_ready({"a": (math.inf, 1.0)}) == {"a": [None, 1.0]}


@pytest.mark.parametrize("config", EXTRA_TASKS, ids=lambda c: c.name)
def test_out_of_distribution_tasks_build_and_train(config):
    task = build_task(config, 1)
    a, b = (task.build_module(task.generator("init")) for _ in range(2))
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    other = build_task(config, 2)
    c = other.build_module(other.generator("init"))
    assert not torch.equal(next(a.parameters()), next(c.parameters()))
    short = dataclasses.replace(config, horizon=30)
    start = build_task(short, 0)
    initial = evaluate(start, start.build_module(start.generator("init")))  # the weights every run starts from
    adam = train(RunSpec(short, 0, OptimizerSpec("adam", 1e-2), 30))
    # Adam learns the task: the whole training split and the held-out test split, not one minibatch
    assert adam["at_horizon"]["train_loss"] < 0.8 * initial["train_loss"]
    assert adam["at_horizon"]["test_loss"] < 0.8 * initial["test_loss"]
    assert adam["at_horizon"]["test_accuracy"] > initial["test_accuracy"]
    nfn = train(RunSpec(dataclasses.replace(config, horizon=3), 0, OptimizerSpec("nfn"), 3))
    assert nfn["first_loss"] == adam["first_loss"] and math.isfinite(nfn["at_horizon"]["train_loss"])
