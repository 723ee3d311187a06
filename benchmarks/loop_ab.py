"""Two versions of the compiled CPU loop, or of the whole step, timed against each other in one process.

    python -m benchmarks.loop_ab --old HEAD~3                   # the working tree's loop against HEAD~3's
    python -m benchmarks.loop_ab --old /tmp/old.c --models mlp_1m resnet6 --quick
    python -m benchmarks.loop_ab --old HEAD~3 --package         # the whole package: its Python and its loop

On a machine whose speed drifts from minute to minute, two processes run minutes apart do not
compare: this builds both versions of ``nfopt/optim/fused_step.c`` (float32), steps one
NFNOptimizer per version and an Adam on the same model in alternating blocks (see
:func:`benchmarks.costs.compare`), and reports medians and ratios to that Adam. Both sources must
take the same pass struct (``nfopt.optim.fused._Pass``): a change of the struct is not
comparable this way. With ``--package``, the revision's whole ``nfopt`` is imported beside the
working tree's (as ``nfopt_at_old``, from ``git archive``), so a change on either side of the loop
is measured, struct changes included.
"""

from __future__ import annotations

import argparse
import ctypes
import importlib
import subprocess
import sys
import tarfile
import tempfile
from io import BytesIO
from pathlib import Path
from types import ModuleType

import torch

from nfopt import NFNOptimizer
from nfopt.optim import fused, rule

from .costs import FULL, MODELS, QUICK, Timing, _adam, _setup, time_ms


def build(source: Path, folder: Path, name: str) -> ctypes._CFuncPtr:
    """The float32 entry of ``source`` compiled with the loop's own flags into ``folder``."""
    target = folder / f"{name}.so"
    subprocess.run([fused.compiler(), *fused.FLAGS, "-DREAL=float", str(source), "-o", str(target), "-lm"], check=True)
    entry = getattr(ctypes.CDLL(str(target)), "nfopt_pass_f32")
    entry.argtypes = [ctypes.POINTER(fused._Pass)]
    entry.restype = ctypes.c_int
    return entry


def source_at(old: str, folder: Path) -> Path:
    """``old`` as a C file: a path to one, or a git revision whose loop is taken."""
    if Path(old).is_file():
        return Path(old)
    path = folder / "old.c"
    text = subprocess.run(["git", "show", f"{old}:nfopt/optim/fused_step.c"], check=True, capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parents[1]).stdout
    path.write_text(text)
    return path


def package_at(old: str, folder: Path) -> ModuleType:
    """The ``nfopt`` package of git revision ``old``, imported as ``nfopt_at_old`` from ``folder``
    (its modules import each other relatively, so the copy is whole and apart)."""
    archive = subprocess.run(["git", "archive", old, "nfopt"], check=True, capture_output=True,
                             cwd=Path(__file__).resolve().parents[1]).stdout
    with tarfile.open(fileobj=BytesIO(archive)) as tar:
        tar.extractall(folder, filter="data")
    (folder / "nfopt").rename(folder / "nfopt_at_old")
    sys.path.insert(0, str(folder))
    try:
        return importlib.import_module("nfopt_at_old")
    finally:
        sys.path.remove(str(folder))


def compare_packages(old: ModuleType, model_name: str, timing: Timing = FULL) -> dict[str, float]:
    """Median ms per step of the old package's optimizer, the working tree's and Adam on
    ``model_name`` (fixed gradients)."""
    model, _ = _setup(MODELS[model_name], torch.device("cpu"))
    own_default = Path(old.__file__).parent / "default.nfopt"  # older revisions look theirs up under "nfopt"
    fns = {"old": old.NFNOptimizer(model.parameters(), ckpt=own_default).step, "new": NFNOptimizer(model.parameters()).step,
           "adam": _adam(model, next(model.parameters())).step}
    return time_ms(fns, torch.device("cpu"), timing)


def compare_loops(entries: dict[str, ctypes._CFuncPtr], model_name: str, timing: Timing = FULL) -> dict[str, float]:
    """Median ms per step of each loop's optimizer and of Adam on ``model_name`` (fixed gradients)."""
    model, _ = _setup(MODELS[model_name], torch.device("cpu"))
    opts = {k: NFNOptimizer(model.parameters()) for k in entries}

    def stepping(k: str):
        def step() -> None:
            rule.fused_library = lambda dtype: entries[k]
            opts[k].step()
        return step

    fns = {k: stepping(k) for k in entries}
    fns["adam"] = _adam(model, next(model.parameters())).step
    original = rule.fused_library
    try:
        return time_ms(fns, torch.device("cpu"), timing)
    finally:
        rule.fused_library = original


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.loop_ab", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--old", required=True, help="a git revision or a C file: the loop to compare against")
    ap.add_argument("--models", nargs="+", default=["mlp_1m", "deep_narrow", "resnet6"], choices=list(MODELS))
    ap.add_argument("--quick", action="store_true", help="fewer repetitions")
    ap.add_argument("--package", action="store_true", help="compare the whole package at --old (a revision), not only its loop")
    args = ap.parse_args(argv)
    timing = QUICK if args.quick else FULL
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        if args.package:
            old = package_at(args.old, folder)
            compare = lambda name: compare_packages(old, name, timing)  # noqa: E731
        else:
            entries = {"old": build(source_at(args.old, folder), folder, "old"), "new": build(fused.SOURCE, folder, "new")}
            compare = lambda name: compare_loops(entries, name, timing)  # noqa: E731
        for name in args.models:
            ms = compare(name)
            print(name, "  ".join(f"{k} {v:.2f} ms ({v / ms['adam']:.2f}x Adam)" for k, v in ms.items()),
                  f" new/old {ms['new'] / ms['old']:.3f}")


if __name__ == "__main__":
    main()
