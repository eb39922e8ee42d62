"""The training command line: LightningCLI over GPTModule and TextDataModule, with YAML configs.

Every constructor argument is a flag (`--model.n_layer 4`, `--data.batch_size 32`, `--trainer.max_steps 100`),
ModelCheckpoint is the `checkpoint` group, and `--ckpt_path last` resumes the run in `--trainer.default_root_dir`.

Scale comes from the trainer flags: `--trainer.devices 8` runs DDP over 8 GPUs, `--trainer.num_nodes N` over N such
nodes, `--trainer.strategy fsdp` shards each transformer Block. `--data.global_batch_size` keeps the optimizer's batch
(and so the learning-rate schedule) the same on any number of devices by deriving the gradient accumulation.
"""

import os
import signal
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import ProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.plugins.environments import SLURMEnvironment
from lightning.pytorch.strategies import Strategy, StrategyRegistry

from tinygpt_pl.data.datamodule import DEFAULT_SEED, TextDataModule
from tinygpt_pl.errors import RunStopped, UsageError, exit_on_bad_input
from tinygpt_pl.load import read_checkpoint
from tinygpt_pl.training.checkpoint import AtomicCheckpointIO, RunCheckpoint, newest_intact_checkpoint
from tinygpt_pl.training.console import FirstScreen, RunLogger, StepProgressBar, quiet_lightning, say
from tinygpt_pl.training.fsdp import fsdp_strategy
from tinygpt_pl.training.init_from import is_checkpoint
from tinygpt_pl.training.module import GPTModule
from tinygpt_pl.training.optim import check_optimizer_strategy
from tinygpt_pl.training.safety.interrupt import GracefulStop
from tinygpt_pl.training.safety.peers import PeerWatch
from tinygpt_pl.training.safety.runlock import RunLock
from tinygpt_pl.training.safety.signals import at_abort, is_global_rank_zero
from tinygpt_pl.training.safety.versions import warn_if_untested_lightning
from tinygpt_pl.training.throughput import ThroughputMonitor


@dataclass(frozen=True)
class Machine:
    """What this machine offers, so that a run asking for more is refused before any work is done."""

    gpus: int
    cpus: int
    gpu_bf16: bool

    @classmethod
    def this(cls) -> "Machine":
        gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
        return cls(gpus=gpus, cpus=len(os.sched_getaffinity(0)), gpu_bf16=gpus > 0 and torch.cuda.is_bf16_supported())


def uses_gpu(accelerator: str | None, machine: Machine) -> bool:
    return accelerator in ("gpu", "cuda") or (accelerator in (None, "auto") and machine.gpus > 0)


def default_precision(gpu: bool, machine: Machine) -> str:
    """bf16 mixed precision where the GPU supports it, full fp32 elsewhere."""
    return "bf16-mixed" if gpu and machine.gpu_bf16 else "32-true"


def count_devices(accelerator: str | None, devices: int | str | list[int], machine: Machine) -> int:
    """The number of devices (processes) per node that Lightning will use, checked against what the machine has."""
    gpu = uses_gpu(accelerator, machine)
    kind, available = ("GPU", machine.gpus) if gpu else ("CPU core", machine.cpus)
    if gpu and machine.gpus == 0:
        raise UsageError(
            f"--trainer.accelerator {accelerator}: this machine has no CUDA GPU: "
            "train on a GPU machine, or pass --trainer.accelerator cpu"
        )
    if isinstance(devices, str) and "," in devices:
        devices = [int(d) for d in devices.split(",") if d.strip()]
    if isinstance(devices, list):
        count = len(devices)
    elif str(devices).strip() in ("auto", "-1"):
        count = available if gpu else 1  # Lightning's "auto" is every GPU, or one CPU process
    else:
        count = int(devices)
    if count > available:
        raise UsageError(
            f"--trainer.devices {devices}: this machine has only {available} {kind}{'s' * (available != 1)}: "
            f"pass --trainer.devices {available} or fewer (with --trainer.num_nodes for more machines)"
        )
    return count


def check_precision(precision: str, gpu: bool, machine: Machine) -> None:
    if gpu and "bf16" in precision and not machine.gpu_bf16:
        raise UsageError(
            f"--trainer.precision {precision}: this GPU has no bfloat16 support (it needs Ampere or newer): "
            "pass --trainer.precision 16-mixed or 32-true"
        )


def check_strategy(strategy: str) -> None:
    if isinstance(strategy, str) and strategy.startswith(("ddp", "fsdp")) and not torch.distributed.is_available():
        raise UsageError(
            f"--trainer.strategy {strategy}: this torch build has no torch.distributed (no DDP or FSDP): "
            "install a torch build with distributed support, or train on one device"
        )


def accumulation(global_batch_size: int | None, world_size: int, batch_size: int, accumulate: int) -> int:
    """Micro-batches per optimizer step, so that world_size x batch_size x it = global_batch_size."""
    if global_batch_size is None:
        return accumulate
    per_micro_step = world_size * batch_size
    if global_batch_size < 1 or global_batch_size % per_micro_step:
        raise UsageError(
            f"--data.global_batch_size {global_batch_size} is not a multiple of devices x nodes x batch_size = "
            f"{per_micro_step}: choose a global batch that is, or another --data.batch_size"
        )
    derived = global_batch_size // per_micro_step
    if accumulate not in (1, derived):
        raise UsageError(
            f"--trainer.accumulate_grad_batches {accumulate} contradicts --data.global_batch_size {global_batch_size} "
            f"(which needs {derived} on {world_size} devices): set only one of them"
        )
    return derived


# The longest a rank waits in a collective for the others: a compiled GPT-2's start-up and the biggest checkpoint
# write must fit (rank 0 writes while the others wait). A dead rank is noticed sooner (safety/peers.py); this is for
# one that hangs.
COLLECTIVE_TIMEOUT = 600


def distributed_strategy(name: str, world_size: int, gpu: bool, timeout: int) -> Strategy | str:
    """The strategy the name asks for, with timeout (seconds) for its collectives; names without collectives as they
    are. ("auto" on several devices is Lightning's DDP.)"""
    if name == "fsdp":
        return fsdp_strategy(gpu, timedelta(seconds=timeout))
    if name == "auto" and world_size > 1:
        name = "ddp"
    if not name.startswith("ddp") or name not in StrategyRegistry:
        return name
    entry = StrategyRegistry[name]
    return entry["strategy"](**entry["init_params"], timeout=timedelta(seconds=timeout))


class TrainCLI(LightningCLI):
    def __init__(self, args: list[str] | None = None, stop: GracefulStop | None = None) -> None:
        self.stop = stop or GracefulStop()
        self.first_screen = FirstScreen()
        self.watch = PeerWatch()
        self.lock: RunLock | None = None
        super().__init__(
            GPTModule,
            TextDataModule,
            seed_everything_default=DEFAULT_SEED,
            auto_configure_optimizers=False,
            run=False,
            args=args,
            parser_kwargs={"exit_on_error": False},  # bad options become one line (exit_on_bad_input)
            # a requeued SLURM job logs to the same version_<job id> folder: its config.yaml is the same run's
            save_config_kwargs={"overwrite": restarted_by() is not None},
            trainer_defaults={"callbacks": [ThroughputMonitor(), self.first_screen, self.stop, self.watch]},
        )

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument(
            "--ckpt_path",
            type=str | None,
            default=None,
            help="Checkpoint to resume from: a path, or 'last' for the newest checkpoint of this run.",
        )
        parser.add_argument(
            "--collective_timeout",
            type=int,
            default=COLLECTIVE_TIMEOUT,
            help="Seconds a process of a multi-process run waits in a collective (all-reduce, barrier) for the others "
            "before the run fails: long enough for a compiled start-up and a checkpoint write.",
        )
        parser.add_lightning_class_args(RunCheckpoint, "checkpoint")
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
        self.first_screen.configs = [str(path) for path in config.get("config") or []]
        init_from = config.model.init_from
        if init_from is not None and is_checkpoint(init_from) and config.data.tokenizer == "char":
            config.data.tokenizer = init_from  # the checkpoint's tokenizer (the default char one is the corpus's)
        trainer, machine = config.trainer, Machine.this()
        gpu = uses_gpu(trainer.accelerator, machine)
        devices = count_devices(trainer.accelerator, trainer.devices, machine)
        if trainer.precision is None:
            trainer.precision = default_precision(gpu, machine)
        check_precision(str(trainer.precision), gpu, machine)
        check_strategy(trainer.strategy)
        check_optimizer_strategy(config.model.optimizer, fsdp=trainer.strategy == "fsdp")  # before DDP's processes
        self.gpu = gpu
        self.world_size = world_size = devices * trainer.num_nodes
        self.accumulate = accumulation(
            config.data.global_batch_size, world_size, config.data.batch_size, trainer.accumulate_grad_batches
        )
        if is_global_rank_zero():
            self.lock = RunLock(root)
        with self.abandoned_on_error():
            ckpt_dir = Path(config.checkpoint.dirpath)
            restarted = restarted_by()
            if config.ckpt_path is None and restarted and (ckpt_dir / "last.ckpt").exists():
                say(f"{restarted}: resuming from {ckpt_dir / 'last.ckpt'}")
                config.ckpt_path = "last"
            config.ckpt_path = resolve_ckpt_path(config.ckpt_path, ckpt_dir)
            check_resume(config.ckpt_path, trainer.strategy)

    def instantiate_classes(self) -> None:
        with self.abandoned_on_error():
            super().instantiate_classes()
        at_abort(self.kill_other_processes)  # a signal before the first step ends this one at once
        at_abort(lambda: self.watch.leave("error"))  # (first) and its peers quietly
        # checkpoints written whole or not at all; a deleted checkpoint folder stops the run (after its save)
        self.trainer.strategy.checkpoint_io = AtomicCheckpointIO(self.stop.request_stop)

    @contextmanager
    def abandoned_on_error(self) -> Iterator[None]:
        """A run that fails before it starts releases its run folder, and leaves none behind if it made it."""
        try:
            yield
        except BaseException:
            if self.lock is not None:
                self.lock.abandon()
            raise

    def kill_other_processes(self) -> None:
        """Lightning's other DDP processes, which would wait for this one in vain."""
        if self.trainer.strategy.launcher is not None:
            self.trainer.strategy.launcher.kill(signal.SIGKILL)
        self.watch.kill_children()

    def instantiate_trainer(self, **kwargs) -> Trainer:
        """The Trainer with the derived accumulation (passed here, so the saved config.yaml keeps what was asked)."""
        kwargs["accumulate_grad_batches"] = self.accumulate
        val_check_interval = self.config.trainer.val_check_interval
        if isinstance(val_check_interval, int):  # Lightning counts micro-batches here; the config means steps
            kwargs["val_check_interval"] = val_check_interval * self.accumulate
        strategy, timeout = self.config.trainer.strategy, self.config.collective_timeout
        if isinstance(strategy, str):
            kwargs["strategy"] = distributed_strategy(strategy, self.world_size, self.gpu, timeout)
        callbacks = self.config_init.trainer.callbacks or []
        if self.config.trainer.enable_progress_bar is not False and not any(
            isinstance(c, ProgressBar) for c in callbacks
        ):
            # tqdm's lines, also where rich is installed (litserve brings it), where Lightning would pick rich's bar,
            # which shows nothing in a log file until the run ends
            kwargs["callbacks"] = [*callbacks, StepProgressBar()]
        if self.config_init.trainer.logger in (None, True):  # Lightning's default logger, without its placeholders
            root = self.config.trainer.default_root_dir or os.getcwd()
            kwargs["logger"] = RunLogger(root, version=SLURMEnvironment.job_id())
        if self.config.trainer.enable_model_summary is None:
            kwargs["enable_model_summary"] = False  # the first screen says it in a line (console.FirstScreen)
        return super().instantiate_trainer(**kwargs)


def resolve_ckpt_path(ckpt_path: str | None, ckpt_dir: Path) -> str | None:
    """The checkpoint to resume, checked before any work is done; a run never overwrites another's checkpoints.
    A checkpoint of the run's own (in its checkpoint folder) may be resumed there: the run continues from it."""
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
    if last.exists() and Path(ckpt_path).resolve().parent != ckpt_dir.resolve():
        raise UsageError(
            f"{ckpt_dir} holds the checkpoints of another run, which resuming {ckpt_path} there would overwrite: "
            "resume it in a new --trainer.default_root_dir (or that run with --ckpt_path last)"
        )
    return ckpt_path


RESTARTS = {
    "SLURM_RESTART_COUNT": "SLURM started this job again",  # after a requeue (sbatch --requeue; requeue_slurm_job)
    "TORCHELASTIC_RESTART_COUNT": "torchrun started the workers again",  # after a failure (torchrun --max-restarts)
}


def restarted_by() -> str | None:
    """Who started this run again, which then resumes from its last.ckpt by itself; None for a run's first start."""
    return next((who for variable, who in RESTARTS.items() if int(os.environ.get(variable, 0)) > 0), None)


def separate_torchrun_attempts(backend: str, timeout: int) -> None:
    """torchrun keeps one store for all its attempts, and torch 2.13's workers use it without a prefix per attempt:
    restarted workers can read the previous attempt's addresses and never connect. A restarted attempt initialises
    the process group itself, under a prefix of its own; Lightning then uses that group."""
    attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", 0))
    if attempt == 0 or os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return
    wait = timedelta(seconds=timeout)
    store = torch.distributed.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), timeout=wait)
    torch.distributed.init_process_group(
        backend,
        store=torch.distributed.PrefixStore(f"tinygpt_pl/attempt_{attempt}", store),
        rank=int(os.environ["RANK"]),
        world_size=int(os.environ["WORLD_SIZE"]),
        timeout=wait,
    )


def check_resume(ckpt_path: str | None, strategy: str) -> None:
    """The checkpoint to resume must be a readable training checkpoint; with FSDP, one that FSDP saved. (Lightning's
    FSDP maps a checkpoint's optimizer state to parameters in model order, which is FSDP's own order but not that of
    DDP or one-device runs, whose optimizer puts the weight-decayed parameters first.)"""
    if ckpt_path is None:
        return
    try:
        checkpoint = read_checkpoint(ckpt_path, mmap=True)  # the tensors stay on disk
    except UsageError:
        path = Path(ckpt_path)
        if (intact := newest_intact_checkpoint(path.parent, skip=path)) is None:
            raise
        raise UsageError(
            f"{ckpt_path} is damaged (truncated or not a checkpoint): the newest intact checkpoint of this run is "
            f"{intact[0]} (step {intact[1]}): resume with --ckpt_path {intact[0]}"
        ) from None
    if "loops" not in checkpoint or TextDataModule.__qualname__ not in checkpoint:
        raise UsageError(f"--ckpt_path {ckpt_path} is not a checkpoint of a train.py run: pass a .ckpt that one wrote")
    if strategy == "fsdp" and not checkpoint.get("fsdp"):
        raise UsageError(
            f"--ckpt_path {ckpt_path} was not saved by an FSDP run, and FSDP cannot resume its optimizer state: "
            "resume it with the strategy it was saved with (ddp, or one device)"
        )


@exit_on_bad_input
def main(args: list[str] | None = None) -> None:
    quiet_lightning()
    if is_global_rank_zero():
        warn_if_untested_lightning()
    if torch.cuda.is_available():
        torch.set_float32_matmul_precision("high")  # TF32 matmuls on Ampere and newer
    stop = GracefulStop()
    cli = TrainCLI(args, stop)
    separate_torchrun_attempts("nccl" if cli.gpu else "gloo", cli.config.collective_timeout)
    try:
        cli.trainer.fit(cli.model, datamodule=cli.datamodule, ckpt_path=cli.config.ckpt_path)
    except BaseException as e:
        if not isinstance(e, RunStopped):
            cli.watch.wait_for_death(timeout=10)  # an error in a collective because a peer died: one line instead
            cli.watch.leave(f"error {type(e).__name__}: {' '.join(str(e).split())[:200]}")
        cli.kill_other_processes()
        if isinstance(e, UsageError) and cli.lock is not None:  # bad data found as the run started: no run was made
            cli.lock.abandon()
        if not isinstance(e, RunStopped):
            raise
        cli.watch.leave()
        say(f"error: {e}")
        sys.exit(e.exit_code)
    cli.watch.leave()
    trainer = cli.trainer
    finished = 0 < trainer.max_steps <= trainer.global_step  # a signal after the last step changes nothing
    if (stop.exit_code > 128 and not finished) or stop.exit_code == 1:
        say(stop.summary(trainer.global_step))
        sys.exit(stop.exit_code)
