"""The modern recipe against nanoGPT's CPU recipe: whole train.py runs, back to back, on the same machine.

Runs configs/shakespeare_char_cpu.yaml (nanoGPT's recipe) and then configs/shakespeare_char_cpu_modern.yaml, and
reports for both the full-split val loss against wall time (from the start of the train.py process), the wall time
each needs to reach the target loss, and the modern recipe's val loss at the nanoGPT recipe's whole wall time. Then an
ablation: each option of the modern recipe switched on alone on the nanoGPT recipe (--ablation-steps runs them, and a
baseline, with fewer steps when time is short).

    python benchmarks/recipe.py --data-path /path/to/tinyshakespeare.txt [--ablation-steps 1000] [--no-ablation]
"""

import argparse
import resource
import shlex
import sys
import tempfile
import time
from importlib.metadata import version
from pathlib import Path

from cpu_recipe import project_val_losses, run_timed
from results import REPO, RESULTS, record, stamp

NANOGPT = REPO / "configs" / "shakespeare_char_cpu.yaml"
MODERN = REPO / "configs" / "shakespeare_char_cpu_modern.yaml"
TITLE = "Modern recipe against nanoGPT's CPU recipe (benchmarks/recipe.py)"
TARGET = 1.898  # the nanoGPT recipe's final val loss
STRETCH = 1.75  # the modern recipe's target at the nanoGPT recipe's whole wall time

# each option of the modern recipe, alone, on the nanoGPT recipe (Muon at the modern config's learning rate)
ABLATION = {
    "rotary positions": ["--model.pos_emb", "rotary"],
    "RMSNorm": ["--model.norm", "rmsnorm"],
    "QK-norm": ["--model.qk_norm", "true"],
    "ReLU²": ["--model.activation", "relu2"],
    "untied head": ["--model.tie_weights", "false"],
    "zero-init projections": ["--model.zero_init_proj", "true"],
    "logit soft-cap 30": ["--model.logit_softcap", "30"],
    "Muon (lr 0.02)": ["--model.optimizer", "muon", "--model.muon_lr", "0.02"],
    "WSD schedule (decay 0.4)": ["--model.lr_schedule", "wsd", "--model.decay_fraction", "0.4"],
}


def val_wall_times(root: Path) -> dict[int, float]:
    """When (epoch seconds) each val/loss of the train.py run in root was logged, keyed as project_val_losses keys
    its values."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (events,) = root.glob("lightning_logs/version_0/events.out.tfevents.*")
    return {e.step + 1: e.wall_time for e in EventAccumulator(str(events)).Reload().Scalars("val/loss")}


def cpu_seconds() -> float:
    """CPU time (user + system) of this process's finished children: less sensitive than wall time to other work on a
    shared machine."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def timed_run(config: Path, root: Path, data_path: str, *flags: str) -> tuple[float, float, list]:
    """One whole train.py run: its wall time, its CPU time, and (step, seconds since the process started, val/loss)
    at every validation."""
    cmd = [sys.executable, "train.py", "--config", str(config), "--data.path", data_path,
           "--trainer.default_root_dir", str(root), "--trainer.enable_progress_bar", "false", *flags]  # fmt: skip
    print(f"$ {shlex.join(cmd)}", flush=True)
    start, cpu_start = time.time(), cpu_seconds()
    seconds = run_timed(cmd, root.with_suffix(".log"))
    cpu = cpu_seconds() - cpu_start
    losses, times = project_val_losses(root), val_wall_times(root)
    curve = [(step, times[step] - start, loss) for step, loss in sorted(losses.items())]
    print(f"  {seconds:.1f} s ({cpu:.1f} s CPU), final val/loss {curve[-1][2]:.4f}", flush=True)
    return seconds, cpu, curve


def time_to(curve: list[tuple[int, float, float]], target: float) -> float | None:
    """Seconds until the first validation at or below target; None if none is."""
    return next((seconds for _, seconds, loss in curve if loss <= target), None)


def loss_at(curve: list[tuple[int, float, float]], seconds: float) -> float | None:
    """The newest val/loss logged within the first `seconds`."""
    losses = [loss for _, at, loss in curve if at <= seconds]
    return losses[-1] if losses else None


def fmt(value: float | None, spec: str, missing: str = "not reached") -> str:
    return missing if value is None else format(value, spec)


def benchmark(data_path: str, ablation_steps: int | None, results: Path, nanogpt_config: Path = NANOGPT,
              modern_config: Path = MODERN) -> None:  # fmt: skip
    sections = []
    with tempfile.TemporaryDirectory(prefix="recipe-") as tmp:
        tmp = Path(tmp)
        nanogpt_s, nanogpt_cpu, nanogpt = timed_run(nanogpt_config, tmp / "nanogpt", data_path)
        modern_s, modern_cpu, modern = timed_run(modern_config, tmp / "modern", data_path)
        to_target = {name: time_to(curve, TARGET) for name, curve in (("nanogpt", nanogpt), ("modern", modern))}
        at_nanogpt_wall = loss_at(modern, nanogpt_s)
        sections += [
            "| recipe | config | wall (s) | CPU (s) | final val/loss | wall to val/loss <= 1.898 (s) "
            "| share of nanoGPT's wall |",
            "|---|---|---|---|---|---|---|",
            *(
                f"| {name} | {config.name} | {seconds:.1f} | {cpu:.1f} | {curve[-1][2]:.4f} "
                f"| {fmt(to_target[key], '.1f')} | {fmt(to_target[key] and to_target[key] / nanogpt_s, '.0%')} |"
                for name, key, config, seconds, cpu, curve in (
                    ("nanoGPT", "nanogpt", nanogpt_config, nanogpt_s, nanogpt_cpu, nanogpt),
                    ("modern", "modern", modern_config, modern_s, modern_cpu, modern),
                )
            ),
            "",
            f"The modern recipe's val/loss at the nanoGPT recipe's whole wall time ({nanogpt_s:.1f} s): "
            f"**{fmt(at_nanogpt_wall, '.4f', 'none yet')}** (target <= {STRETCH}); it reaches {TARGET} in "
            f"**{fmt(to_target['modern'] and to_target['modern'] / nanogpt_s, '.0%')}** of that time (target <= 50%).",
            "",
            "Val loss (full val split) against wall time since the train.py process started:",
            "",
            "| recipe | step | wall (s) | val/loss |",
            "|---|---|---|---|",
            *(
                f"| {name} | {s} | {at:.1f} | {loss:.4f} |"
                for name, c in (("nanoGPT", nanogpt), ("modern", modern))
                for s, at, loss in c
            ),
        ]
        if ablation_steps is not None:
            sections += ["", *ablation(nanogpt_config, tmp, data_path, ablation_steps, nanogpt_s, nanogpt)]

    body = "\n".join(
        [
            stamp(),
            f"torch {version('torch')}, lightning {version('lightning')}. Whole train.py runs, one after the other; "
            "wall time is the whole process (imports, validations and checkpoints included).",
            "",
            *sections,
        ]
    )
    record(TITLE, body, results)


def ablation(config: Path, tmp: Path, data_path: str, steps: int, nanogpt_s: float, nanogpt: list) -> list[str]:
    """Each option alone on the nanoGPT recipe, for `steps` steps (the schedule ends there), against the recipe's
    own run of as many steps."""
    short = ["--trainer.max_steps", str(steps), "--trainer.val_check_interval", str(steps)] if steps != 2000 else []
    base_s, _, base = (nanogpt_s, None, nanogpt) if not short else timed_run(config, tmp / "base", data_path, *short)
    rows = []
    for i, (option, flags) in enumerate(ABLATION.items()):
        seconds, _, curve = timed_run(config, tmp / f"ablation-{i}", data_path, *short, *flags)
        delta = curve[-1][2] - base[-1][2]
        rows.append(f"| {option} | `{' '.join(flags)}` | {curve[-1][2]:.4f} | {delta:+.4f} | {seconds:.1f} |")
    return [
        f"Ablation: each option alone on the nanoGPT recipe, {steps} steps each"
        + (" (fewer than the recipe's 2000: its schedule ends there)" if short else "")
        + "; negative difference: better than the recipe.",
        "",
        "| option | flags | final val/loss | difference | wall (s) |",
        "|---|---|---|---|---|",
        f"| none (nanoGPT recipe) | | {base[-1][2]:.4f} | | {base_s:.1f} |",
        *rows,
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-path", required=True, help="tiny Shakespeare, passed to train.py as --data.path")
    parser.add_argument("--ablation-steps", type=int, default=2000, help="steps of each ablation run (default 2000)")
    parser.add_argument("--no-ablation", action="store_true", help="only the two recipes")
    parser.add_argument("--results", type=Path, default=RESULTS, help="the Markdown file to write the section into")
    parser.add_argument("--nanogpt-config", type=Path, default=NANOGPT, help="the baseline recipe")
    parser.add_argument("--modern-config", type=Path, default=MODERN, help="the modern recipe")
    args = parser.parse_args()
    ablation_steps = None if args.no_ablation else args.ablation_steps
    benchmark(args.data_path, ablation_steps, args.results, args.nanogpt_config.resolve(), args.modern_config.resolve())


if __name__ == "__main__":
    main()
