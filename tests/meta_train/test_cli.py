"""``python -m meta_train``: smoke run, TensorBoard scalars, checkpoints, resume after SIGKILL."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from meta_train.cli import main
from meta_train.trainer import OPERATIONAL_FIELDS, MetaConfig
from nfopt.io import load_rule
from nfopt.optim.optimizer import NFNOptimizer, default_checkpoint_path


ROOT = Path(__file__).resolve().parents[2]
SMOKE = str(ROOT / "meta_train" / "configs" / "smoke.json")
COMMITTED = ROOT / "meta_train" / "configs" / "default.json"


def test_shipped_default_is_the_committed_config_meta_trained():
    """The rule in the wheel is what ``--config meta_train/configs/default.json`` produces: same
    training config (bar where files go), same number of meta-steps, and the same rule config."""
    rule = load_rule(default_checkpoint_path())
    prov = rule.provenance
    committed = MetaConfig.from_dict(json.loads(COMMITTED.read_text()))
    shipped = MetaConfig.from_dict(prov["config"])
    where = OPERATIONAL_FIELDS - {"meta_steps"}
    assert {k: v for k, v in shipped.to_dict().items() if k not in where} == {
        k: v for k, v in committed.to_dict().items() if k not in where
    }
    assert prov["meta_trained"] is True and prov["meta_steps"] == committed.meta_steps
    assert prov["skipped_steps"] == 0  # any world size: ranks share out each meta-step's tasks
    assert rule.config == committed.rule


def test_smoke_run_writes_a_rule_nfn_optimizer_loads_and_logs(tmp_path, monkeypatch):
    out = tmp_path / "rule.nfopt"
    commits = iter(["at-start", "later"])  # the checkout's commit when asked first, then a later one
    monkeypatch.setattr("meta_train.cli.git_commit", lambda: next(commits))
    main(["--config", SMOKE, "--set", "seed=3", "--out", str(out), "--log-dir", str(tmp_path / "tb")])
    rule = load_rule(out)
    prov = rule.provenance
    assert prov["meta_steps"] == 6 and prov["seed"] == 3 and prov["config"]["tasks_per_step"] == 2
    assert prov["inner_steps"] > 0 and prov["inner_steps_per_s"] > 0 and "--set seed=3" in prov["command"]
    assert set(prov) >= {"wall_time_s", "git_commit", "world_size", "skipped_steps", "dropped_tasks"}
    assert prov["git_commit"] == "at-start", "the commit the run started from"
    training = torch.load(f"{out}.train.pt", weights_only=True)
    assert training["step"] == 6
    for k, v in rule.state_dict().items():
        assert torch.equal(v, training["rule"][k]), k

    model = torch.nn.Linear(3, 2)
    opt = NFNOptimizer(model.parameters(), ckpt=out)
    before = model.weight.detach().clone()
    model(torch.randn(4, 3)).square().sum().backward()
    opt.step()
    assert not torch.equal(model.weight, before)

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {f"meta/{k}" for k in ("meta_loss", "inner_loss", "grad_norm", "alpha", "beta", "gamma",
                                  "inner_steps_per_s", "skipped", "dropped_tasks")} <= tags
    assert [e.step for e in events.Scalars("meta/alpha")] == [2, 4, 6]
    assert "meta/log_val_loss" not in tags  # no held-out loss without a val_weight


def test_val_weight_is_set_from_the_command_line_and_recorded_and_logged(tmp_path):
    from meta_train.cli import build_config, parse_args

    assert build_config(parse_args(["--config", SMOKE, "--set", "val_weight=0.5"])).val_weight == 0.5
    assert build_config(parse_args(["--config", SMOKE])).val_weight == 0.0
    out = tmp_path / "rule.nfopt"
    main(["--config", SMOKE, "--set", "val_weight=0.5", "--set", "meta_steps=2", "--out", str(out),
          "--log-dir", str(tmp_path / "tb")])
    prov = load_rule(out).provenance
    assert prov["config"]["val_weight"] == 0.5 and "--set val_weight=0.5" in prov["command"]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    assert {"meta/log_val_loss", "meta/log_train_loss", "meta/val_loss"} <= set(events.Tags()["scalars"])


def test_resume_refuses_a_missing_checkpoint_or_a_changed_config(tmp_path):
    out = str(tmp_path / "r.nfopt")
    with pytest.raises(FileNotFoundError, match="no training checkpoint"):
        main(["--config", SMOKE, "--out", out, "--resume"])
    main(["--config", SMOKE, "--set", "meta_steps=1", "--out", out])
    with pytest.raises(ValueError, match="different values of \\['meta_lr'\\]"):
        main(["--config", SMOKE, "--set", "meta_lr=0.1", "--out", out, "--resume"])


def test_a_run_killed_and_resumed_ends_like_one_never_stopped(tmp_path):
    args = ["--config", SMOKE, "--set", "meta_steps=14", "--set", "checkpoint_every=2"]
    killed = tmp_path / "killed.nfopt"
    checkpoint = Path(f"{killed}.train.pt")
    proc = subprocess.Popen([sys.executable, "-m", "meta_train", *args, "--out", str(killed)], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not checkpoint.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL and not killed.exists()
    step = torch.load(checkpoint, weights_only=True)["step"]
    assert 2 <= step < 14

    main([*args, "--out", str(killed), "--resume"])
    main([*args, "--out", str(tmp_path / "whole.nfopt")])
    resumed, whole = load_rule(killed), load_rule(tmp_path / "whole.nfopt")
    assert resumed.provenance["meta_steps"] == whole.provenance["meta_steps"] == 14
    for k, v in whole.state_dict().items():
        assert torch.equal(v, resumed.state_dict()[k]), k


def test_distribution_is_set_from_the_command_line_and_recorded(tmp_path):
    from meta_train.cli import build_config, parse_args, task_distribution

    assert build_config(parse_args(["--config", SMOKE])).distribution == "v1"
    config = build_config(parse_args(["--config", SMOKE, "--set", "distribution=v2"]))
    assert config.distribution == "v2"
    assert task_distribution(MetaConfig()) == "meta_train.tasks.sample_task_config(split='train')"  # as it always was
    out = tmp_path / "rule.nfopt"
    main(["--config", SMOKE, "--set", "distribution=v2", "--set", "meta_steps=2", "--out", str(out)])
    prov = load_rule(out).provenance
    assert prov["config"]["distribution"] == "v2"
    assert prov["task_distribution"] == "meta_train.tasks.sample_task_config(split='train', distribution='v2')"
