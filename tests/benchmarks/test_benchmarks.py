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
from benchmarks.metrics import Speedup, long_horizon, median_speedup, ratio, select_lr, speedup, win_record
from benchmarks.report import NAMES, json_ready, markdown, plot_task, rebuild_markdown
from benchmarks.runs import OptimizerSpec, RunSpec, build_task, evaluate, param_norm, smoothed_curve, train
from benchmarks.side_by_side import side_by_side
from benchmarks.suite import ALL_TASKS, check_same_start, summary
from nfopt import NFNOptimizer
from nfopt.io import save_rule
from nfopt.optim.rule import LearnedUpdate, UpdateConfig
from nfopt.weight_space import WeightSpaceSpec

ROOT = Path(__file__).resolve().parents[2]
OPTIMIZER_METRICS = (
    "final_loss_mean", "final_loss_std", "smoothed_loss_mean", "test_loss_mean", "test_accuracy_mean",
    "step_ms", "train_step_ms", "state_bytes_per_param", "param_norm_mean",
)
LONG_METRICS = (
    "loss_at_horizon_mean", "loss_at_end_mean", "end_over_horizon", "test_loss_at_end_mean",
    "param_norm_at_horizon_mean", "param_norm_at_end_mean",
)
OLD_RESULTS = ROOT / "benchmarks" / "results" / "pooled_last" / "benchmark.json"
"""Results saved before the bare NFN, AdamW and the parameter norms were benchmarked."""
TINY = ["--tasks", "mlp_wine", "--seeds", "1", "--horizon", "12", "--adam-grid", "1e-3,3e-2", "--sgd-grid", "1e-1,1e6",
        "--workers", "1", "--no-progress"]
"""A run just long enough that the shipped default's learned part acts (its signal-to-noise gate's
margin leaves the first 8 steps of any gradient to Adam), so bare and coupled runs differ."""


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
    assert set(task["optimizers"]) == set(NAMES) >= {"nfn_bare", "nfn", "adamw_tuned"}  # a column for every optimizer
    for name in NAMES:
        for metric in OPTIMIZER_METRICS:
            assert task["optimizers"][name][metric] is not None, (name, metric)
    for name in ("nfn_bare", "nfn", "per_element"):
        assert task["speedup_vs_adam_tuned"][name]["value"] is not None
    for name in ("nfn_bare", "nfn", "adam_tuned"):
        assert task["long_horizon"][name]["steps"] == 5 * 12
        for metric in LONG_METRICS:
            assert task["long_horizon"][name][metric] is not None, (name, metric)
        assert task["long_horizon"][name]["param_norm_at_end_mean"] != task["long_horizon"][name]["param_norm_at_horizon_mean"]
    for group in task["runs"].values():
        for r in group:
            assert r["at_horizon"]["param_norm"] > 0 and (r["at_end"] is None or r["at_end"]["param_norm"] > 0)
    summ = results["summary"]
    for nfn in ("nfn_bare", "nfn"):
        for other in ("adam_1e-3", "adam_tuned", "adamw_tuned", "sgd_tuned"):
            assert summ[f"{nfn}_vs_{other}"]["tasks"] == 1
        assert summ[f"median_speedup_{nfn}"]["value"] is not None
        assert summ["test_loss_vs_adam_tuned"][nfn]["tasks"] == 1
        assert summ["loss_growth"][nfn] in (0, 1) and summ["norm_over_adam"][nfn] in (0, 1)
    assert summ["nfn_vs_per_element"]["tasks"] == summ["nfn_bare_vs_nfn"]["tasks"] == 1
    assert len(summ["targets"]) == 6 and all(t["met"] in (True, False, None) for t in summ["targets"])
    assert results["checkpoint"]["provenance"] and results["ablation"]["provenance"] == {"note": "test"}


def test_optimizers_start_alike_within_a_seed(with_ablation):
    results, _ = with_ablation
    runs = [r for group in results["tasks"][0]["runs"].values() for r in group]
    assert len(runs) == 2 + 2 + 2 + 2 + 1 + 1  # NFN bare and for_model, Adam, AdamW, SGD grids, ablation, tuned Adam long
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
    assert task["grid_final_loss_mean"]["adamw"].keys() == task["grid_final_loss_mean"]["adam"].keys()  # Adam's grid
    for algorithm in ("adam", "adamw", "sgd"):
        grid = task["grid_final_loss_mean"][algorithm]
        assert f"{task['tuned_lr'][algorithm]:g}" == min(grid, key=lambda lr: math.inf if grid[lr] is None else grid[lr])
        assert task["optimizers"][f"{algorithm}_tuned"]["final_loss_mean"] == min(v for v in grid.values() if v is not None)


def test_adamw_is_tuned_like_adam_with_weight_decay(with_ablation):
    (task,) = with_ablation[0]["tasks"]
    adamw = task["optimizers"]["adamw_tuned"]
    grid = {float(lr): loss for lr, loss in task["grid_final_loss_mean"]["adamw"].items()}
    assert adamw["lr"] == task["tuned_lr"]["adamw"] == min(grid, key=grid.get)
    runs = task["runs"][adamw["curve_runs"]]
    assert all(r["optimizer"] == {"algorithm": "adamw", "lr": adamw["lr"], "ckpt": None, "bare": False} for r in runs)
    model = build_task(ALL_TASKS["mlp_wine"], 0).model
    built = OptimizerSpec(**runs[0]["optimizer"]).build(model)
    assert type(built) is torch.optim.AdamW and built.param_groups[0]["weight_decay"] == 0.01
    # decoupled weight decay changes the run: not Adam at the same rate
    assert adamw["final_loss_mean"] != task["grid_final_loss_mean"]["adam"][f"{adamw['lr']:g}"]


def _axis_owners(spec) -> dict[str, set[int]]:
    """For each axis label of a weight space, the tensors that have it."""
    owners: dict[str, set[int]] = {}
    for i, t in enumerate(getattr(spec, "space", spec).tensors):  # a MonomialSpec wraps its weight space
        for label in t.axes:
            if label is not None:
                owners.setdefault(label, set()).add(i)
    return owners


def test_bare_and_for_model_nfn_differ_in_what_they_see(with_ablation):
    model = build_task(ALL_TASKS["mlp_wine"], 0).model
    params = list(model.parameters())
    bare, labelled = (OptimizerSpec("nfn", bare=b).build(model) for b in (True, False))
    assert type(bare) is type(labelled) is NFNOptimizer
    # bare: no labels, every tensor its own weight space; for_model: layers share the hidden sets
    assert not bare._labels and bare.spec_for(params) == WeightSpaceSpec.independent(params)
    assert all(len(owners) == 1 for owners in _axis_owners(bare.spec_for(params)).values())
    assert labelled._labels and any(len(owners) > 1 for owners in _axis_owners(labelled.spec_for(params)).values())
    with pytest.raises(ValueError, match="bare mode"):
        OptimizerSpec("adam", 1e-3, bare=True)
    (task,) = with_ablation[0]["tasks"]
    assert [r["optimizer"]["bare"] for r in task["runs"]["nfn_bare"]] == [True]
    assert [r["optimizer"]["bare"] for r in task["runs"]["nfn"]] == [False]
    assert task["optimizers"]["nfn_bare"]["final_loss_mean"] != task["optimizers"]["nfn"]["final_loss_mean"]


def test_param_norm_is_the_norm_of_all_parameters():
    model = torch.nn.Linear(2, 1)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[3.0, 0.0]]))
        model.bias.fill_(4.0)
    assert param_norm(model) == 5.0


def _synthetic_task(name, bare, adam, bare_test, adam_test, growth, bare_norm, adam_norm, speed):
    """A task's results with what the summary reads: the bare NFN's against tuned Adam's; the rest fixed."""
    optimizers = {n: {"final_loss_mean": 1.0, "test_loss_mean": 1.0} for n in NAMES}
    optimizers["nfn_bare"] = {"final_loss_mean": bare, "test_loss_mean": bare_test}
    optimizers["adam_tuned"] = {"final_loss_mean": adam, "test_loss_mean": adam_test}
    long = {n: {"end_over_horizon": 0.5, "param_norm_at_end_mean": 1.0} for n in ("nfn", "adam_tuned")}
    long["nfn_bare"] = {"end_over_horizon": growth, "param_norm_at_end_mean": bare_norm}
    long["adam_tuned"]["param_norm_at_end_mean"] = adam_norm
    speedups = {n: {"value": speed, "lower_bound": False, "steps_needed": None} for n in ("nfn_bare", "nfn")}
    return {"name": name, "optimizers": optimizers, "long_horizon": long, "speedup_vs_adam_tuned": speedups}


def test_summary_counts_on_synthetic_results():
    tasks = [
        # a training-loss win; test loss a tie (within 1e-3: no worse); growth exactly at 1.2 and norm exactly 2x: not over
        _synthetic_task("mlp_a", 0.1, 0.2, 1.0005, 1.0, 1.2, 20.0, 10.0, 1.0),
        # a loss; test loss lower (no worse); growth and norm just over their limits
        _synthetic_task("mlp_b", 0.3, 0.2, 0.9, 1.0, 1.21, 20.1, 10.0, 2.0),
        # a win on the transformer; test loss worse; non-finite growth and norm count as over; Adam's norm non-finite
        _synthetic_task("transformer_c", 1.0, 2.0, 1.2, 1.0, None, None, 10.0, 3.0),
        # a test loss that is not finite is worse; a finite norm against Adam's non-finite one is not over
        _synthetic_task("mlp_d", 0.1, 0.1, None, 1.0, 0.5, 5.0, None, 4.0),
    ]
    summ = json_ready(summary(tasks, with_ablation=False))
    assert summ["nfn_bare_vs_adam_tuned"] == {"wins": 2, "ties": 1, "losses": 1, "tasks": 4, "win_rate": 0.5}
    assert summ["test_loss_vs_adam_tuned"]["nfn_bare"] == {
        "wins": 1, "ties": 1, "losses": 2, "tasks": 4, "win_rate": 0.25, "no_worse": 2
    }
    assert summ["test_loss_vs_adam_tuned"]["nfn"]["no_worse"] == 4  # all equal: ties
    assert summ["loss_growth"] == {"limit": 1.2, "floor": 1e-6, "nfn_bare": 2, "nfn": 0, "adam_tuned": 0}
    # mlp_b's growth ends at a loss below the floor: converged, not grown; transformer_c's is not finite
    converged = [dict(t, long_horizon={**t["long_horizon"], "nfn_bare": {**t["long_horizon"]["nfn_bare"], "loss_at_end_mean": 1e-8}})
                 if t["name"] == "mlp_b" else t for t in tasks]
    assert summary(converged, with_ablation=False)["loss_growth"]["nfn_bare"] == 1
    assert summ["norm_over_adam"] == {"limit": 2.0, "nfn_bare": 2, "nfn": 0}
    assert summ["median_speedup_nfn_bare"]["value"] == 2.5
    assert [t["met"] for t in summ["targets"]] == [False, False, True, True, False, False], summ["targets"]
    assert summ["targets"][0]["target"].endswith("at least 4 of 4 tasks")  # 7 of 9, scaled up
    assert summ["targets"][1]["target"].endswith("at least 3 of 4 tasks") and summ["targets"][1]["measured"] == "2 of 4"
    assert summ["targets"][2]["measured"] == "transformer_c: win"
    without = summary([t for t in tasks if not t["name"].startswith("transformer")], with_ablation=False)
    assert without["targets"][2]["met"] is None


def test_targets_are_the_stated_counts_on_nine_tasks():
    tasks = [_synthetic_task(f"mlp_{i}", 0.1 if i < 7 else 0.3, 0.2, 1.0 if i < 6 else 2.0, 1.0, 1.0, 1.0, 1.0, 1.5) for i in range(9)]
    targets = summary(tasks, with_ablation=False)["targets"]
    assert targets[0]["target"].endswith("at least 7 of 9 tasks") and targets[0]["met"]
    assert targets[1]["target"].endswith("at least 6 of 9 tasks") and targets[1]["met"]
    assert targets[3]["met"] and targets[4]["met"] and targets[5]["met"]
    # one win fewer; one more test-loss tie (still 6 no worse); a median speed-up of 1.4
    fewer = [
        _synthetic_task(f"mlp_{i}", 0.1 if i < 6 else 0.3, 0.2, 1.0 if i < 6 else 2.0, 1.0, 1.0, 1.0, 1.0, 1.4 if i < 5 else 1.5)
        for i in range(9)
    ]
    assert [t["met"] for t in summary(fewer, with_ablation=False)["targets"]][:4] == [False, True, None, False]


def test_loss_growth_and_norm_ratios_of_zero_and_non_finite_values():
    assert ratio(0.0, 0.0) == 1.0 and ratio(1.0, 0.0) == math.inf and ratio(3.0, 2.0) == 1.5
    assert ratio(None, 1.0) == math.inf and ratio(1.0, None) == 0.0
    run = {"steps": 10, "max_loss_ratio": 0.5, "stopped_nonfinite": False,
           "at_horizon": {"train_loss": 0.0, "test_loss": 1.0, "test_accuracy": None, "param_norm": 2.0},
           "at_end": {"train_loss": 0.0, "test_loss": 1.0, "test_accuracy": None, "param_norm": 4.0}}
    lh = long_horizon([run])
    assert lh["end_over_horizon"] == 1.0  # a loss that stays at 0 does not grow
    assert (lh["param_norm_at_horizon_mean"], lh["param_norm_at_end_mean"]) == (2.0, 4.0)


def test_results_saved_before_the_bare_nfn_still_render(tmp_path, with_ablation):
    """Old results lack the bare NFN, AdamW and the norms: the report leaves their columns and sections
    out, the plots and the side-by-side comparison still work, against new results too."""
    old = json.loads(OLD_RESULTS.read_text())
    text = markdown(old, [], tmp_path / "RESULTS.md")
    assert "NFN for_model" in text and "## Test loss at the horizon" in text
    for absent in ("NFN bare", "AdamW", "## Parameter norm", "### Targets", "### Against tuned Adam"):
        assert absent not in text, absent
    assert plot_task(old["tasks"][0], tmp_path / "old.png").exists()
    new, new_text = with_ablation
    for present in ("NFN bare", "AdamW tuned", "## Parameter norm", "### Targets", "### Against tuned Adam"):
        assert present in new_text, present
    compared = side_by_side([old, new], ["old", "new"])
    assert "| mlp_wine |" in compared and "over 1 tasks" in compared
    assert "(bare NFN)" in side_by_side([new, new], ["a", "b"], "nfn_bare")
    with pytest.raises(ValueError, match="nfn_bare"):
        side_by_side([old, new], ["old", "new"], "nfn_bare")
    copy = tmp_path / "old" / "benchmark.json"
    copy.parent.mkdir()
    copy.write_text(OLD_RESULTS.read_text())
    assert rebuild_markdown(copy) == (copy.parent / "RESULTS.md").read_text() == markdown(
        old, [copy.parent / "plots" / f"{t['name']}.png" for t in old["tasks"]], copy.parent / "RESULTS.md"
    )


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
