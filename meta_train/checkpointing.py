"""Training checkpoints: written atomically, read without unpickling, with the RNG states of the process.

A training checkpoint is a ``torch.save`` file of tensors and plain Python values only, so
``torch.load(weights_only=True)`` reads it without running code from the file. It is written to
a temporary file in the same directory and moved into place with ``os.replace``: a process
killed at any moment leaves either the previous checkpoint or the new one, never a torn file.
"""

from __future__ import annotations

import os
import random
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch


def save_atomic(obj: dict[str, Any], path: str | Path) -> None:
    """Write ``obj`` with ``torch.save`` to ``path`` atomically (temp file, fsync, ``os.replace``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def load(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_atomic`, on the CPU, without unpickling code."""
    return torch.load(path, map_location="cpu", weights_only=True)


def set_global_seeds(seed: int) -> None:
    """Seed the global RNGs of python, numpy and torch (nothing in meta-training should draw from
    them, but a run must not depend on the state its process happened to start in)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_states() -> dict[str, Any]:
    """The global RNG states of python, numpy and torch (CPU), as tensors and lists."""
    version, state, gauss = random.getstate()
    bit_generator, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "python": [version, list(state), gauss],
        "numpy": [bit_generator, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
        "torch": torch.get_rng_state(),
    }


def set_rng_states(states: dict[str, Any]) -> None:
    """Restore what :func:`rng_states` returned."""
    version, state, gauss = states["python"]
    random.setstate((version, tuple(state), gauss))
    bit_generator, keys, pos, has_gauss, cached = states["numpy"]
    np.random.set_state((bit_generator, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(states["torch"])
