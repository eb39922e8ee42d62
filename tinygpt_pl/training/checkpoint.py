"""Checkpoints of a run: the ModelCheckpoint that train.py runs, files written whole or not at all, and reading a
checkpoint file without unpickling code (tinygpt_pl.load builds a model from one)."""

import os
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.fabric.plugins import TorchCheckpointIO
from lightning.pytorch.callbacks import ModelCheckpoint

from tinygpt_pl.errors import RunStopped, UsageError
from tinygpt_pl.load import read_checkpoint
from tinygpt_pl.training.console import say

TEMPORARY_GLOB = ".*.ckpt.*.tmp"  # AtomicCheckpointIO's files being written


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
        name = self.CHECKPOINT_NAME_LAST + self.FILE_EXTENSION
        with warnings.catch_warnings():
            if self.dirpath and os.path.isfile(os.path.join(self.dirpath, name)):  # resumed: the folder is its own
                warnings.filterwarnings("ignore", message="Checkpoint directory .* exists and is not empty")
            super().setup(trainer, pl_module, stage)
        last = os.path.join(self.dirpath, name)
        if self.save_last and os.path.isfile(last):
            self.last_model_path = last  # this run's, resumed: overwrite it
        if trainer.is_global_zero:  # the run folder is locked (safety/runlock.py): these are a killed process's
            for tmp in Path(self.dirpath).glob(TEMPORARY_GLOB):
                tmp.unlink()

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.save_last and self._last_global_step_saved != trainer.global_step and not trainer.fast_dev_run:
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        """Lightning restores this callback's state only if its settings are the checkpoint's; otherwise it says why
        in one line (instead of Lightning's advice to add the old callback back, console.quiet_lightning)."""
        saved = [key for key in checkpoint.get("callbacks", {}) if str(key).startswith(f"{type(self).__name__}{{")]
        if saved and self.state_key not in saved:
            say("note: the --checkpoint settings differ from the checkpoint's: last.ckpt goes on, and the best "
                "checkpoints are chosen anew from here (the earlier ones stay in the folder)")  # fmt: skip

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


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes each checkpoint whole or not at all: into a temporary file beside it, flushed to the disk, then renamed
    over the old one, so that a run killed mid-write or a full disk leaves the previous checkpoint as it was.
    (Lightning's own save writes the file in /tmp and then moves it, which is a copy over the old file wherever /tmp
    is another filesystem.)

    A checkpoint folder deleted during the run is made again, the checkpoint written, and on_folder_recreated told.
    """

    def __init__(self, on_folder_recreated: Callable[[str], None]) -> None:
        super().__init__()
        self.on_folder_recreated = on_folder_recreated
        self.folders: set[Path] = set()  # written to by this run

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any = None) -> None:
        path = Path(path)
        folder = path.parent
        vanished = folder in self.folders and not folder.is_dir()
        tmp = folder / f".{path.name}.{os.getpid()}.tmp"  # matches TEMPORARY_GLOB
        try:
            folder.mkdir(parents=True, exist_ok=True)
            with open(tmp, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except (OSError, RuntimeError) as e:  # torch.save reports a failed write as a RuntimeError from an OSError
            tmp.unlink(missing_ok=True)
            raise CheckpointWriteError(path, e) from None
        self.folders.add(folder)
        if vanished:
            self.on_folder_recreated(
                f"the checkpoint folder {folder} was deleted during the run: it was made again for the checkpoints "
                f"of step {checkpoint.get('global_step')} and the run stopped: resume with --ckpt_path last"
            )


class CheckpointWriteError(RunStopped):
    def __init__(self, path: Path, error: BaseException) -> None:
        cause = error if isinstance(error, OSError) else error.__context__
        reason = cause.strerror if isinstance(cause, OSError) and cause.strerror else " ".join(str(error).split())
        last = path.parent / "last.ckpt"
        kept = f"{last} (step {checkpoint_step(last)}) is intact" if last.is_file() else "no checkpoint was written yet"
        super().__init__(
            f"could not write the checkpoint {path} ({reason}); {kept}: make room in {path.parent} "
            "(or pass another --checkpoint.dirpath), then resume with --ckpt_path last"
        )


def checkpoint_step(path: Path) -> int | None:
    """The optimizer step a checkpoint file was saved at; None if it is not a readable training checkpoint."""
    try:
        return read_checkpoint(path, mmap=True)["global_step"]
    except (UsageError, KeyError, TypeError):
        return None


def newest_intact_checkpoint(folder: Path, skip: Path | None = None) -> tuple[Path, int] | None:
    """The readable checkpoint of the latest step in folder (other than skip), with its step."""
    steps = [(checkpoint_step(path), path) for path in folder.glob("*.ckpt") if path != skip]
    if not (intact := [(step, path) for step, path in steps if step is not None]):
        return None
    step, path = max(intact)  # at equal steps, last.ckpt
    return path, step
