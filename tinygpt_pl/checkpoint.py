"""Checkpoints: the ModelCheckpoint that train.py runs, and loading a trained GPT from a checkpoint alone, without
Lightning and without unpickling code."""

import os
from dataclasses import fields
from pathlib import Path

import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from tinygpt_pl.data import TextDataModule
from tinygpt_pl.errors import UsageError
from tinygpt_pl.model import GPT, GPTConfig
from tinygpt_pl.tokenizer import Tokenizer, tokenizer_from_state


class RunCheckpoint(ModelCheckpoint):
    """Lightning's ModelCheckpoint, which also goes on managing a run's checkpoints after the run's folder was moved
    or copied. Lightning drops what it knew of them when the folder's path changed, and writes last-v1.ckpt beside
    the last.ckpt it no longer recognizes, so that the next --ckpt_path last would resume the older one."""

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
