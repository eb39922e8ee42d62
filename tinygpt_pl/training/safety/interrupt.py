"""Interrupting a run without losing it: a signal (signals.SIGNALS) ends the run at the end of an optimizer step that
every rank agrees on, with last.ckpt saved at that step, and an exit status of 128 + the signal's number, so that a
scheduler or a shell loop sees that the run did not finish.

From the first training step on, a signal is only recorded: the step under way finishes, the ranks agree to stop (one
all-reduce of one number per optimizer step, on the CPU), the Trainer stops without validating, and RunCheckpoint
writes last.ckpt at that step. Later signals change nothing, so a second Ctrl-C cannot break the save. A signal to one
DDP rank stops them all at the same step; a signal during a validation stops the run after it (and its checkpoint).
"""

import os
import signal

import lightning as L
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import Callback

from tinygpt_pl.training.safety.signals import (
    detach_from_terminal,
    install,
    is_global_rank_zero,
    requeue_slurm_job,
    stop_while_starting,
)


class GracefulStop(Callback):
    """Turns signals, and faults reported with request_stop, into a stop at an agreed step end."""

    def __init__(self) -> None:
        self.signum: int | None = None  # the first signal received
        self.fault: str | None = None  # a fault that asks the run to stop (request_stop)
        self.exit_code = 0  # agreed by all ranks; non-zero: the run stopped early
        self.group: dist.ProcessGroup | None = None
        self.trainer: L.Trainer | None = None
        self.validating = False  # in a validation that ends with an agreement

    def _handle(self, signum: int, frame: object) -> None:
        if self.trainer is None:
            stop_while_starting(signum, frame)
        if signum == signal.SIGHUP:
            detach_from_terminal()
        if self.signum is not None:
            return
        self.signum = signum
        if is_global_rank_zero():
            done = self.trainer.global_step
            where = f"the validation after step {done}" if self.validating else f"step {done + 1}"
            os.write(2, f"\nreceived {signal.Signals(signum).name} during {where}: stopping at its end\n".encode())

    def request_stop(self, message: str) -> None:
        """Stop the run at the next agreed step end with exit status 1, and say message."""
        self.fault = self.fault or message

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        # before Lightning saves the handlers it finds, to put them back when fit ends, also by an error: a signal
        # after that (torchrun's SIGTERM once a peer died) must not pass for one that came before the first step
        install(self._handle)
        if trainer.world_size > 1 and dist.get_backend() != "gloo":
            self.group = dist.new_group(backend="gloo")  # agree on the CPU: no wait for the GPU at every step

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # also replaces the SIGTERM handler that Lightning put in when fit started, which ends the run at the next
        # micro-batch with exit status 0 and no checkpoint (no public switch turns it off)
        self.trainer, self.last_step = trainer, trainer.global_step
        install(self._handle)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: object) -> None:
        if trainer.global_step != self.last_step:  # the micro-batch that ended an optimizer step
            self.last_step = trainer.global_step
            self._agree(trainer)

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.validating = not trainer.sanity_checking

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.validating:
            self._agree(trainer)
            self.validating = False

    def _agree(self, trainer: L.Trainer) -> None:
        code = 128 + self.signum if self.signum else int(self.fault is not None)
        if trainer.world_size > 1:
            agreed = torch.tensor([code])
            dist.all_reduce(agreed, op=dist.ReduceOp.MAX, group=self.group)
            code = int(agreed)
        if code:
            self.exit_code = code
            trainer.should_stop = True
            trainer.limit_val_batches = 0  # stop now: Lightning would first validate, as it does for early stopping

    def summary(self, step: int) -> str:
        """The line that says why the run stopped at step, and how it goes on."""
        if self.exit_code <= 128:
            return f"error: {self.fault or 'another process of the run reported a fault'}"
        name = signal.Signals(self.exit_code - 128).name
        line = f"stopped at step {step} by {name}: resume with --ckpt_path last"
        if self.exit_code - 128 == signal.SIGUSR1 and "SLURM_JOB_ID" in os.environ:
            line += "; " + requeue_slurm_job()
        return line
