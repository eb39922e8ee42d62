"""Every GPU target in one command, for the first minutes on a lent GPU: the doctor (with its compiled bf16 GPT-2 124M
step: tokens/s and MFU), the lecture's 06 stage and configs/shakespeare_char.yaml trained to their val loss (or as far
as the time allows, with the projected time of the whole run), chat fine-tuning's tokens/s and MFU against
pretraining's (a GPT-2-124M-shaped model, compiled, bf16), the KV-cache timing (benchmarks/generation.py --gpu) and
GPT-2 124M on HellaSwag where its data is on the machine. One table, written through results.record().

Each step runs as its own process with its own time limit, within --budget for the whole, so one that fails or
overruns is a row that says so and the others still run; each row is printed as its step ends, and --logs keeps every
step's whole output. The GPU machine has no network: tiny Shakespeare comes with --data-path.

    python benchmarks/gpu_targets.py --data-path tinyshakespeare.txt            # on one GPU, under 10 minutes
    python benchmarks/gpu_targets.py --data-path tinyshakespeare.txt --dry-run  # on a CPU: every step starts, tiny
"""

import argparse
import json
import os
import random
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from results import REPO, RESULTS, record, stamp

TRAIN_SECONDS = 150  # each training config's share of the 10 minutes
SFT_STEPS = 150  # steps of each of the two throughput runs (16 sequences of 1024 tokens a step)
TINY = ["--model.n_layer", "1", "--model.n_head", "2", "--model.n_embd", "16", "--data.block_size", "16",
        "--data.batch_size", "4", "--data.num_workers", "0", "--trainer.max_steps", "4",
        "--trainer.val_check_interval", "2", "--trainer.log_every_n_steps", "1", "--trainer.limit_val_batches", "2",
        "--trainer.accelerator", "cpu", "--model.sample_tokens", "0"]  # fmt: skip
HF_HOME = Path(os.environ.get("HF_HOME", Path.home() / ".cache" / "huggingface"))


class Runner:
    """Runs each step's command within what is left of the budget, keeping its output in logs (if given)."""

    def __init__(self, budget: float, logs: Path | None) -> None:
        self.budget, self.deadline, self.logs = budget, time.monotonic() + budget, logs

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def spent(self) -> str:
        return f"not run: the --budget of {self.budget:.0f} s was spent"

    def run(self, name: str, command: list[str], seconds: float) -> tuple[str | None, str]:
        """(None, output) if the command succeeded within seconds (and the budget), else (why not, output)."""
        seconds = min(seconds, self.left())
        if seconds <= 0:  # a step's earlier command used up the rest
            return self.spent(), ""
        print(f"$ {shlex.join(command)}", flush=True)
        try:
            done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=seconds)
            output = done.stdout + done.stderr
            failed = None
            if done.returncode:
                last = [line for line in output.splitlines() if line.strip()][-1:] or [f"exit {done.returncode}"]
                failed = f"failed: {last[0][:200]}"
        except subprocess.TimeoutExpired as e:
            output = (e.stdout or b"").decode(errors="replace") + (e.stderr or b"").decode(errors="replace")
            failed = f"not finished in {seconds:.0f} s"
        if self.logs:
            self.logs.mkdir(parents=True, exist_ok=True)
            (self.logs / f"{name}.log").write_text(f"$ {shlex.join(command)}\n{output}")
        return failed, output


def doctor(runner: Runner, ckpt_dir: Path, dry_run: bool) -> list[tuple[str, str]]:
    """The doctor's verdict, and its training step's speed (the compiled bf16 GPT-2 124M step on a GPU)."""
    extra = ["--steps", "1", "--write_mb", "4"] if dry_run else []
    command = [sys.executable, "-m", "tinygpt_pl.doctor", "--ckpt_dir", str(ckpt_dir), *extra]
    failed, output = runner.run("doctor", command, 240)
    lines = output.splitlines()
    verdict = next((line for line in lines if line.startswith("verdict:")), failed or "no verdict line")
    step = next((line.strip() for line in lines if "tokens/s" in line), "no training step line")
    return [("doctor", verdict), ("training step (GPT-2 124M, compiled, bf16, on a GPU)", step)]


def scalars(root: Path) -> dict[str, list]:
    """The run's logged scalars by tag, as TensorBoard events (step, wall_time, value)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(root / "lightning_logs" / "version_0")).Reload()
    return {tag: accumulator.Scalars(tag) for tag in accumulator.Tags()["scalars"]}


def train(runner: Runner, config: str, data: Path, root: Path, seconds: float, dry_run: bool) -> tuple[str, str]:
    """config trained for at most seconds: its last val loss, and where the run got to, with the projected time of the
    whole run when it stopped short."""
    limit = f"00:00:{int(seconds) // 60:02d}:{int(seconds) % 60:02d}"
    command = [sys.executable, "train.py", "--config", config, "--data.path", str(data), "--trainer.default_root_dir",
               str(root), "--trainer.enable_progress_bar", "false", "--trainer.max_time", limit,
               *(TINY if dry_run else [])]  # fmt: skip
    failed, output = runner.run(Path(config).stem, command, seconds + 180)  # start-up, compilation, last validation
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


def write_conversations(path: Path, text: str, count: int) -> None:
    """count made-up conversations in Hugging Face's chat format, of SmolTalk-like lengths (one to three exchanges,
    some with a system message; about 600 GPT-2 tokens on average), cut from text."""
    rng = random.Random(0)

    def cut(low: int, high: int) -> str:
        start = rng.randrange(len(text) - high)
        return text[start : start + rng.randint(low, high)]

    with path.open("w") as f:
        for _ in range(count):
            messages = [{"role": "system", "content": cut(50, 300)}] if rng.random() < 0.3 else []
            for _ in range(rng.choice((1, 1, 2, 3))):
                messages += [
                    {"role": "user", "content": cut(50, 600)},
                    {"role": "assistant", "content": cut(200, 2400)},
                ]
            f.write(json.dumps({"messages": messages}) + "\n")


def fine_tuning(runner: Runner, data: Path, folder: Path, dry_run: bool) -> list[tuple[str, str]]:
    """Chat fine-tuning's speed against pretraining's (issue 18): the same GPT-2-124M-shaped model (random weights),
    compiled, bf16, 16 sequences of 1024 tokens a step, each from its own config (configs/sft_chat_gpt2.yaml on
    generated conversations, configs/gpt2_124m_fineweb.yaml on tiny Shakespeare) on one device. Tokens/s and MFU as
    train.py logs them, the median over its logging windows after the first (which holds the compilation); a
    fine-tuning row's tokens count its padding, as train.py's do."""
    chats = folder / "conversations.jsonl"
    write_conversations(chats, data.read_text(), 40 if dry_run else 4000)
    steps = 4 if dry_run else SFT_STEPS
    same = ["--trainer.devices", "1", "--trainer.strategy", "auto", "--trainer.max_steps", str(steps),
            "--trainer.val_check_interval", str(steps), "--trainer.limit_val_batches", "1",
            "--trainer.log_every_n_steps", "10", "--trainer.enable_progress_bar", "false", "--model.init_from", "null",
            "--model.n_layer", "12", "--model.n_head", "12", "--model.n_embd", "768", "--model.bias", "true",
            "--model.dropout", "0.0", "--model.compile", "false" if dry_run else "true", "--model.sample_tokens", "0",
            "--model.eval_tasks", "[]", "--data.hf_path", "null", "--data.hf_name", "null", "--data.batch_size", "16",
            "--data.global_batch_size", "16", "--data.val_fraction", "0.05", "--data.val_max_tokens", "null",
            "--data.num_workers", "4", *(TINY + ["--data.block_size", "1024"] if dry_run else [])]  # fmt: skip
    runs = {"pretraining": ["configs/gpt2_124m_fineweb.yaml", data], "chat fine-tuning": ["configs/sft_chat_gpt2.yaml",
            chats]}  # fmt: skip
    rows, speeds = [], {}
    for name, (config, path) in runs.items():
        slug = name.replace(" ", "_")
        root = folder / slug
        command = [sys.executable, "train.py", "--config", config, "--data.path", str(path),
                   "--trainer.default_root_dir", str(root), *same]  # fmt: skip
        what = f"{name}, GPT-2 124M shape, compiled, bf16 ({config})"
        failed, _ = runner.run(slug, command, 300)
        if failed:
            rows.append((what, failed))
            continue
        logged = scalars(root)
        tokens = [e.value for e in logged.get("throughput/device/tokens_per_sec", [])][1:]
        mfu = [e.value for e in logged.get("throughput/device/mfu", [])][1:]
        if not tokens:
            rows.append((what, "no throughput logged"))
            continue
        speeds[name] = statistics.median(tokens)
        figure = f"MFU {statistics.median(mfu):.1%}" if mfu else "MFU unknown (no peak FLOP/s for this device)"
        rows.append((what, f"{speeds[name]:,.0f} tokens/s, {figure} (median of {len(tokens)} windows)"))
    if len(speeds) == 2:
        ratio = speeds["chat fine-tuning"] / speeds["pretraining"]
        rows.append(("chat fine-tuning against pretraining", f"{ratio:.2f}x the tokens/s"))
    return rows


def generation(runner: Runner, folder: Path, dry_run: bool) -> tuple[str, str]:
    """benchmarks/generation.py --gpu's table (on a CPU, for the dry run, its CPU part at tiny sizes)."""
    results = folder / "generation.md"
    sizes = ["--repeats", "1", "--sample-tokens", "8", "--completion-tokens", "2"] if dry_run else ["--gpu"]
    command = [sys.executable, "benchmarks/generation.py", *sizes, "--results", str(results)]
    failed, output = runner.run("generation", command, 300)
    if failed:
        return "KV cache", failed
    rows = [
        line.strip("| ").split(" | ") for line in output.splitlines() if line.startswith("| ") and "---" not in line
    ]
    return "KV cache (benchmarks/generation.py --gpu)", "<br>".join(", ".join(row) for row in rows[1:]) or "no table"


def hellaswag(runner: Runner, dry_run: bool) -> tuple[str, str]:
    """GPT-2 124M on HellaSwag through the evaluate command, where it exists and the data is on this machine."""
    what = "HellaSwag, GPT-2 124M"
    if not (REPO / "tinygpt_pl" / "evaluate.py").is_file():
        return what, "not run: there is no tinygpt_pl/evaluate.py in this checkout"
    missing = [name for name, pattern in (("the HellaSwag data", "datasets/*hellaswag*"), ("GPT-2's weights",
               "hub/models--gpt2")) if not list(HF_HOME.glob(pattern))]  # fmt: skip
    if missing:
        return what, f"not run: {' and '.join(missing)} not in {HF_HOME} (this machine has no network)"
    command = [sys.executable, "-m", "tinygpt_pl.evaluate", "--ckpt_path", "gpt2", "--tasks", "hellaswag"]
    failed, output = runner.run("hellaswag", [*command, "--limit", "8"] if dry_run else command, 300)
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
    parser.add_argument("--budget", type=float, default=600, help="seconds for all the steps together (default 600)")
    parser.add_argument("--logs", type=Path, help="a folder to keep each step's whole output in")
    parser.add_argument("--results", type=Path, help=f"the Markdown file to write into (default {RESULTS}; none in "
                        "a dry run)")  # fmt: skip
    args = parser.parse_args()
    if not args.data_path.is_file():
        parser.error(f"--data-path {args.data_path}: no such file: pass tiny Shakespeare's text file")
    start = time.monotonic()
    runner = Runner(args.budget, args.logs)
    rows: list[tuple[str, str]] = []
    with tempfile.TemporaryDirectory(prefix="gpu-targets-") as tmp:
        folder = Path(tmp)
        steps = [
            ("doctor", lambda: doctor(runner, folder / "doctor", args.dry_run)),
            *((config, lambda config=config: [train(runner, config, args.data_path, folder / Path(config).stem,
                                                    args.train_seconds, args.dry_run)])
              for config in ("configs/lecture/06_scaled_up.yaml", "configs/shakespeare_char.yaml")),
            ("chat fine-tuning against pretraining", lambda: fine_tuning(runner, args.data_path, folder, args.dry_run)),
            ("KV cache", lambda: [generation(runner, folder, args.dry_run)]),
            ("HellaSwag", lambda: [hellaswag(runner, args.dry_run)]),
        ]  # fmt: skip
        for name, step in steps:
            if runner.left() < 20:
                new = [(name, runner.spent())]
            else:
                try:
                    new = step()
                except Exception as e:  # a step's figures that cannot be read: its row says so, the others still run
                    new = [(name, f"failed: {type(e).__name__}: {e}")]
            for row in new:
                print(f"| {row[0]} | {row[1]} |", flush=True)
            rows += new
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
