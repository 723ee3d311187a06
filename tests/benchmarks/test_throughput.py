"""Tests of the meta-training throughput benchmark on the smoke config: counts, outputs, clean-up."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from benchmarks.throughput import main, measure, timing
from meta_train.trainer import MetaConfig, MetaTrainer
from nfopt.optim.rule import LearnedUpdate

ROOT = Path(__file__).resolve().parents[2]
SMOKE = ROOT / "meta_train" / "configs" / "smoke.json"


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    """Two meta-steps of the smoke config through the command line, run from an empty folder."""
    tmp = tmp_path_factory.mktemp("throughput")
    cwd = tmp / "cwd"
    cwd.mkdir()
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(cwd)
        results = main(
            ["--config", str(SMOKE), "--meta-steps", "2", "--set", "unroll_length=2", "--out", str(tmp / "out")]
        )
    return results, tmp


def test_counts_agree_with_the_run(smoke_run):
    results, _ = smoke_run
    r = results["run"]
    assert (r["meta_steps"], r["tasks_per_step"], r["unroll_length"]) == (2, 2, 2)  # --set reached the config
    assert r["tasks_drawn"] == 2  # horizons of at least 4 outlast two unrolls of 2
    assert r["inner_steps"] == 2 * 2 * 2 == 2 * r["rule_forward_calls"]  # one rule call steps both slots
    assert r["inner_steps_per_s"] == pytest.approx(r["inner_steps"] / r["wall_time_s"])
    assert r["inner_steps_per_s_after_first"] > 0
    assert 0 < r["rule_forward_s"] < r["wall_time_s"]
    assert r["rule_forward_share"] == pytest.approx(r["rule_forward_s"] / r["wall_time_s"])


def test_writes_json_and_markdown_and_nothing_else(smoke_run):
    results, tmp = smoke_run
    assert json.loads((tmp / "out" / "throughput.json").read_text()) == results
    text = (tmp / "out" / "throughput.md").read_text()
    assert results["command"] in text and "nothing else runs" in text
    assert f"| 2 | 8 | 2 | {results['run']['wall_time_s']:.1f} |" in text
    assert results["machine"]["threads"] == 1  # the config's, not this process's
    assert list((tmp / "cwd").iterdir()) == []  # the rule and its checkpoint went to a temporary folder


def test_measure_restores_threads_and_the_timed_methods():
    forward, meta_step = LearnedUpdate.forward, MetaTrainer.meta_step
    config = MetaConfig.from_dict(json.loads(SMOKE.read_text()))
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        measure(config, 1)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    assert (LearnedUpdate.forward, MetaTrainer.meta_step) == (forward, meta_step)


def test_timing_records_each_call_and_what_is_kept():
    class Thing:
        def double(self, x: int) -> int:
            return 2 * x

    with timing(Thing, "double", torch.device("cpu"), keep=lambda r: r + 1) as calls:
        assert Thing().double(3) == 6
        Thing().double(5)
    assert [kept for _, kept in calls] == [7, 11] and all(t >= 0 for t, _ in calls)
    Thing().double(1)
    assert len(calls) == 2  # no longer timed
