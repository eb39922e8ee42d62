"""The lecture's ladder: each stage of "Let's build GPT" (configs/lecture/) trained by train.py, its val loss beside
the lecture's.

Stages 00-05 train on the CPU; 06_scaled_up (10.8M parameters, block 256) needs a GPU (`--gpu`). Each stage is a whole
`python train.py --config configs/lecture/STAGE.yaml` run, and its val loss is the last validation's, over the full
val split (the lecture estimates it from 200 random batches). With several --seeds, each stage trains once per seed
(--jobs runs at a time) and the mean counts: the spread between seeds (~0.03 at stage 05) is as large as the step
from one stage to the next. Targets: each CPU stage within 0.05 of the lecture's val loss or below it, each stage
below the one before; 06 <= 1.48.

    python benchmarks/lecture.py --data-path /path/to/tinyshakespeare.txt [--gpu] [--stages 00 03] \
        [--seeds 1337 1338 1339 --jobs 2]
"""

import argparse
import os
import statistics
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from importlib.metadata import version
from pathlib import Path

import torch
from cpu_recipe import project_val_losses, run_timed
from results import REPO, RESULTS, machine, record, stamp

CONFIGS = REPO / "configs" / "lecture"
LECTURE_VAL_LOSS = {  # the val loss the lecture reports at the end of each stage
    "00_bigram": 2.50,
    "01_single_head": 2.40,
    "02_multi_head": 2.28,
    "03_feed_forward": 2.24,
    "04_residual": 2.08,
    "05_layernorm": 2.06,
    "06_scaled_up": 1.48,
}
GPU_STAGES = {"06_scaled_up"}
TOLERANCE = 0.05
TITLE = "The lecture's ladder (configs/lecture/, benchmarks/lecture.py)"
GPU_TITLE = "The lecture's ladder on a GPU (configs/lecture/, benchmarks/lecture.py --gpu)"


def train_stage(stage: str, seed: int, data_path: str, gpu: bool, tmp: Path) -> tuple[float, int, float]:
    """(final val loss, parameters, wall seconds) of one stage's train.py run."""
    root = tmp / f"{stage}-{seed}"
    cmd = [sys.executable, "train.py", "--config", str(CONFIGS / f"{stage}.yaml"), "--data.path", data_path,
           "--trainer.default_root_dir", str(root), "--trainer.accelerator", "gpu" if gpu else "cpu",
           "--trainer.enable_progress_bar", "false", "--seed_everything", str(seed)]  # fmt: skip
    seconds = run_timed(cmd, root.with_suffix(".log"))
    losses = project_val_losses(root)
    state = torch.load(root / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["state_dict"]
    return losses[max(losses)], sum(v.numel() for v in state.values()), seconds


def verdicts(rows: list[tuple]) -> list[str]:
    """Each stage (name, mean val loss, ...) against its target: within TOLERANCE of the lecture or below, and below
    the stage before."""
    lines, before = [], None
    for stage, loss, *_ in rows:
        close = loss <= LECTURE_VAL_LOSS[stage] + (0 if stage in GPU_STAGES else TOLERANCE)
        better = before is None or loss < before
        misses = [why for why, ok in (("above the lecture", close), ("not below the stage before", better)) if not ok]
        lines.append(f"{stage}: misses its target ({', '.join(misses)})" if misses else f"{stage}: meets its target")
        before = loss
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-path", required=True, help="tiny Shakespeare, passed to train.py as --data.path")
    parser.add_argument("--gpu", action="store_true", help="train every stage on the GPU, 06_scaled_up included")
    parser.add_argument("--stages", nargs="+", help="stage numbers or names to train (default: all that can)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1337], help="seeds per stage (default: the configs')")
    parser.add_argument("--jobs", type=int, default=1, help="train.py runs at a time (one thread each)")
    parser.add_argument("--results", type=Path, default=RESULTS, help="the Markdown file to write the section into")
    args = parser.parse_args()
    stages = [s for s in LECTURE_VAL_LOSS if args.gpu or s not in GPU_STAGES]
    if args.stages:
        stages = [s for s in stages if any(s.startswith(w) for w in args.stages)]
    if not stages:
        sys.exit(f"--stages {' '.join(args.stages)}: no such stage{'' if args.gpu else ' on the CPU'}: "
                 f"choose among {', '.join(LECTURE_VAL_LOSS)} (06 with --gpu)")  # fmt: skip

    device = torch.cuda.get_device_name() if args.gpu else machine()  # before OMP_NUM_THREADS, which nproc obeys
    # One thread per train.py: these models are too small to gain from more, and on a busy machine threads that wait
    # for each other's cores slow a step down many times over.
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    rows = []
    with tempfile.TemporaryDirectory(prefix="lecture-") as tmp, ThreadPoolExecutor(args.jobs) as pool:
        runs = {(stage, seed): pool.submit(train_stage, stage, seed, args.data_path, args.gpu, Path(tmp))
                for stage in stages for seed in args.seeds}  # fmt: skip
        for stage in stages:
            losses, params, seconds = zip(*(runs[stage, seed].result() for seed in args.seeds), strict=True)
            mean, each = statistics.mean(losses), ", ".join(f"{x:.4f}" for x in losses)
            rows.append((stage, mean, params[0], statistics.mean(seconds), losses))
            print(f"{stage}: val loss {mean:.4f} ({each}; lecture {LECTURE_VAL_LOSS[stage]:.2f}), "
                  f"{params[0]:,} parameters, {rows[-1][3]:.0f} s", flush=True)  # fmt: skip

    body = "\n".join(
        [
            stamp(where=device),
            f"torch {version('torch')}, lightning {version('lightning')}; "
            f"OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']}.",
            "",
            f"Seeds: {', '.join(map(str, args.seeds))}; val/loss is their mean, each seed's in the last column.",
            "",
            "| config | lecture's val loss | our val/loss (full val split) | difference | parameters | wall (s) "
            "| per seed |",
            "|---|---|---|---|---|---|---|",
            *(
                f"| {stage}.yaml | {LECTURE_VAL_LOSS[stage]:.2f} | {loss:.4f} | {loss - LECTURE_VAL_LOSS[stage]:+.3f} "
                f"| {params:,} | {seconds:.0f} | {' / '.join(f'{x:.4f}' for x in losses)} |"
                for stage, loss, params, seconds, losses in rows
            ),
            "",
            f"Targets: each CPU stage within {TOLERANCE} of the lecture's val loss or below it, each stage below "
            "the one before; 06_scaled_up <= 1.48 (GPU).",
            "",
            *(f"- {line}" for line in verdicts(rows)),
        ]
    )
    record(GPU_TITLE if args.gpu else TITLE, body, args.results)


if __name__ == "__main__":
    main()
