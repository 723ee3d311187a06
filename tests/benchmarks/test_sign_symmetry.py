"""The sign-flip experiment: its task list and its comparison table."""

from __future__ import annotations

from meta_train.tasks import TaskConfig, held_out_properties
from nfopt.io import save_rule

from benchmarks.sign_symmetry import compare, markdown, tanh_tasks

from ..rules import open_rule


def test_tasks_are_held_out_tanh_networks_drawn_from_the_seed():
    tasks = tanh_tasks(4)
    assert len(tasks) == 7 and all(t.activation == "tanh" and held_out_properties(t) for t in tasks)
    assert len({t.name for t in tasks}) == 7 and tanh_tasks(4) == tasks


def test_comparison_runs_both_rules_on_the_same_tasks(tmp_path):
    paths = {}
    for name, flips in (("sign", True), ("perm", False)):
        paths[name] = str(tmp_path / f"{name}.nfopt")
        save_rule(open_rule(sign_flips=flips), paths[name])
    task = TaskConfig("digits", "mlp", depth=1, width=16, activation="tanh", horizon=6, name="tiny")
    rows = compare([task], 2, paths)
    assert len(rows[0]["losses"]["sign"]) == 2 and rows[0]["mean"]["sign"] != rows[0]["mean"]["perm"]
    assert "| tiny |" in markdown(rows, "cmd", 1.0)
