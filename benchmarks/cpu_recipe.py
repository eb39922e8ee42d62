"""The CPU recipe benchmark: train.py on configs/shakespeare_char_cpu.yaml against a plain PyTorch loop.

Both run as subprocesses of this script, alternating, so both pay the same interpreter start-up; the wall time
of each is the whole subprocess. The plain loop (`--plain`) reads the same YAML config and runs plain_loop.py's
training step, with what nanoGPT's loop does besides training (a logged loss every log_every_n_steps, val/loss
over the same validation blocks and a checkpoint at every validation). train.py also runs with
`--model.sample_tokens 0`: without the text sample that it logs at each validation (nanoGPT's loop writes none),
it does the plain loop's work, and logs more. The plain loop imports Lightning too (it reuses the project's
DataModule); the benchmark also times that import, and gives the ratio against a plain loop that imported torch alone.

    python benchmarks/cpu_recipe.py --data-path /path/to/tinyshakespeare.txt [--repeats 3]
"""

import argparse
import contextlib
import inspect
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from importlib.metadata import version
from pathlib import Path

from results import REPO, RESULTS, record, stamp

DEFAULT_CONFIG = REPO / "configs" / "shakespeare_char_cpu.yaml"
TITLE = "CPU recipe: train.py against the plain loop (benchmarks/cpu_recipe.py)"


def plain_run(config_path: Path, data_path: str, out_dir: Path) -> None:
    """Train the config's recipe with the plain PyTorch loop (plain_loop.py), nanoGPT-style: print the train loss
    every log_every_n_steps, and at every validation print val/loss over the full val split and save a checkpoint."""
    import torch
    import yaml
    from plain_loop import build, train_step

    from tinygpt_pl.data.batches import ValBatchMaker
    from tinygpt_pl.data.datamodule import TextDataModule
    from tinygpt_pl.training.module import GPTModule

    config = yaml.safe_load(config_path.read_text())
    seed, trainer = config["seed_everything"], config["trainer"]
    data = TextDataModule(path=data_path, **{"seed": seed, **config["data"]})
    data.setup("fit")
    defaults = {k: p.default for k, p in inspect.signature(GPTModule.__init__).parameters.items() if k != "self"}
    hp = {**defaults, **config["model"], "vocab_size": data.vocab_size, "block_size": data.block_size}
    max_steps, val_every = trainer["max_steps"], trainer["val_check_interval"]
    decay_steps = hp["lr_decay_steps"] or max_steps
    val_batches = ValBatchMaker(data.val_tokens, data.block_size, data.batch_size, world_size=1, rank=0)

    torch.manual_seed(seed)
    model, optimizer = build(hp, torch.device("cpu"), "32-true")
    model.train()
    for step in range(max_steps):
        loss = train_step(model, optimizer, data, step, hp, decay_steps, accumulate=1,
                          clip=trainer["gradient_clip_val"], precision_context=contextlib.nullcontext())  # fmt: skip
        if (step + 1) % trainer["log_every_n_steps"] == 0:
            print(f"step {step + 1} train/loss {loss.item():.4f} lr {optimizer.param_groups[0]['lr']:.2e}", flush=True)
        if (step + 1) % val_every == 0:
            model.eval()
            total, count = 0.0, 0
            with torch.no_grad():
                for j in range(len(val_batches)):
                    x, y = val_batches(j)
                    _, loss = model(x, y)
                    n = int((y != -1).sum())
                    total, count = total + loss.item() * n, count + n
            model.train()
            print(f"step {step + 1} val/loss {total / count:.6f}", flush=True)
            checkpoint = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step + 1}
            torch.save(checkpoint, out_dir / "ckpt.pt")  # as nanoGPT's train.py does at every evaluation


def run_timed(cmd: list[str], log: Path) -> float:
    """Run cmd in the repository root with its output going to log; its wall time in seconds."""
    with open(log, "w") as f:
        start = time.perf_counter()
        proc = subprocess.run(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT)
        seconds = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"{shlex.join(cmd)} failed with exit status {proc.returncode}; its output:\n{log.read_text()[-4000:]}")
    return seconds


def project_val_losses(root_dir: Path) -> dict[int, float]:
    """val/loss by number of optimizer steps done, from the TensorBoard events of the train.py run in root_dir, over
    all its parts if it was resumed (Lightning logs a validation under the 0-based index of the step before it, hence
    the + 1)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    losses = {}
    for events in sorted(root_dir.glob("lightning_logs/version_*/events.out.tfevents.*")):
        accumulator = EventAccumulator(str(events)).Reload()
        if "val/loss" in accumulator.Tags()["scalars"]:  # a part stopped before its first validation has none
            losses.update((e.step + 1, e.value) for e in accumulator.Scalars("val/loss"))
    return losses


def plain_val_losses(log: Path) -> dict[int, float]:
    """val/loss by step, from the output of a --plain run."""
    return {int(s): float(v) for s, v in re.findall(r"^step (\d+) val/loss (\S+)$", log.read_text(), re.M)}


# what the plain loop imports (Lightning too: it reuses the project's DataModule and GPTModule's defaults), and what a
# plain loop of torch alone would
PLAIN_IMPORTS = "import torch, yaml, plain_loop, tinygpt_pl.data.datamodule, tinygpt_pl.training.module"
TORCH_IMPORTS = "import torch, yaml, tinygpt_pl.model"


def import_seconds(statement: str) -> float:
    """The wall time of a Python process that runs only `statement` (in benchmarks/, as the plain loop runs)."""
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", statement], cwd=Path(__file__).parent, check=True)
    return time.perf_counter() - start


def benchmark(config: Path, data_path: str, repeats: int, results: Path) -> None:
    """Alternate train.py and the plain loop `repeats` times each; print the table and record it in results."""

    def train_py(root_dir: Path, *args: str) -> list[str]:
        return [sys.executable, "train.py", "--config", str(config), "--data.path", data_path,
                "--trainer.default_root_dir", str(root_dir), *args]  # fmt: skip

    rows, lightning_imports = [], []
    with tempfile.TemporaryDirectory(prefix="cpu_recipe-") as tmp:
        for i in range(repeats):
            root = Path(tmp) / f"project-{i}"
            project_cmd = train_py(root)
            commands = {
                "project": project_cmd,
                "no sample": train_py(root.with_name(f"no-sample-{i}"), "--model.sample_tokens", "0"),
                "plain": [sys.executable, str(Path(__file__).resolve()), "--plain", "--config", str(config),
                          "--data-path", data_path],
            }  # fmt: skip
            plain_log = Path(tmp) / f"plain-{i}.log"
            order = list(commands)[i % 3 :] + list(commands)[: i % 3]  # each goes first once in 3 repeats: drift
            seconds = {}
            for which in order:
                log = plain_log if which == "plain" else Path(tmp) / f"{which.replace(' ', '-')}-{i}.log"
                seconds[which] = run_timed(commands[which], log)
                print(f"repeat {i + 1}/{repeats}: {which} {seconds[which]:.1f} s", flush=True)
            project_losses, plain_losses = project_val_losses(root), plain_val_losses(plain_log)
            if project_losses.keys() != plain_losses.keys():
                sys.exit(f"validated at different steps: {sorted(project_losses)} vs {sorted(plain_losses)}")
            last = max(plain_losses)
            max_diff = max(abs(project_losses[s] - plain_losses[s]) for s in plain_losses)
            rows.append((seconds["project"], seconds["no sample"], seconds["plain"], project_losses[last],
                         plain_losses[last], max_diff))  # fmt: skip
            lightning_imports.append(import_seconds(PLAIN_IMPORTS) - import_seconds(TORCH_IMPORTS))

    project_s, bare_s, plain_s = (statistics.median(r[k] for r in rows) for k in range(3))
    imports_s = statistics.median(lightning_imports)
    torch_only_s = plain_s - imports_s  # a plain loop's wall time, had it imported torch alone
    lines = [
        "| run | train.py wall (s) | without samples (s) | plain loop wall (s) | project/plain | without samples/plain "
        f"| train.py val/loss | plain val/loss | max abs diff of val/loss at the {len(plain_losses)} validations |",
        "|---|---|---|---|---|---|---|---|---|",
        *(
            f"| {i + 1} | {p:.1f} | {b:.1f} | {q:.1f} | {p / q:.3f} | {b / q:.3f} | {x:.4f} | {y:.4f} | {d:.1e} |"
            for i, (p, b, q, x, y, d) in enumerate(rows)
        ),  # fmt: skip
        f"| **median** | **{project_s:.1f}** | **{bare_s:.1f}** | **{plain_s:.1f}** | **{project_s / plain_s:.3f}** "
        f"| **{bare_s / plain_s:.3f}** | {statistics.median(r[3] for r in rows):.4f} "
        f"| {statistics.median(r[4] for r in rows):.4f} | |",
        "",
        f"Ratio of medians: project/plain = {project_s / plain_s:.3f}, without the text samples "
        f"{bare_s / plain_s:.3f} (target: project/plain <= 1.05). Final val/loss is at step {last}, over the full val "
        "split (target: <= 1.88).",
        "",
        f"Both loops import Lightning: importing what the plain loop imports takes {imports_s:.1f} s longer than "
        "importing torch and the GPT alone (median of one pair per repeat). Against a plain loop that imported only "
        f"those, train.py would take {project_s / torch_only_s:.3f}x, and {bare_s / torch_only_s:.3f}x without the "
        "text samples.",
    ]
    body = "\n".join(
        [
            stamp(),
            f"Config {config.name}; torch {version('torch')}, lightning {version('lightning')}.",
            "",
            f"Each repeat runs, in turn first, `{shlex.join(['python', *project_cmd[1:]])}` "
            "(TMP: a fresh temporary directory), the same with `--model.sample_tokens 0`, and the plain PyTorch "
            f"loop of the same recipe, `{shlex.join(['python', *commands['plain'][1:]])}`. Wall time is the whole "
            "subprocess.",
            "",
            *lines,
        ]
    )
    record(TITLE, body, results)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="the training config (YAML)")
    parser.add_argument("--data-path", required=True, help="the text corpus, passed to train.py as --data.path")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each, alternating (default 3)")
    parser.add_argument("--results", type=Path, default=RESULTS, help="the Markdown file to write the section into")
    parser.add_argument("--plain", action="store_true", help="run the plain PyTorch loop once (used internally)")
    args = parser.parse_args()
    if args.plain:
        with tempfile.TemporaryDirectory(prefix="cpu_recipe-plain-") as out_dir:
            plain_run(args.config, args.data_path, Path(out_dir))
    else:
        benchmark(args.config.resolve(), args.data_path, args.repeats, args.results)


if __name__ == "__main__":
    main()
