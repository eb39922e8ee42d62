"""What a run shows its user: a first screen of four lines (what trains on what, the global batch, where the run
writes, how to watch it), an estimate of the run's length from its first steps (a warning when it cannot finish in
reasonable time where it was started), a progress bar of steps, and TensorBoard opening on the loss curves.

Lightning's own start-up lines (device availability, a logger advertisement, the model summary table, whose FLOPs
column reads 0 for a model that runs no example input) are left out: the first screen says what they would.
"""

import logging
import sys
import time
import warnings

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, TQDMProgressBar
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_only
from tqdm import tqdm

# train and val loss on one chart, then the learning rate, gradient norm and throughput (TensorBoard's Custom Scalars)
LAYOUT = {
    "run": {
        "loss (train, val)": ["Multiline", ["^train/loss$", "^val/loss$"]],
        "learning rate": ["Multiline", ["^lr$"]],
        "gradient norm": ["Multiline", ["^grad_norm$"]],
        "tokens/s": ["Multiline", ["^throughput/tokens_per_sec$"]],
    }
}
CPU_CONFIG = "configs/shakespeare_char_cpu.yaml"
TOO_LONG_S = {"cpu": 3600, "cuda": 24 * 3600}  # an estimate over this ends in a warning


def say(line: str) -> None:
    """One line on stderr from the run's first process, above the progress bar (after SIGHUP, perhaps to nowhere)."""
    if rank_zero_only.rank == 0:
        try:
            tqdm.write(line, file=sys.stderr)
        except OSError:
            pass


def quiet_lightning() -> None:
    """Lightning's info lines off (the first screen replaces them; its warnings stay), and the deprecation warnings
    that Lightning 2.6's own code raises under torch 2.13, which a user can do nothing about."""
    for name in ("lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"lightning\.pytorch\.utilities\._pytree")
    # a run resumed with other --checkpoint settings: RunCheckpoint says what that means (only the advice that names
    # RunCheckpoint alone, which cannot be followed: the callback comes from those settings)
    advice = r"Be aware that when using `ckpt_path`.* callbacks: \[\"RunCheckpoint\{[^}]*\}\"\]\.$"
    warnings.filterwarnings("ignore", message=advice)


class RunLogger(TensorBoardLogger):
    """Lightning's TensorBoard logger without its placeholders: no `hp_metric`, no `epoch` card (a run is counted in
    steps), and with a layout that puts train and val loss on one chart."""

    def __init__(self, save_dir: str, version: int | str | None = None) -> None:
        super().__init__(save_dir=save_dir, version=version, default_hp_metric=False)

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        super().log_metrics({k: v for k, v in metrics.items() if k != "epoch"}, step)

    @rank_zero_only
    def log_hyperparams(self, params, metrics=None) -> None:  # noqa: ANN001 (Lightning's signature)
        super().log_hyperparams(params, metrics)
        self.experiment.add_custom_scalars(LAYOUT)


class StepProgressBar(TQDMProgressBar):
    """tqdm's bar (micro-batches, as Lightning counts them) without "Epoch 0" and the logger's version number."""

    def on_train_epoch_start(self, trainer: L.Trainer, *_) -> None:
        """TQDMProgressBar's, with "training" for "Epoch N": a run counts steps (its epoch is always 0)."""
        self.train_progress_bar.reset(total=self.total_train_batches)
        self.train_progress_bar.initial = 0
        self.train_progress_bar.set_description("training")

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict:
        metrics = super().get_metrics(trainer, pl_module)
        metrics.pop("v_num", None)
        return metrics


def duration(seconds: float) -> str:
    return f"{seconds / 3600:.1f} h" if seconds >= 3600 else f"{seconds / 60:.0f} min" if seconds >= 60 else "<1 min"


class FirstScreen(Callback):
    """Prints the first screen when the fit starts, then, after the first steps, how long the run will take."""

    def __init__(self, measure_steps: int = 2) -> None:
        self.measure_steps = measure_steps
        self.configs: list[str] = []  # the run's config files (TrainCLI sets them): no advice to use one of them

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """The first screen: after the data is set up and the model built, before the sanity check's bar."""
        if not trainer.is_global_zero:
            return
        model, hp, data = pl_module.model, pl_module.hparams, trainer.datamodule
        shape = "bigram table" if hp.arch == "bigram" else f"{hp.n_layer} layers x {hp.n_embd}, {hp.n_head} heads"
        resumed = f", resuming {trainer.ckpt_path}" if trainer.ckpt_path else ""
        say(f"training a GPT ({shape}, {model.num_params() / 1e6:.2f}M parameters) on {data.describe()}{resumed}")
        world, accumulate = trainer.world_size, trainer.accumulate_grad_batches
        say(f"global batch: {world * data.batch_size * accumulate} sequences = {world} devices x {data.batch_size} x "
            f"{accumulate} accumulated, of {data.block_size} tokens; {trainer.max_steps} steps on "
            f"{trainer.strategy.root_device.type}, precision {trainer.precision}")  # fmt: skip
        logs = f", logs in {trainer.logger.log_dir}" if trainer.logger else ""
        say(f"writing to {trainer.default_root_dir}: checkpoints in {trainer.checkpoint_callback.dirpath}{logs}")
        if trainer.logger:
            say(f"watch it: tensorboard --logdir {trainer.default_root_dir}")

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # the clock runs from the end of the first step (which pays for warm-up and compilation)
        self.clock_steps = (trainer.global_step + 1, trainer.global_step + 1 + self.measure_steps)
        self.clock: float | None = None

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args) -> None:
        """Reads the clock at the end of the first step and measure_steps later (the first micro-batch to see the
        step count there), syncing a GPU only then."""
        at_start = self.clock is None and trainer.global_step == self.clock_steps[0]
        at_end = self.clock is not None and trainer.global_step == self.clock_steps[1]
        if not (at_start or at_end):
            return
        if trainer.strategy.root_device.type == "cuda":
            torch.cuda.synchronize()
        if at_start:
            self.clock = time.perf_counter()
            return
        per_step = (time.perf_counter() - self.clock) / self.measure_steps
        self.clock_steps = (-1, -1)  # measured once
        remaining = trainer.max_steps - trainer.global_step
        if trainer.is_global_zero and remaining > 0:
            self.estimate(per_step, remaining, trainer.strategy.root_device.type)

    def estimate(self, per_step: float, remaining: int, device: str) -> None:
        total = per_step * remaining
        line = f"{per_step:.2f} s a step here: the {remaining} steps to go take about {duration(total)}"
        if total <= TOO_LONG_S.get(device, TOO_LONG_S["cuda"]):
            say(f"estimate: {line} (validations and checkpoints not counted)")
        elif device == "cpu" and not any(config.endswith(CPU_CONFIG) for config in self.configs):
            say(f"warning: {line} on this CPU: train on a GPU, or try {CPU_CONFIG} (minutes on a CPU); "
                "--trainer.max_steps N stops sooner")  # fmt: skip
        elif device == "cpu":
            say(f"warning: {line} on this CPU, which is busy or slow (this config takes minutes on a quiet laptop)")
        else:
            say(f"warning: {line}: add GPUs (--trainer.devices, --trainer.num_nodes) or set --trainer.max_steps")
