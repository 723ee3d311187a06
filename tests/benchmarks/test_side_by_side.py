"""Two benchmark runs side by side: the NFN's numbers of each, and its wins against each run's own baselines."""

from __future__ import annotations

import json

from benchmarks.side_by_side import main, side_by_side


def _optimizer(loss: float, accuracy: float | None = 0.9) -> dict:
    return {"final_loss_mean": loss, "test_accuracy_mean": accuracy, "test_loss_mean": 1.0}


def _task(name: str, nfn: float, adam: float, tuned: float, at_5x: float) -> dict:
    return {
        "name": name,
        "optimizers": {"nfn": _optimizer(nfn), "adam_1e-3": _optimizer(adam), "adam_tuned": _optimizer(tuned)},
        "long_horizon": {"nfn": {"loss_at_end_mean": at_5x}},
        "speedup_vs_adam_tuned": {"nfn": {"value": 1.5, "lower_bound": False}},
    }


def _run(path: str, *tasks: dict) -> dict:
    return {"checkpoint": {"path": path}, "tasks": list(tasks)}


def test_each_run_is_judged_against_its_own_baselines(tmp_path) -> None:
    a = _run("a.nfopt", _task("t1", 0.1, 0.5, 0.2, 0.05), _task("t2", 0.3, 0.5, 0.2, 0.4), _task("only_a", 1, 2, 3, 1))
    b = _run("b.nfopt", _task("t2", 0.3, 0.5, 0.4, 0.25), _task("t1", 0.1, 0.5, 0.1, 0.06))
    text = side_by_side([a, b], ["A", "B"])
    assert "only_a" not in text, "only the tasks both runs have"
    rows = [line for line in text.splitlines() if line.startswith("| t") and not line.startswith("| task")]
    assert [r.split(" | ")[0] for r in rows] == ["| t1", "| t2"], "in the first run's order"
    assert rows[0].split(" | ")[5:7] == ["0.05", "0.06"], "each run's loss at 5x the horizon"
    assert "A, wins / ties / losses in final training loss over 2 tasks" in text
    assert "vs Adam 1e-3 2 / 0 / 0, vs tuned Adam 1 / 0 / 1" in text.split("- A,")[1].split("\n")[0]
    assert "vs tuned Adam 1 / 1 / 0" in text.split("- B,")[1], "a tie with its own tuned Adam on t1"
    paths = []
    for name, run in (("a", a), ("b", b)):
        paths.append(tmp_path / name / "benchmark.json")
        paths[-1].parent.mkdir()
        paths[-1].write_text(json.dumps(run))
    assert main([str(p) for p in paths] + ["--out", str(tmp_path / "cmp.md")]).startswith("- a: `a.nfopt`")
    assert (tmp_path / "cmp.md").read_text().startswith("- a: `a.nfopt`")
