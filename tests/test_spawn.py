"""The deadline on spawned ranks: a rank that never returns fails the test and is killed, a
rank's exception reaches the test, and ranks that finish return."""

from __future__ import annotations

import os
import time

import pytest
from torch.multiprocessing import ProcessRaisedException

from .spawn import loopback_interface, run_ranks


def sleeper(rank: int, port: int, pid_dir: str) -> None:
    """Rank 1 never returns (a rank waiting on a peer that is not there); rank 0 does."""
    with open(os.path.join(pid_dir, f"rank{rank}"), "w") as f:
        f.write(str(os.getpid()))
    if rank == 1:
        time.sleep(3600)


def raiser(rank: int, port: int) -> None:
    if rank == 0:
        raise RuntimeError(f"rank {rank} failed on port {port}")


def writer(rank: int, port: int, out_dir: str) -> None:
    with open(os.path.join(out_dir, f"rank{rank}"), "w") as f:
        f.write(f"{port} {os.environ.get('GLOO_SOCKET_IFNAME')}")


def test_a_hung_rank_fails_the_test_and_is_killed(tmp_path) -> None:
    start = time.monotonic()
    with pytest.raises(pytest.fail.Exception, match=r"ranks \[1\] of 2 still running"):
        run_ranks(sleeper, (str(tmp_path),), 2, deadline_s=20.0)  # room for both to start on a busy machine
    assert time.monotonic() - start < 60
    pid = int((tmp_path / "rank1").read_text())
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


def test_a_rank_exception_reaches_the_test() -> None:
    with pytest.raises(ProcessRaisedException, match="rank 0 failed"):
        run_ranks(raiser, (), 2)


def test_ranks_that_finish_return_and_share_one_port(tmp_path) -> None:
    saved = os.environ.get("GLOO_SOCKET_IFNAME")
    run_ranks(writer, (str(tmp_path),), 2)
    seen = {(tmp_path / f"rank{r}").read_text() for r in range(2)}
    assert len(seen) == 1  # one port for both ranks
    assert seen.pop().split()[1] == str(loopback_interface())  # the ranks talk over loopback
    assert os.environ.get("GLOO_SOCKET_IFNAME") == saved  # the test process's environment is restored
