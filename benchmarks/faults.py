"""Fault injection: train.py killed at random moments resumes exactly.

Two parts, each against an uninterrupted run of the same command:

1. SIGKILL: `--kills` trials of a short CPU-recipe run (`--steps` steps, validated and saved every 25). Each trial
   kills train.py with SIGKILL once, at a moment drawn at random: half of the trials at a random time of the run,
   half at the start of a randomly drawn checkpoint write (the moment its temporary file appears). The run is then
   resumed with `--ckpt_path last` (started again if no checkpoint existed yet) to its end, and its final val/loss and
   weights are compared with the uninterrupted run's.
2. SIGTERM: the whole CPU recipe (configs/shakespeare_char_cpu.yaml) gets SIGTERM at a random step, and is resumed:
   the step saved against the step under way when the signal came, the exit status, and the final val/loss against
   the uninterrupted recipe's (target: within 2e-4).

    python benchmarks/faults.py --data-path /path/to/tinyshakespeare.txt [--kills 10] [--steps 300] [--seed 0]
"""

import argparse
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import time
from importlib.metadata import version
from pathlib import Path

from cpu_recipe import project_val_losses
from results import REPO, RESULTS, record, stamp

from tinygpt_pl.training.checkpoint import checkpoint_step

CONFIG = REPO / "configs" / "shakespeare_char_cpu.yaml"
TITLE = "Fault injection (benchmarks/faults.py)"


def command(root: Path, data_path: str, *args: str) -> list[str]:
    return [sys.executable, "train.py", "--config", str(CONFIG), "--data.path", data_path,
            "--trainer.default_root_dir", str(root), "--trainer.enable_progress_bar", "false", *args]  # fmt: skip


def run(cmd: list[str], log: Path) -> int:
    with open(log, "a") as f:
        return subprocess.run(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT).returncode


def final_val_loss(root: Path) -> float:
    """val/loss of the run's last validation, over all its parts."""
    losses = project_val_losses(root)
    return losses[max(losses)]


def max_weight_diff(a: Path, b: Path) -> float:
    import torch

    wa = torch.load(a / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    wb = torch.load(b / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    return max(float((wa[k] - wb[k]).abs().max()) for k in wa)


def saved_step(root: Path) -> int | None:
    path = root / "checkpoints" / "last.ckpt"
    return checkpoint_step(path) if path.exists() else None


def kill_at(cmd: list[str], log: Path, root: Path, seconds: float | None, write: int | None) -> str:
    """Start cmd and SIGKILL it after `seconds`, or as its `write`-th checkpoint write begins; what happened."""
    folder = root / "checkpoints"
    with open(log, "a") as f:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT)
    start, writes, present = time.perf_counter(), 0, set()
    while proc.poll() is None:
        if seconds is not None and time.perf_counter() - start >= seconds:
            break
        if write is not None and folder.is_dir():
            now = {p.name for p in os.scandir(folder) if p.name.endswith(".tmp")}
            writes += len(now - present)  # temporary files that appeared since the last look: writes that began
            present = now
            if writes >= write:
                break
        time.sleep(0.0005)
    if proc.poll() is not None:
        return f"ended by itself first (status {proc.returncode})"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    left = sorted(p.name for p in folder.glob(".*.tmp")) if folder.is_dir() else []
    where = f"{seconds:.1f} s after start" if seconds is not None else f"as checkpoint write {write} began"
    return f"{where}; half-written file left: {'yes' if left else 'no'}"


def sigkill_trials(data_path: str, kills: int, steps: int, rng: random.Random, tmp: Path) -> list[str]:
    short = ["--trainer.max_steps", str(steps), "--trainer.val_check_interval", "25", "--model.sample_tokens", "0"]
    reference = tmp / "reference"
    start = time.perf_counter()
    if run(command(reference, data_path, *short), tmp / "reference.log"):
        sys.exit(f"the uninterrupted run failed: see {tmp / 'reference.log'}")
    duration = time.perf_counter() - start
    expected = final_val_loss(reference)
    saves = 2 * (steps // 25)  # best and last at each validation
    rows = []
    for i in range(kills):
        root, log = tmp / f"trial-{i}", tmp / f"trial-{i}.log"
        if i % 2 == 0:
            what = kill_at(command(root, data_path, *short), log, root, rng.uniform(0.1, 1.0) * duration, None)
        else:
            what = kill_at(command(root, data_path, *short), log, root, None, rng.randint(1, saves))
        at = saved_step(root)
        resume = ["--ckpt_path", "last"] if at is not None else []
        status = run(command(root, data_path, *short, *resume), log)
        loss = final_val_loss(root) if status == 0 else float("nan")
        diff = max_weight_diff(root, reference) if status == 0 else float("nan")
        exact = status == 0 and loss == expected and diff == 0.0
        rows.append(f"| {i + 1} | {what} | {at if at is not None else 'none'} | {status} | {loss:.6f} | "
                    f"{abs(loss - expected):.1e} | {diff:.1e} | {'yes' if exact else '**no**'} |")  # fmt: skip
        print(rows[-1], flush=True)
    exact = sum("| yes |" in r for r in rows)
    return [
        f"Part 1, SIGKILL: {steps} steps of the CPU recipe, validated and saved (best, last) every 25 steps; the "
        f"uninterrupted run took {duration:.1f} s and ended at val/loss {expected:.6f}.",
        "",
        "| trial | killed | last.ckpt step after the kill | resumed run's exit status | final val/loss "
        "| val/loss diff | max weight diff | exact |",
        "|---|---|---|---|---|---|---|---|",
        *rows,
        "",
        f"**{exact} of {kills}** killed runs resumed to exactly the uninterrupted run's val/loss and weights.",
    ]


def sigterm_trial(data_path: str, rng: random.Random, tmp: Path) -> list[str]:
    reference, root = tmp / "recipe", tmp / "recipe-interrupted"
    start = time.perf_counter()
    if run(command(reference, data_path), tmp / "recipe.log"):
        sys.exit(f"the uninterrupted recipe failed: see {tmp / 'recipe.log'}")
    duration = time.perf_counter() - start
    moment = rng.uniform(0.3, 0.9) * duration
    log = tmp / "recipe-interrupted.log"
    with open(log, "w") as f:
        proc = subprocess.Popen(command(root, data_path), cwd=REPO, stdout=f, stderr=subprocess.STDOUT)
    time.sleep(moment)
    proc.send_signal(signal.SIGTERM)
    status = proc.wait()
    text = log.read_text()
    received = re.search(r"received SIGTERM during (?:step (\d+)|the validation after step (\d+))", text)
    stopped = re.search(r"stopped at step (\d+) by SIGTERM", text)
    under_way = int(received[1] or received[2]) if received else None
    saved = saved_step(root)
    resumed = run(command(root, data_path, "--ckpt_path", "last"), log)
    expected, loss = final_val_loss(reference), final_val_loss(root)
    return [
        f"Part 2, SIGTERM: the whole CPU recipe (uninterrupted: {duration:.1f} s, val/loss {expected:.6f}), SIGTERM "
        f"{moment:.1f} s after start.",
        "",
        "| step under way at the signal | step saved | line printed | exit status | resumed exit status "
        "| resumed final val/loss | diff (target <= 2e-4) |",
        "|---|---|---|---|---|---|---|",
        f"| {under_way} | {saved} | {'yes' if stopped else 'no'} | {status} | {resumed} | {loss:.6f} "
        f"| {abs(loss - expected):.1e} |",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-path", required=True, help="the text corpus, passed to train.py as --data.path")
    parser.add_argument("--kills", type=int, default=10, help="SIGKILL trials (default 10)")
    parser.add_argument("--steps", type=int, default=300, help="steps of each SIGKILL trial's run (default 300)")
    parser.add_argument("--seed", type=int, default=0, help="draws the kill moments")
    parser.add_argument("--results", type=Path, default=RESULTS, help="the Markdown file to write the section into")
    args = parser.parse_args()
    rng = random.Random(args.seed)
    data_path = str(Path(args.data_path).resolve())
    with tempfile.TemporaryDirectory(prefix="faults-") as tmp:
        lines = sigkill_trials(data_path, args.kills, args.steps, rng, Path(tmp))
        lines += ["", *sigterm_trial(data_path, rng, Path(tmp))]
    body = "\n".join([stamp(), f"torch {version('torch')}, lightning {version('lightning')}.", "", *lines])
    record(TITLE, body, args.results)


if __name__ == "__main__":
    main()
