"""Signals to a running train.py: it finishes the optimizer step under way, saves last.ckpt at that step, says so in one
line and exits with 128 + the signal's number; resumed, it goes on exactly as the uninterrupted run."""

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import pytest
import torch
from conftest import ROOT, STARTED, train
from lightning.pytorch.demos.boring_classes import BoringModel
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from test_scale import DDP, assert_close, scalars

from tinygpt_pl.training.safety.interrupt import GracefulStop
from tinygpt_pl.training.safety.signals import SIGNALS, install, stop_while_starting

STEPS = 60
# train/loss at every step, validation (and last.ckpt) every 10 steps, one schedule for 60 steps, 16 sequences a step
FLAGS = ["--trainer.log_every_n_steps", "1", "--trainer.val_check_interval", "10", "--model.lr_decay_steps", str(STEPS),
         "--model.sample_tokens", "0", "--data.global_batch_size", "16"]  # fmt: skip


def command(root: Path, corpus: Path, *args: str) -> list[str]:
    """train.py on the debug config with FLAGS, as long as it is not stopped."""
    return [sys.executable, str(ROOT / "train.py"), "--config", "configs/debug.yaml", "--data.path", str(corpus),
            "--trainer.default_root_dir", str(root), "--trainer.enable_progress_bar", "false", *FLAGS,
            "--trainer.max_steps", "100000", *args]  # fmt: skip


def start(root: Path, corpus: Path, *args: str, env: dict | None = None) -> subprocess.Popen:
    """command() started; its output goes to a file beside root."""
    log = open(root.with_name(root.name + ".log"), "w+")  # noqa: SIM115 (read and closed by finish)
    proc = subprocess.Popen(command(root, corpus, *args), cwd=ROOT, stdout=log, stderr=log, env=env)
    proc.log = log
    STARTED.append(proc)
    return proc


def finish(proc: subprocess.Popen, timeout: float = 300) -> str:
    """Wait for the process; its output."""
    proc.wait(timeout=timeout)
    with proc.log as log:
        log.seek(0)
        return log.read()


def wait_for_training(proc: subprocess.Popen, root: Path) -> None:
    """Until the run has written its first checkpoint (the validation after step 10): it is training."""
    deadline = time.monotonic() + 300
    while not (root / "checkpoints" / "last.ckpt").exists():
        assert proc.poll() is None and time.monotonic() < deadline, "the run ended before it saved a checkpoint"
        time.sleep(0.005)


def children(pid: int) -> list[int]:
    """The processes whose parent is pid (Lightning's DDP launcher starts ranks 1.. as children of rank 0)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def saved_step(root: Path) -> int:
    return torch.load(root / "checkpoints" / "last.ckpt", weights_only=True)["global_step"]


def assert_stopped(stderr: str, signum: int, root: Path) -> int:
    """The run stopped with one line naming its step and the signal, exit status checked by the caller; the step
    saved is the one under way when the signal came (or the validation's). Returns that step."""
    name = signal.Signals(signum).name
    (line,) = [line for line in stderr.splitlines() if line.startswith("stopped at step")]
    step = int(re.fullmatch(rf"stopped at step (\d+) by {name}: resume with --ckpt_path last.*", line)[1])
    assert "Traceback" not in stderr and "error" not in stderr.lower(), stderr
    assert saved_step(root) == step
    received = re.search(rf"received {name} during (step|the validation after step) (\d+)", stderr)
    if received:  # the first process got the signal itself
        assert int(received[2]) == step, stderr
    return step


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory, small_corpus: Path) -> Path:
    root = tmp_path_factory.mktemp("uninterrupted")
    result = train(root, small_corpus, *FLAGS, "--trainer.max_steps", str(STEPS))
    assert result.returncode == 0, result.stderr
    return root


def assert_resumes_exactly(root: Path, small_corpus: Path, reference: Path, stopped_at: int, *args: str) -> None:
    """Resumed to STEPS, the run logs the losses of the uninterrupted run from the step it stopped at, and ends with
    its weights."""
    assert 10 <= stopped_at < STEPS, f"stopped at step {stopped_at}: too late to test the resume (slow machine?)"
    resumed = train(root, small_corpus, *FLAGS, *args, "--trainer.max_steps", str(STEPS), "--ckpt_path", "last")
    assert resumed.returncode == 0, resumed.stderr
    for tag in ("train/loss", "val/loss"):
        expected = {s: v for s, v in scalars(reference, tag).items() if s >= stopped_at}
        assert_close(scalars(root, tag, version=1), expected)
    assert saved_step(root) == STEPS
    whole = torch.load(reference / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    split = torch.load(root / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    for key, value in whole.items():
        torch.testing.assert_close(split[key], value, rtol=0, atol=1e-5)


def test_sigterm_saves_the_step_under_way_and_the_run_resumes_exactly(tmp_path, small_corpus, uninterrupted) -> None:
    root = tmp_path / "run"
    proc = start(root, small_corpus)
    wait_for_training(proc, root)
    proc.send_signal(signal.SIGTERM)
    stderr = finish(proc)
    assert proc.returncode == 128 + signal.SIGTERM, stderr
    step = assert_stopped(stderr, signal.SIGTERM, root)
    # the steps before the signal were logged as the uninterrupted run logged them
    before = {s: v for s, v in scalars(uninterrupted, "train/loss").items() if s < step}
    assert_close(scalars(root, "train/loss"), before)
    assert_resumes_exactly(root, small_corpus, uninterrupted, step)


def test_sigterm_to_one_ddp_rank_stops_both_at_one_step_and_they_resume_exactly(
    tmp_path, small_corpus, uninterrupted
) -> None:
    """SIGTERM to rank 1 only: both processes agree on the step, rank 0 saves it, and the DDP run resumed on 2
    processes goes on as the one-process run with the same global batch."""
    root = tmp_path / "run"
    proc = start(root, small_corpus, *DDP)
    wait_for_training(proc, root)
    (rank1,) = children(proc.pid)
    os.kill(rank1, signal.SIGTERM)
    stderr = finish(proc)
    assert proc.returncode == 128 + signal.SIGTERM, stderr
    step = assert_stopped(stderr, signal.SIGTERM, root)
    assert_resumes_exactly(root, small_corpus, uninterrupted, step, *DDP)


SLOW = pytest.mark.slow  # the same path as SIGINT's (SIGUSR1 also runs in the SLURM test)


@pytest.mark.parametrize(
    "signum",
    [signal.SIGINT, pytest.param(signal.SIGHUP, marks=SLOW), pytest.param(signal.SIGUSR1, marks=SLOW)],
    ids=lambda s: s.name,
)
def test_each_stop_signal_saves_its_step_and_a_second_one_changes_nothing(tmp_path, small_corpus, signum) -> None:
    root = tmp_path / "run"
    proc = start(root, small_corpus, "--checkpoint.every_n_train_steps", "1")  # a save at every step: the second signal
    wait_for_training(proc, root)  # comes during one
    proc.send_signal(signum)
    time.sleep(0.001)
    proc.send_signal(signum)
    stderr = finish(proc)
    assert proc.returncode == 128 + signum, stderr
    assert_stopped(stderr, signum, root)
    assert not list((root / "checkpoints").glob(".*.tmp"))  # no half-written file left


def test_a_signal_while_starting_stops_at_once_and_leaves_nothing(tmp_path, small_corpus) -> None:
    root = tmp_path / "run"
    proc = start(root, small_corpus)
    time.sleep(0.5)  # importing torch
    proc.send_signal(signal.SIGTERM)
    stderr = finish(proc, timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, stderr
    assert stderr.strip().splitlines()[-1] == (
        "stopped by SIGTERM before the first training step (nothing new to save): run the same command again"
    )
    assert "Traceback" not in stderr and not root.exists()


class FailsAtItsThirdStep(BoringModel):
    def training_step(self, batch: torch.Tensor, batch_idx: int) -> dict:
        if batch_idx == 2:
            raise RuntimeError("a collective failed")
        return super().training_step(batch, batch_idx)


def test_a_signal_after_training_failed_is_not_taken_for_one_before_it_started(tmp_path) -> None:
    """When fit ends by an error, Lightning puts back the handlers it found as fit started. They must be GracefulStop's,
    which records a signal, and not train.py's stop_while_starting, which ends the process at once, saying the run
    stopped before its first step: torchrun's SIGTERM, sent once a peer died, did that and cut the peer's report."""
    found = {signum: signal.getsignal(signum) for signum in SIGNALS}
    stop = GracefulStop()
    install(stop_while_starting)  # as train.py does
    try:
        off = dict.fromkeys(("logger", "enable_checkpointing", "enable_progress_bar", "enable_model_summary"), False)
        trainer = L.Trainer(max_steps=5, callbacks=[stop], default_root_dir=tmp_path, **off)
        with pytest.raises(RuntimeError, match="a collective failed"):
            trainer.fit(FailsAtItsThirdStep())
        assert signal.getsignal(signal.SIGTERM) == stop._handle
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.signum == signal.SIGTERM
    finally:
        for signum, handler in found.items():
            signal.signal(signum, handler)


def test_slurm_requeues_the_job_on_sigusr1_and_the_requeued_job_resumes_by_itself(
    tmp_path, small_corpus, uninterrupted
) -> None:
    """Under SLURM (its variables set, a stand-in scontrol on PATH), SIGUSR1 saves the step, requeues the job with
    `scontrol requeue`, and the same command started again by SLURM (SLURM_RESTART_COUNT=1) resumes by itself."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    scontrol = bin_dir / "scontrol"
    scontrol.write_text(f'#!/bin/sh\necho "$@" >> {tmp_path / "scontrol.log"}\n')
    scontrol.chmod(0o755)
    slurm = {"SLURM_JOB_ID": "4242", "SLURM_NTASKS": "1", "SLURM_JOB_NAME": "train", "SLURM_PROCID": "0",
             "SLURM_LOCALID": "0", "SLURM_NODEID": "0", "SLURM_NODELIST": "localhost"}  # fmt: skip
    env = {**os.environ, **slurm, "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    root = tmp_path / "run"
    proc = start(root, small_corpus, env=env)
    wait_for_training(proc, root)
    proc.send_signal(signal.SIGUSR1)
    stderr = finish(proc)
    assert proc.returncode == 128 + signal.SIGUSR1, stderr
    step = assert_stopped(stderr, signal.SIGUSR1, root)
    assert "requeued SLURM job 4242: it resumes by itself" in stderr
    assert (tmp_path / "scontrol.log").read_text() == "requeue 4242\n"

    env["SLURM_RESTART_COUNT"] = "1"
    again = subprocess.run(command(root, small_corpus, "--trainer.max_steps", str(STEPS)), cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=300)  # fmt: skip
    assert again.returncode == 0, again.stderr
    assert "SLURM started this job again: resuming from" in again.stderr
    assert saved_step(root) == STEPS
    # Lightning names the log folder after the job: both parts of the run log there, each step once
    logged = EventAccumulator(str(root / "lightning_logs" / "version_4242")).Reload().Scalars("train/loss")
    assert sorted(e.step for e in logged) == list(range(STEPS)) and step < STEPS


def test_a_signal_during_a_validation_stops_after_it_with_its_checkpoint(tmp_path, corpus) -> None:
    """The full corpus validates in 150 batches here: SIGTERM once the first validation is under way (the progress
    bar says so) stops the run at that validation's step, saved by it."""
    root = tmp_path / "run"
    proc = start(root, corpus, "--trainer.enable_progress_bar", "true", "--trainer.limit_val_batches", "150")
    deadline = time.monotonic() + 120
    while "Validation DataLoader 0:" not in root.with_name(root.name + ".log").read_text():
        assert proc.poll() is None and time.monotonic() < deadline, "no validation began"
        time.sleep(0.005)
    proc.send_signal(signal.SIGTERM)
    stderr = finish(proc)
    assert proc.returncode == 128 + signal.SIGTERM, stderr
    assert "received SIGTERM during the validation after step 10" in stderr
    assert assert_stopped(stderr, signal.SIGTERM, root) == 10
