"""The A/B of two compiled loops or packages: a revision's source is found, both versions build and step."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks import loop_ab
from nfopt import NFNOptimizer
from nfopt.optim import fused


def test_a_revision_gives_its_loop(tmp_path) -> None:
    path = loop_ab.source_at("HEAD", tmp_path)
    shown = subprocess.run(["git", "show", "HEAD:nfopt/optim/fused_step.c"], capture_output=True, text=True, check=True,
                           cwd=fused.SOURCE.parents[2])
    assert path.read_text() == shown.stdout
    assert loop_ab.source_at(str(fused.SOURCE), tmp_path) == fused.SOURCE


@pytest.mark.skipif(fused.library(torch.float32) is None, reason="no C compiler for the fused loop")
def test_both_loops_step_and_are_timed(capsys) -> None:
    loop_ab.main(["--old", str(fused.SOURCE), "--models", "deep_narrow", "--quick"])
    line = capsys.readouterr().out.strip()
    assert line.startswith("deep_narrow old ") and " new " in line and "(1.00x Adam)" in line and " new/old " in line


def test_a_revision_of_the_whole_package_steps_beside_the_working_tree(capsys) -> None:
    loop_ab.main(["--old", "HEAD", "--package", "--models", "deep_narrow", "--quick"])
    line = capsys.readouterr().out.strip()
    assert line.startswith("deep_narrow old ") and " new/old " in line
    old = sys.modules.get("nfopt_at_old")
    assert old is not None and old.NFNOptimizer is not NFNOptimizer
    assert old.optim.default_checkpoint_path().parent == Path(old.__file__).parent, "the revision's own default rule"
