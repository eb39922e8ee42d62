"""A callback for tests: saves the input tokens of every training batch, by step and rank."""

from pathlib import Path

import lightning as L
import numpy as np


class TokenLog(L.Callback):
    def __init__(self, out_dir: str) -> None:
        self.out_dir = Path(out_dir)

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx: int) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        np.save(self.out_dir / f"step{trainer.global_step}-rank{trainer.global_rank}.npy", batch[0].numpy())
