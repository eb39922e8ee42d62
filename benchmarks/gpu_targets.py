"""Every GPU target in one command, for the first minutes on a lent GPU: the doctor (with its compiled bf16 GPT-2 124M
step: tokens/s and MFU), the lecture's 06 stage and configs/shakespeare_char.yaml trained to their val loss (or as far
as the time allows, with the projected time of the whole run), the KV-cache timing (benchmarks/generation.py --gpu)
and GPT-2 124M on HellaSwag where its data is on the machine. One table, written through results.record().

Each step runs as its own process with its own time limit, so one that fails or overruns is a row that says so and
the others still run. The GPU machine has no network: tiny Shakespeare comes with --data-path.

    python benchmarks/gpu_targets.py --data-path tinyshakespeare.txt            # on one GPU, under 10 minutes
    python benchmarks/gpu_targets.py --data-path tinyshakespeare.txt --dry-run  # on a CPU: every step starts, tiny
"""

import argparse
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from results import REPO, RESULTS, record, stamp

TRAIN_SECONDS = 150  # each training config's share of the 10 minutes
TINY = ["--model.n_layer", "1", "--model.n_head", "2", "--model.n_embd", "16", "--data.block_size", "16",
        "--data.batch_size", "4", "--data.num_workers", "0", "--trainer.max_steps", "4",
        "--trainer.val_check_interval", "2", "--trainer.log_every_n_steps", "1", "--trainer.limit_val_batches", "2",
        "--trainer.accelerator", "cpu", "--model.sample_tokens", "0"]  # fmt: skip
HF_HOME = Path(os.environ.get("HF_HOME", Path.home() / ".cache" / "huggingface"))


def run(command: list[str], seconds: float) -> tuple[str | None, str]:
    """(None, output) if the command succeeded within seconds, else (why not, output)."""
    print(f"$ {shlex.join(command)}", flush=True)
    try:
        done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=seconds)
    except subprocess.TimeoutExpired as e:
        return f"not finished in {seconds:.0f} s", (e.stdout or b"").decode(errors="replace")
    output = done.stdout + done.stderr
    if done.returncode:
        last = [line for line in output.splitlines() if line.strip()][-1:] or [f"exit status {done.returncode}"]
        return f"failed: {last[0][:200]}", output
    return None, output


def doctor(ckpt_dir: Path, dry_run: bool) -> list[tuple[str, str]]:
    """The doctor's verdict, and its training step's speed (the compiled bf16 GPT-2 124M step on a GPU)."""
    extra = ["--steps", "1", "--write_mb", "4"] if dry_run else []
    failed, output = run([sys.executable, "-m", "tinygpt_pl.doctor", "--ckpt_dir", str(ckpt_dir), *extra], 240)
    lines = output.splitlines()
    verdict = next((line for line in lines if line.startswith("verdict:")), failed or "no verdict line")
    step = next((line.strip() for line in lines if "tokens/s" in line), "no training step line")
    return [("doctor", verdict), ("training step (GPT-2 124M, compiled, bf16, on a GPU)", step)]


def scalars(root: Path) -> dict[str, list]:
    """The run's logged scalars by tag, as TensorBoard events (step, wall_time, value)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(root / "lightning_logs" / "version_0")).Reload()
    return {tag: accumulator.Scalars(tag) for tag in accumulator.Tags()["scalars"]}


def train(config: str, data: Path, root: Path, seconds: float, dry_run: bool) -> tuple[str, str]:
    """config trained for at most seconds: its last val loss, and where the run got to, with the projected time of the
    whole run when it stopped short."""
    limit = f"00:00:{int(seconds) // 60:02d}:{int(seconds) % 60:02d}"
    command = [sys.executable, "train.py", "--config", config, "--data.path", str(data), "--trainer.default_root_dir",
               str(root), "--trainer.enable_progress_bar", "false", "--trainer.max_time", limit,
               *(TINY if dry_run else [])]  # fmt: skip
    failed, output = run(command, seconds + 180)  # start-up, compilation and the last validation come on top
    if failed:
        return config, failed
    logged = scalars(root)
    val = {e.step: e.value for e in logged.get("val/loss", [])}
    logged = [(e.step, e.wall_time) for e in logged.get("train/loss", [])]
    max_steps = int(TINY[TINY.index("--trainer.max_steps") + 1]) if dry_run else config_steps(config)
    last = max(val) if val else None
    done = logged[-1][0] + 1 if logged else 0
    figure = f"val loss {val[last]:.4f} at step {last}" if last is not None else "no validation"
    if done >= max_steps:
        return config, f"{figure} (finished: {max_steps} steps)"
    per_step = (logged[-1][1] - logged[0][1]) / max(logged[-1][0] - logged[0][0], 1)
    return config, (f"{figure}; stopped by the time limit at step {done} of {max_steps}, {per_step * 1000:.0f} ms a "
                    f"step: the whole run would take {max_steps * per_step / 60:.1f} min (projected)")  # fmt: skip


def config_steps(config: str) -> int:
    import yaml

    return int(yaml.safe_load((REPO / config).read_text())["trainer"]["max_steps"])


def generation(folder: Path, dry_run: bool) -> tuple[str, str]:
    """benchmarks/generation.py --gpu's table (on a CPU, for the dry run, its CPU part at tiny sizes)."""
    results = folder / "generation.md"
    sizes = ["--repeats", "1", "--sample-tokens", "8", "--completion-tokens", "2"] if dry_run else ["--gpu"]
    failed, output = run([sys.executable, "benchmarks/generation.py", *sizes, "--results", str(results)], 300)
    if failed:
        return "KV cache", failed
    rows = [
        line.strip("| ").split(" | ") for line in output.splitlines() if line.startswith("| ") and "---" not in line
    ]
    return "KV cache (benchmarks/generation.py --gpu)", "<br>".join(", ".join(row) for row in rows[1:]) or "no table"


def hellaswag(dry_run: bool) -> tuple[str, str]:
    """GPT-2 124M on HellaSwag through the evaluate command, where it exists and the data is on this machine."""
    what = "HellaSwag, GPT-2 124M"
    if not (REPO / "tinygpt_pl" / "evaluate.py").is_file():
        return what, "not run: there is no tinygpt_pl/evaluate.py in this checkout"
    missing = [name for name, pattern in (("the HellaSwag data", "datasets/*hellaswag*"), ("GPT-2's weights",
               "hub/models--gpt2")) if not list(HF_HOME.glob(pattern))]  # fmt: skip
    if missing:
        return what, f"not run: {' and '.join(missing)} not in {HF_HOME} (this machine has no network)"
    command = [sys.executable, "-m", "tinygpt_pl.evaluate", "--ckpt_path", "gpt2", "--tasks", "hellaswag"]
    failed, output = run([*command, "--limit", "8"] if dry_run else command, 300)
    return what, failed or next((line for line in reversed(output.splitlines()) if "hellaswag" in line), "no result")


def gpu_name() -> str | None:
    """The GPU's name, for the stamp (None: the CPU's, as results.machine() gives it)."""
    import torch

    return f"{torch.cuda.get_device_name()}, torch {torch.__version__}" if torch.cuda.is_available() else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-path", type=Path, required=True, help="tiny Shakespeare (the GPU machine is offline)")
    parser.add_argument("--dry-run", action="store_true", help="every step, at tiny sizes, on the CPU")
    parser.add_argument("--train-seconds", type=float, default=TRAIN_SECONDS, help="time limit of each training run")
    parser.add_argument("--results", type=Path, help=f"the Markdown file to write into (default {RESULTS}; none in "
                        "a dry run)")  # fmt: skip
    args = parser.parse_args()
    if not args.data_path.is_file():
        parser.error(f"--data-path {args.data_path}: no such file: pass tiny Shakespeare's text file")
    start = time.monotonic()
    rows: list[tuple[str, str]] = []
    with tempfile.TemporaryDirectory(prefix="gpu-targets-") as tmp:
        folder = Path(tmp)
        steps = [
            ("doctor", lambda: doctor(folder / "doctor", args.dry_run)),
            *((config, lambda config=config: [train(config, args.data_path, folder / Path(config).stem,
                                                    args.train_seconds, args.dry_run)])
              for config in ("configs/lecture/06_scaled_up.yaml", "configs/shakespeare_char.yaml")),
            ("KV cache", lambda: [generation(folder, args.dry_run)]),
            ("HellaSwag", lambda: [hellaswag(args.dry_run)]),
        ]  # fmt: skip
        for name, step in steps:
            try:
                rows += step()
            except Exception as e:  # a step's figures that cannot be read: its row says so, the others still run
                rows.append((name, f"failed: {type(e).__name__}: {e}"))
    minutes = (time.monotonic() - start) / 60
    table = "\n".join(["| target | result |", "|---|---|", *(f"| {a} | {' '.join(b.split())} |" for a, b in rows)])
    title = "GPU targets (benchmarks/gpu_targets.py)" + (" — dry run on the CPU" if args.dry_run else "")
    command = shlex.join(["python", "benchmarks/gpu_targets.py", *sys.argv[1:]])
    body = f"{stamp(command, gpu_name())}\n{table}\n\n{minutes:.1f} min in all."
    results = args.results or (None if args.dry_run else RESULTS)
    if results is None:
        print(f"\n## {title}\n\n{body}")
    else:
        record(title, body, results)


if __name__ == "__main__":
    main()
