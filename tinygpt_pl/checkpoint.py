"""Checkpoints: the ModelCheckpoint that train.py runs, and loading a trained GPT from a checkpoint alone, without
Lightning and without unpickling code."""

import os
from dataclasses import fields
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from tinygpt_pl.data import TextDataModule
from tinygpt_pl.errors import UsageError
from tinygpt_pl.model import GPT, GPTConfig
from tinygpt_pl.tokenizer import Tokenizer, tokenizer_from_state


class RunCheckpoint(ModelCheckpoint):
    """Lightning's ModelCheckpoint, with two mends for runs that are resumed:

    - last.ckpt holds the final step, also when the run ended between validations (Lightning saves only at
      validations and every_n_train_steps, and with gradient accumulation it defers the last of those to a
      validation that does not come);
    - a resumed run goes on writing last.ckpt, and manages the run's other checkpoints also after the run's folder
      was moved or copied. Lightning forgets them when the folder's path or a --checkpoint setting changed, and
      then writes last-v1.ckpt beside the last.ckpt it no longer recognizes, so that the next --ckpt_path last
      would resume the older file. (train.py never starts a new run in a folder that holds a last.ckpt.)
    """

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        last = os.path.join(self.dirpath, self.CHECKPOINT_NAME_LAST + self.FILE_EXTENSION)
        if self.save_last and os.path.isfile(last):
            self.last_model_path = last  # this run's, resumed: overwrite it

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.save_last and self._last_global_step_saved != trainer.global_step and not trainer.fast_dev_run:
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def load_state_dict(self, state_dict: dict) -> None:
        old = state_dict.get("dirpath")
        if old and self.dirpath and old != self.dirpath and state_dict.get("last_model_path"):

            def moved(path: str) -> str:
                return os.path.join(self.dirpath, os.path.relpath(path, old)) if path else path

            if os.path.isfile(moved(state_dict["last_model_path"])):  # the run's own files, in their new place
                state_dict = {
                    **state_dict,
                    "dirpath": self.dirpath,
                    **{k: moved(state_dict[k]) for k in ("best_model_path", "kth_best_model_path", "last_model_path")},
                    "best_k_models": {moved(k): v for k, v in state_dict.get("best_k_models", {}).items()},
                }
        super().load_state_dict(state_dict)


def read_checkpoint(path: str | Path, map_location: str | torch.device = "cpu", mmap: bool = False) -> dict:
    """The checkpoint file's contents, loaded with weights_only=True: tensors and plain containers only, so a
    checkpoint cannot run code. mmap: leave the tensors on disk until they are read."""
    try:
        return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except Exception as e:
        raise UsageError(
            f"{str(path)!r} is not a readable checkpoint ({type(e).__name__}): pass a .ckpt written by train.py"
        ) from None


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> tuple[GPT, Tokenizer]:
    """The GPT (in eval mode) and the tokenizer that a training checkpoint holds."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"checkpoint {str(path)!r} does not exist: pass --ckpt_path to a .ckpt file of a run")
    checkpoint = read_checkpoint(path, map_location)
    if "state_dict" not in checkpoint or TextDataModule.__qualname__ not in checkpoint:
        raise UsageError(f"{str(path)!r} is not a tinygpt_pl training checkpoint: pass a .ckpt written by train.py")
    hparams = checkpoint["hyper_parameters"]
    model = GPT(GPTConfig(**{f.name: hparams[f.name] for f in fields(GPTConfig)}))
    prefix = "model."
    state = {k.removeprefix(prefix): v for k, v in checkpoint["state_dict"].items() if k.startswith(prefix)}
    model.load_state_dict(state)
    tokenizer = tokenizer_from_state(checkpoint[TextDataModule.__qualname__]["tokenizer"])
    return model.eval(), tokenizer
