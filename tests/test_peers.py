"""Ranks that die: SIGKILL to one process of a 2-process run ends the other within seconds, with one line that names
the rank, how it ended and the checkpoint to resume, a non-zero exit and no traceback; resumed from last.ckpt, the
run reaches the uninterrupted run's final loss."""

import ctypes
import os
import re
import signal
import time
from pathlib import Path

import pytest
from test_interrupt import DDP, assert_resumes_exactly, children, finish, saved_step, start, uninterrupted  # noqa: F401

PR_SET_CHILD_SUBREAPER = 36


def gone_within(pid: int, seconds: float) -> int:
    """Wait for pid, a child of this process, to end within seconds; its exit status (negative: the signal)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.05)
    os.kill(pid, signal.SIGKILL)
    raise AssertionError(f"process {pid} still running {seconds} s after its peer died")


@pytest.fixture
def subreaper():
    """Processes orphaned while the test runs become this one's children, so that their exit status can be read."""
    libc = ctypes.CDLL(None, use_errno=True)
    assert libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
    yield
    libc.prctl(PR_SET_CHILD_SUBREAPER, 0, 0, 0, 0)


@pytest.mark.slow  # two 2-process runs and a resume each: about 2 minutes
@pytest.mark.parametrize("victim", [1, 0], ids=["rank1", "rank0"])
def test_a_killed_rank_ends_the_run_in_one_line_and_it_resumes(
    tmp_path: Path,
    small_corpus: Path,
    uninterrupted: Path,  # noqa: F811
    subreaper: None,
    victim: int,
) -> None:
    root = tmp_path / "run"
    proc = start(root, small_corpus, *DDP)
    ckpt = root / "checkpoints" / "last.ckpt"
    deadline = time.monotonic() + 300
    while not ckpt.exists() or saved_step(root) < 10:
        assert proc.poll() is None and time.monotonic() < deadline, "the run ended before it saved a checkpoint"
        time.sleep(0.01)
    time.sleep(0.5)  # some steps past it
    (rank1,) = children(proc.pid)
    killed = (proc.pid, rank1)[victim]
    killed_at = time.monotonic()
    os.kill(killed, signal.SIGKILL)
    if victim == 0:
        proc.wait(timeout=5)  # then rank 1 is an orphan: this process's child
        survivor_status = gone_within(rank1, 60)
    else:
        proc.wait(timeout=60)
        survivor_status = proc.returncode
    assert time.monotonic() - killed_at < 60
    stderr = finish(proc)
    assert survivor_status == 1, stderr
    assert "Traceback" not in stderr, stderr
    (line,) = [line for line in stderr.splitlines() if line.startswith("error:")]
    how = "was killed by SIGKILL" if victim == 1 else r"died without a word \(killed: SIGKILL, the OOM killer"
    step = saved_step(root)
    assert re.match(
        rf"error: rank {victim} of 2 {how}.* at step \d+; the other processes ended: the newest intact checkpoint is "
        rf"{re.escape(str(ckpt))} \(step {step}\): resume with --ckpt_path last$",
        line,
    ), line
    assert_resumes_exactly(root, small_corpus, uninterrupted, step, *DDP)
