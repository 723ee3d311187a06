"""Running a test's ranks in spawned processes with a deadline, so that a rendezvous that never
completes fails the test instead of hanging the suite.

``mp.spawn(..., join=True)`` waits for ever: a gloo pair that cannot connect (a hostname that
resolves to an interface the ranks cannot reach each other on, a port taken between choosing and
binding it) leaves the suite blocked until CI's own limit. Here the ranks talk over the loopback
interface, and whatever is still running at the deadline is killed and reported."""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable
from typing import Any
from unittest import mock

import pytest
import torch.multiprocessing as mp

DEADLINE_S = 300.0
"""Seconds the ranks of one run may take; the runs here take a few seconds each."""


def free_port() -> int:
    """A TCP port free on the loopback interface now (the OS picks it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def loopback_interface() -> str | None:
    """The name of the loopback interface, where the platform lists one."""
    try:
        names = [name for _, name in socket.if_nameindex()]
    except (AttributeError, OSError):
        return None
    return next((n for n in ("lo", "lo0") if n in names), None)


def run_ranks(worker: Callable[..., None], args: tuple[Any, ...], nprocs: int,
              deadline_s: float = DEADLINE_S) -> None:
    """``worker(rank, port, *args)`` in ``nprocs`` spawned processes that rendezvous on a fresh
    loopback port; returns when all have exited cleanly, re-raises a rank's exception, and fails
    the test (killing the ranks) if they are not done within ``deadline_s``."""
    lo = loopback_interface()
    # gloo otherwise binds to the address the hostname resolves to; the children inherit this
    with mock.patch.dict(os.environ, {} if lo is None else {"GLOO_SOCKET_IFNAME": lo}):
        ctx = mp.start_processes(worker, args=(free_port(), *args), nprocs=nprocs, join=False,
                                 start_method="spawn")
    end = time.monotonic() + deadline_s
    while not ctx.join(timeout=max(0.0, end - time.monotonic())):
        if time.monotonic() >= end:
            alive = [rank for rank, p in enumerate(ctx.processes) if p.is_alive()]
            for p in ctx.processes:
                p.kill()
            for p in ctx.processes:
                p.join()
            pytest.fail(f"ranks {alive} of {nprocs} still running after {deadline_s:.0f} s: the "
                        f"process group never completed its rendezvous or a collective")
