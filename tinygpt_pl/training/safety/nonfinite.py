"""Divergence: a loss or gradient norm that became inf or nan stops the run before it can write a checkpoint.

Every optimizer step updates a few flags on the device, without waiting for it; they are read (one host sync) only on
the steps that log, before every validation and before every checkpoint is written. So a diverged run writes no
checkpoint with non-finite weights and samples no text from them: it stops with one line that names the step and the
newest checkpoint, whose weights are finite.

With skip=True, a step whose gradients are non-finite is skipped instead, on the device (the fused AdamW step takes a
found_inf flag, as under a GradScaler): the weights and the optimizer state stay as they were. Skips are counted, and
the run still stops after max_skips_in_a_row of them in a row.
"""

from pathlib import Path

import lightning as L
import torch

from tinygpt_pl.errors import RunStopped
from tinygpt_pl.training.checkpoint import checkpoint_step


class Diverged(RunStopped):
    pass


class NonFiniteGuard:
    def __init__(self, skip: bool, max_skips_in_a_row: int) -> None:
        self.skip, self.max_skips_in_a_row = skip, max_skips_in_a_row
        self.skipped_before = 0  # skipped steps of the run before it was resumed

    def reset(self, device: torch.device) -> None:
        zero = torch.zeros((), dtype=torch.long, device=device)
        self.loss_finite = torch.ones((), dtype=torch.bool, device=device)
        self.first_bad = zero - 1  # the first step with a non-finite loss or gradient norm; -1: none
        self.skipped, self.in_a_row, self.most_in_a_row = zero.clone(), zero.clone(), zero.clone()

    def observe_loss(self, loss: torch.Tensor) -> None:
        self.loss_finite &= loss.isfinite()

    def observe_step(self, grad_norm: torch.Tensor, step: int) -> torch.Tensor | None:
        """Take in the gradient norm of step (counted from 1, as checkpoints count); returns the found_inf flag for the
        optimizer when steps are skipped."""
        bad_grads = ~grad_norm.isfinite()
        bad = bad_grads | ~self.loss_finite
        self.loss_finite.fill_(True)
        self.first_bad = torch.where(bad & (self.first_bad < 0), step, self.first_bad)
        if not self.skip:
            return None
        self.skipped += bad_grads
        self.in_a_row = (self.in_a_row + 1) * bad_grads
        self.most_in_a_row = torch.maximum(self.most_in_a_row, self.in_a_row)
        return bad_grads.float()

    def skipped_steps(self) -> torch.Tensor:
        return self.skipped + self.skipped_before

    def check(self, trainer: L.Trainer) -> None:
        """Stop the run (raise Diverged, on every rank alike) if the weights may be non-finite by now."""
        if not hasattr(self, "first_bad"):  # no training step yet
            return
        first_bad = int(self.first_bad)
        if self.skip:
            diverged = int(self.most_in_a_row) >= self.max_skips_in_a_row
        else:
            diverged = first_bad >= 0
        if not trainer.strategy.reduce_boolean_decision(diverged, all=False):
            return
        what = (
            f"{self.max_skips_in_a_row} steps in a row had non-finite gradients (skipped)"
            if self.skip
            else f"the loss or gradient norm became non-finite at step {first_bad}"
        )
        raise Diverged(f"{what}; {what_to_do(trainer)} with a lower --model.learning_rate")


def what_to_do(trainer: L.Trainer) -> str:
    """Names the run's newest checkpoint, last.ckpt, whose weights the guard's checks kept finite."""
    callback = trainer.checkpoint_callback
    last = Path(callback.dirpath) / "last.ckpt" if callback and callback.dirpath else None
    if last is None or not last.is_file():
        return "no checkpoint was written before it: start again"
    return f"the newest checkpoint, with finite weights, is {last} (step {checkpoint_step(last)}): resume from it"
