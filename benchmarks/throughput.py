"""Training-step speed: the project (train.py's TrainCLI, Trainer and GPTModule) against a plain PyTorch loop.

Both run in this process on the same model, batch, precision and compile setting, alternating `--repeats` times;
each times `--steps` optimizer steps after `--warmup` untimed ones. Prints tokens/s, step time, MFU and peak GPU
memory (medians) and their ratio, and writes the table into `--results` under a heading of its own for each config
and device kind, in place of the earlier run's (which moves to history.md).

    python benchmarks/throughput.py --config configs/shakespeare_char_cpu.yaml --data-path input.txt
"""

import argparse
import statistics
import sys
import tempfile
import time
from importlib.metadata import version
from pathlib import Path

import torch
from lightning.pytorch.callbacks import Callback
from results import REPO, RESULTS, invocation, record, stamp

sys.path.insert(0, str(REPO))

from plain_loop import autocast, build, train_step  # noqa: E402

from tinygpt_pl.training.cli import TrainCLI  # noqa: E402
from tinygpt_pl.training.throughput import compute_dtype, peak_flops  # noqa: E402


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class StepTimer(Callback):
    """The wall time from the end of optimizer step `start` to the end of step `stop`."""

    def __init__(self, start: int, stop: int) -> None:
        self.start, self.stop, self.seconds = start, stop, 0.0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step in (self.start, self.stop) and not trainer.fit_loop._should_accumulate():
            synchronize(trainer.strategy.root_device)
            if trainer.global_step == self.start:
                self.t0 = time.perf_counter()
            else:
                self.seconds = time.perf_counter() - self.t0


def project(cli_args: list[str], warmup: int, steps: int) -> float:
    """Seconds for `steps` optimizer steps of train.py's training path."""
    with tempfile.TemporaryDirectory() as root:
        cli = TrainCLI([*cli_args, "--trainer.default_root_dir", root, "--trainer.max_steps", str(warmup + steps),
                        "--trainer.limit_val_batches", "0", "--trainer.enable_progress_bar", "false"])  # fmt: skip
        timer = StepTimer(warmup, warmup + steps)
        cli.trainer.callbacks.append(timer)
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    return timer.seconds


def plain(cli_args: list[str], warmup: int, steps: int) -> tuple[float, int, int, torch.device, str]:
    """Seconds for `steps` steps of the plain loop (plain_loop.py) over the same model, batches, optimizer and
    precision; also the tokens per step, the FLOPs per token, the device and the precision."""
    with tempfile.TemporaryDirectory() as root:  # the CLI only reads the config and data, exactly as train.py does
        cli = TrainCLI([*cli_args, "--trainer.default_root_dir", root, "--trainer.max_steps", str(warmup + steps)])
    hp, data, trainer = cli.model.hparams, cli.datamodule, cli.trainer
    device, precision = trainer.strategy.root_device, trainer.precision
    data.setup("fit")
    torch.manual_seed(cli.config.seed_everything)
    model, optimizer = build(hp, device, precision)
    context = autocast(device, precision)
    for step in range(warmup + steps):
        if step == warmup:
            synchronize(device)
            t0 = time.perf_counter()
        train_step(model, optimizer, data, step, hp, hp.lr_decay_steps or warmup + steps,
                   trainer.accumulate_grad_batches, trainer.gradient_clip_val, context)  # fmt: skip
    synchronize(device)
    tokens = trainer.accumulate_grad_batches * data.batch_size * data.block_size
    return time.perf_counter() - t0, tokens, model.flops_per_token(), device, precision


def peak_memory() -> float | None:
    """GiB allocated on the GPU at the peak since the last call (None without a GPU); resets the peak."""
    if not torch.cuda.is_available():
        return None
    peak = torch.cuda.max_memory_allocated() / 2**30
    torch.cuda.reset_peak_memory_stats()
    return peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/shakespeare_char_cpu.yaml", help="a training config (YAML)")
    parser.add_argument("--data-path", required=True, help="the text corpus (--data.path)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (compilation, allocator)")
    parser.add_argument("--steps", type=int, default=20, help="timed optimizer steps per run")
    parser.add_argument("--repeats", type=int, default=5, help="runs of each, alternating which goes first")
    parser.add_argument("--results", type=Path, default=RESULTS, help="the Markdown file to write the section into")
    args, overrides = parser.parse_known_args()  # the rest go to train.py: --model.compile true, --data.batch_size
    command = invocation()
    sys.argv[1:] = []  # TrainCLI gets its arguments from cli_args (LightningCLI warns when sys.argv has others)
    cli_args = ["--config", args.config, "--data.path", args.data_path, *overrides]

    times: dict[str, list[float]] = {"project": [], "plain": []}
    memory: dict[str, list[float | None]] = {"project": [], "plain": []}
    for i in range(args.repeats):
        for which in ("project", "plain") if i % 2 == 0 else ("plain", "project"):
            if which == "project":
                seconds = project(cli_args, args.warmup, args.steps)
            else:
                seconds, tokens, flops_per_token, device, precision = plain(cli_args, args.warmup, args.steps)
            times[which].append(seconds)
            memory[which].append(peak_memory())
            print(f"repeat {i + 1}/{args.repeats}: {which} {seconds / args.steps * 1e3:.1f} ms/step", flush=True)

    peak = peak_flops(device, precision)
    rows = []
    for which in ("project", "plain"):
        step = statistics.median(times[which]) / args.steps
        mfu = f"{tokens / step * flops_per_token / peak:.1%}" if peak else "n/a (no peak known)"
        mem = [m for m in memory[which] if m is not None]
        rows.append((which, tokens / step, step * 1e3, mfu, f"{max(mem):.2f}" if mem else "n/a"))
    ratio = rows[0][1] / rows[1][1]
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    lines = [
        "| loop | tokens/s | step (ms) | MFU | peak GPU memory (GiB) |",
        "|---|---|---|---|---|",
        *(f"| {w} | {t:,.0f} | {s:.1f} | {m} | {g} |" for w, t, s, m, g in rows),
        "",
        f"project / plain tokens/s = **{ratio:.3f}** (medians of {args.repeats} alternated runs of {args.steps} steps "
        f"after {args.warmup} warm-up; {tokens:,} tokens per step, {flops_per_token:,} FLOPs per token, "
        f"precision {precision}, {compute_dtype(precision)} peak {peak or 'unknown'})",
    ]
    kind = "GPU" if gpu else device.type.upper()
    title = f"Training step, project vs plain loop: {Path(args.config).name} on {kind} (benchmarks/throughput.py)"
    body = "\n".join(
        [stamp(command, where=gpu), f"torch {version('torch')}, lightning {version('lightning')}.", "", *lines]
    )
    record(title, body, args.results)


if __name__ == "__main__":
    main()
