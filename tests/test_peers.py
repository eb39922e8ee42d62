"""Ranks that die: SIGKILL to one process of a 2-process run ends the other within seconds, with one line that names
the rank, how it ended and the checkpoint to resume, a non-zero exit and no traceback; resumed from last.ckpt, the
run reaches the uninterrupted run's final loss."""

import ctypes
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import ROOT, STARTED
from test_interrupt import (
    STEPS,
    assert_resumes_exactly,
    children,
    command,
    finish,
    saved_step,
    start,
    uninterrupted,  # noqa: F401 (a fixture)
)
from test_scale import DDP, scalars

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
    # the newest checkpoint, last.ckpt at equal steps: a kill between a validation's two files leaves best-*.ckpt newer
    newest_step, _, newest = max((torch.load(path, weights_only=True)["global_step"], path == ckpt, path)
                                 for path in ckpt.parent.glob("*.ckpt"))  # fmt: skip
    resume = "last" if newest == ckpt else re.escape(str(newest))
    assert re.match(
        rf"error: rank {victim} of 2 {how}.* at step \d+; the other processes ended: the newest intact checkpoint is "
        rf"{re.escape(str(newest))} \(step {newest_step}\): resume with --ckpt_path {resume}$",
        line,
    ), line
    assert_resumes_exactly(root, small_corpus, uninterrupted, step, *DDP)


def rank_of(pid: int) -> int:
    environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return int(next(v for v in environ if v.startswith(b"RANK=")).split(b"=")[1])


@pytest.mark.slow  # a 2-process run under torchrun, started twice: about 2 minutes
def test_torchrun_restarts_resume_from_last_ckpt_to_the_uninterrupted_runs_weights(
    tmp_path: Path,
    small_corpus: Path,
    uninterrupted: Path,  # noqa: F811
) -> None:
    """torchrun --max-restarts 1, rank 1 killed once after the first checkpoint: torchrun starts both workers again,
    they resume from last.ckpt by themselves, and the run ends as the uninterrupted one-process run did."""
    root = tmp_path / "run"
    train = command(root, small_corpus, *DDP, "--trainer.max_steps", str(STEPS))[1:]
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    # README's form (a static rendezvous), whose one store for all attempts cli.separate_torchrun_attempts splits
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", "2",
                "--master-addr", "127.0.0.1", "--master-port", str(port), "--max-restarts", "1", *train]  # fmt: skip
    log = open(tmp_path / "torchrun.log", "w+")  # noqa: SIM115 (closed by finish)
    proc = subprocess.Popen(torchrun, cwd=ROOT, stdout=log, stderr=log)
    proc.log = log
    STARTED.append(proc)
    deadline = time.monotonic() + 300
    while not (root / "checkpoints" / "last.ckpt").exists():
        assert proc.poll() is None and time.monotonic() < deadline, "the run ended before it saved a checkpoint"
        time.sleep(0.01)
    (rank1,) = [pid for pid in children(proc.pid) if rank_of(pid) == 1]
    os.kill(rank1, signal.SIGKILL)
    output = finish(proc, timeout=600)
    assert proc.returncode == 0, output
    assert "torchrun started the workers again: resuming from" in output, output
    errors = [line for line in output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, output
    (line,) = errors
    assert "rank 1 of 2 died without a word" in line and line.endswith("torchrun starts the workers again, which "
                                                                       "resume from last.ckpt"), line  # fmt: skip
    assert saved_step(root) == STEPS
    whole = torch.load(uninterrupted / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    split = torch.load(root / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    for key, value in whole.items():
        torch.testing.assert_close(split[key], value, rtol=0, atol=1e-5)
    final = max(scalars(uninterrupted, "val/loss").items())
    assert max(scalars(root, "val/loss", version=1).items()) == pytest.approx(final, abs=1e-5)
