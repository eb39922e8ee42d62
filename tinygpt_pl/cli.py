"""The training command line: LightningCLI over GPTModule and TextDataModule, with YAML configs.

Every constructor argument is a flag (`--model.n_layer 4`, `--data.batch_size 32`, `--trainer.max_steps 100`),
ModelCheckpoint is the `checkpoint` group, and `--ckpt_path last` resumes the run in `--trainer.default_root_dir`.
"""

import os
from pathlib import Path

import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from tinygpt_pl.data import TextDataModule
from tinygpt_pl.errors import UsageError, exit_on_bad_input
from tinygpt_pl.module import GPTModule


def default_precision(accelerator: str | None) -> str:
    """bf16 mixed precision where the GPU supports it, full fp32 elsewhere."""
    on_gpu = accelerator in (None, "auto", "gpu", "cuda") and torch.cuda.is_available()
    return "bf16-mixed" if on_gpu and torch.cuda.is_bf16_supported() else "32-true"


class TrainCLI(LightningCLI):
    def __init__(self, args: list[str] | None = None) -> None:
        super().__init__(
            GPTModule,
            TextDataModule,
            seed_everything_default=1337,
            auto_configure_optimizers=False,
            run=False,
            args=args,
            parser_kwargs={"exit_on_error": False},  # bad options become one line (exit_on_bad_input)
        )

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument(
            "--ckpt_path",
            type=str | None,
            default=None,
            help="Checkpoint to resume from: a path, or 'last' for the newest checkpoint of this run.",
        )
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.set_defaults(
            {
                "checkpoint.monitor": "val/loss",
                "checkpoint.mode": "min",
                "checkpoint.save_last": True,
                "checkpoint.save_top_k": 1,
                "checkpoint.filename": "best-step{step}-loss{val/loss:.4f}",
                "checkpoint.auto_insert_metric_name": False,
            }
        )
        parser.link_arguments("data.block_size", "model.block_size")
        parser.link_arguments("data.vocab_size", "model.vocab_size", apply_on="instantiate")

    def before_instantiate_classes(self) -> None:
        config = self.config
        root = Path(config.trainer.default_root_dir or os.getcwd())
        if config.checkpoint.dirpath is None:
            config.checkpoint.dirpath = str(root / "checkpoints")
        if config.data.seed is None:
            config.data.seed = config.seed_everything
        if config.trainer.precision is None:
            config.trainer.precision = default_precision(config.trainer.accelerator)
        config.ckpt_path = resolve_ckpt_path(config.ckpt_path, Path(config.checkpoint.dirpath))


def resolve_ckpt_path(ckpt_path: str | None, ckpt_dir: Path) -> str | None:
    """The checkpoint to resume, checked before any work is done; a fresh run never overwrites an old one."""
    last = ckpt_dir / "last.ckpt"
    if ckpt_path is None:
        if last.exists():
            raise UsageError(
                f"{ckpt_dir} already holds the checkpoints of an earlier run: resume it with --ckpt_path last, "
                "or start a new run in another --trainer.default_root_dir"
            )
        return None
    if ckpt_path == "last":
        if not last.exists():
            raise UsageError(
                f"--ckpt_path last: there is no {last} to resume: check --trainer.default_root_dir, "
                "or drop --ckpt_path to start a new run"
            )
        return str(last)
    if not Path(ckpt_path).is_file():
        raise UsageError(f"--ckpt_path {ckpt_path}: no such checkpoint file: pass an existing .ckpt or 'last'")
    return ckpt_path


@exit_on_bad_input
def main(args: list[str] | None = None) -> None:
    if torch.cuda.is_available():
        torch.set_float32_matmul_precision("high")  # TF32 matmuls on Ampere and newer
    cli = TrainCLI(args)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule, ckpt_path=cli.config.ckpt_path)
