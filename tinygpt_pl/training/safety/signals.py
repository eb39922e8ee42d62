"""The signals that stop a run (SIGTERM, SIGINT or Ctrl-C, SIGUSR1 that SLURM sends before a time limit, SIGHUP of a
dropped SSH session), outside the training loop. Standard library only: train.py installs stop_while_starting before
it imports torch. From the first training step on, interrupt.GracefulStop handles them."""

import contextlib
import os
import signal
import subprocess
from collections.abc import Callable
from typing import Any

SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGHUP)
cleanups: list[Callable[[], None]] = []  # see at_abort


def install(handler: Callable[[int, Any], None]) -> None:
    for signum in SIGNALS:
        signal.signal(signum, handler)


def at_abort(cleanup: Callable[[], None]) -> None:
    """Have stop_while_starting call cleanup before it ends the process."""
    cleanups.append(cleanup)


def stop_while_starting(signum: int, frame: Any) -> None:
    """Before the first training step a signal ends the process at once (exit status 128 + its number): there is
    nothing new to save. It ends without unwinding, since an exception raised from here can surface inside torch's
    C++ code, which aborts: the at_abort cleanups run first. Later signals change nothing."""
    install(lambda *_: None)
    for cleanup in reversed(cleanups):
        with contextlib.suppress(Exception):
            cleanup()
    if is_global_rank_zero():
        name = signal.Signals(signum).name
        line = f"stopped by {name} before the first training step (nothing new to save): run the same command again"
        os.write(2, f"\n{line}\n".encode())  # a print could be the one this signal interrupted
    os._exit(128 + signum)


def ignore_signals(worker_id: int) -> None:
    """A DataLoader worker's init: the training process handles the signals. (A worker would die of SIGUSR1, SIGHUP
    or a SIGTERM that is not from its parent, and the step under way with it.)"""
    install(signal.SIG_IGN)


def detach_from_terminal() -> None:
    """After SIGHUP the terminal is gone and writing to it fails: send what would go there to /dev/null instead."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    for fd in (1, 2):
        if os.isatty(fd):
            os.dup2(devnull, fd)
    os.close(devnull)


def is_global_rank_zero() -> bool:
    """Whether this process is the run's first, from the variables that torchrun, SLURM and Lightning's launcher set
    (Lightning starts its other DDP processes with LOCAL_RANK set)."""
    return all(int(os.environ.get(name, 0)) == 0 for name in ("RANK", "SLURM_PROCID", "NODE_RANK", "LOCAL_RANK"))


def requeue_slurm_job() -> str:
    """Put this SLURM job back in the queue (it was submitted with sbatch --requeue); says what happened."""
    job = os.environ["SLURM_JOB_ID"]
    if "SLURM_ARRAY_JOB_ID" in os.environ:
        job = f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ['SLURM_ARRAY_TASK_ID']}"
    try:
        result = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"could not requeue SLURM job {job} ({e})"
    if result.returncode:
        return f"could not requeue SLURM job {job} ({' '.join(result.stderr.split()) or result.returncode})"
    return f"requeued SLURM job {job}: it resumes by itself when it starts again"
