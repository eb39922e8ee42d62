"""Chat fine-tuning learns on a CPU: the CPU recipe's base model (configs/shakespeare_char_cpu.yaml) fine-tuned with
train.py (configs/sft_synthetic_cpu.yaml, at most 5 minutes) to reverse the word the user gives, then asked 200
held-out words through the chat path (generation/chat.py, the code of sample.py --chat and /v1/chat/completions),
greedily; a reply counts when it is exactly the reversed word. The base model is asked the same way, through the same
template (its weights with the template's rows added as --model.init_from adds them: what the fine-tuning starts from).

Words are random strings of 3 to 7 lowercase letters (in tiny Shakespeare's alphabet), the held-out ones in neither
the training nor the validation conversations.

Packing against padding: the same fine-tuning twice, side by side, with the same tokens per step: padded (a
conversation per row of 24 tokens, 64 rows) and packed (--data.packing true: rows of 64 tokens, the base's context,
filled with whole conversations, 24 rows). Both validate on the same held-out conversations every 100 steps; the
faster to the val/loss both reach is the one configs/sft_synthetic_cpu.yaml keeps, and the one asked the 200 words.

    python benchmarks/sft_synthetic.py --data-path /path/to/tinyshakespeare.txt [--base-ckpt out/.../last.ckpt]
"""

import argparse
import json
import os
import random
import shlex
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks.results import record, stamp  # noqa: E402
from tinygpt_pl.data.chat import ChatTokenizer  # noqa: E402
from tinygpt_pl.generation.chat import Chat  # noqa: E402
from tinygpt_pl.generation.generate import Sampling  # noqa: E402
from tinygpt_pl.load import load_checkpoint, load_model  # noqa: E402
from tinygpt_pl.model import GPT  # noqa: E402
from tinygpt_pl.training.init_from import init_from_state  # noqa: E402

LETTERS = "abcdefghijklmnopqrstuvwxyz"
# one thread per train.py: the model is tiny, and on a CPU shared with other work a second thread only waits (on this
# machine's 2 cores under a load of ~10, the base recipe ran ~10 steps/s so, against ~0.3 with the default threads)
ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1"}


def words(n: int, rng: random.Random, exclude: set[str] = frozenset()) -> list[str]:
    chosen: dict[str, None] = {}
    while len(chosen) < n:
        word = "".join(rng.choice(LETTERS) for _ in range(rng.randint(3, 7)))
        if word not in exclude:
            chosen[word] = None
    return list(chosen)


def write_conversations(path: Path, prompts: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for word in prompts:
            messages = [{"role": "user", "content": word}, {"role": "assistant", "content": word[::-1]}]
            f.write(json.dumps({"messages": messages}) + "\n")


def train(args: list[str]) -> tuple[float, str]:
    """train.py with args; its wall time and stderr."""
    start = time.monotonic()
    Path(args[args.index("--trainer.default_root_dir") + 1]).parent.mkdir(parents=True, exist_ok=True)
    result = subprocess.run([sys.executable, str(REPO / "train.py"), *args, "--trainer.enable_progress_bar", "false"],
                            cwd=REPO, capture_output=True, text=True, env=ONE_THREAD)  # fmt: skip
    if result.returncode != 0:
        sys.exit(f"train.py {shlex.join(args)} failed:\n{result.stderr[-3000:]}")
    return time.monotonic() - start, result.stderr


def exact(model: GPT, tokenizer: ChatTokenizer, prompts: list[str]) -> float:
    """The share of prompts whose greedy reply is exactly the reversed word."""
    chat = Chat(model, tokenizer, Sampling(temperature=0), max_new_tokens=12)
    right = 0
    for word in prompts:
        chat.clear()
        right += chat.reply([{"role": "user", "content": word}]).result().text == word[::-1]
    return right / len(prompts)


def val_curve(root: Path) -> list[tuple[float, int, float]]:
    """(wall time, step, val/loss) of each validation of the run in root."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (path,) = (root / "lightning_logs" / "version_0").glob("events.out.tfevents.*")
    return [(e.wall_time, e.step, e.value) for e in EventAccumulator(str(path)).Reload().Scalars("val/loss")]


def fine_tune(out: Path, base_ckpt: Path, data: Path, packing: bool) -> dict:
    """configs/sft_synthetic_cpu.yaml from base_ckpt, padded or packed: its wall time, steps, validations."""
    root = out / ("packed" if packing else "padded")
    shape = ["--data.block_size", "64", "--data.batch_size", "24"] if packing else []
    started = time.time()
    wall, _ = train(["--config", "configs/sft_synthetic_cpu.yaml", "--model.init_from", str(base_ckpt),
                     "--data.path", str(data), "--data.cache_dir", str(out / "cache"), "--trainer.default_root_dir",
                     str(root), "--data.packing", str(packing).lower(), "--trainer.val_check_interval", "100",
                     *shape])  # fmt: skip
    checkpoint = torch.load(root / "checkpoints" / "last.ckpt", weights_only=True, map_location="cpu")
    curve = [(t - started, step, loss) for t, step, loss in val_curve(root)]
    return {"root": root, "wall": wall, "steps": checkpoint["global_step"], "curve": curve}


def time_to(run: dict, loss: float) -> float:
    """Seconds from the run's start to its first validation at or below loss."""
    return next(t for t, _, v in run["curve"] if v <= loss + 1e-9)


def base_as_chat_model(base_ckpt: Path, chat_tokenizer: ChatTokenizer, block_size: int) -> GPT:
    """The base model with the template's rows, as the fine-tuning starts from it."""
    base, _ = load_checkpoint(base_ckpt)
    config = base.config
    config.vocab_size, config.block_size = chat_tokenizer.vocab_size, block_size
    model = GPT(config)
    model.load_state_dict(init_from_state(str(base_ckpt), block_size, config.vocab_size, config.vocab_size))
    return model.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-path", required=True, help="tiny Shakespeare, for the base model")
    parser.add_argument("--base-ckpt", help="a finished run of configs/shakespeare_char_cpu.yaml (default: train one)")
    parser.add_argument("--out", default=str(REPO / "out" / "sft_synthetic_cpu"))
    parser.add_argument("--train-conversations", type=int, default=50_000)
    args = parser.parse_args()
    torch.set_num_threads(torch.get_num_threads())
    out = Path(args.out)
    base_ckpt = Path(args.base_ckpt) if args.base_ckpt else out / "base" / "checkpoints" / "last.ckpt"
    base_wall = None
    if not args.base_ckpt:
        base_wall, _ = train(["--config", "configs/shakespeare_char_cpu.yaml", "--data.path", args.data_path,
                              "--trainer.default_root_dir", str(out / "base")])  # fmt: skip

    rng = random.Random(0)
    held_out = words(200, rng)
    data = out / "reversal" / "train.jsonl"
    write_conversations(data, words(args.train_conversations, rng, set(held_out)))
    runs = {packing: fine_tune(out, base_ckpt, data, packing) for packing in (False, True)}
    reached = max(min(v for _, _, v in run["curve"]) for run in runs.values())  # the val/loss both runs reach
    faster = min(runs, key=lambda packing: time_to(runs[packing], reached))
    kept = runs[faster]
    model, tokenizer = load_model(str(kept["root"] / "checkpoints" / "last.ckpt"))
    fine_tuned = exact(model, tokenizer, held_out)
    base = exact(base_as_chat_model(base_ckpt, tokenizer, model.config.block_size), tokenizer, held_out)
    chat = Chat(model, tokenizer, Sampling(temperature=0), max_new_tokens=12)
    examples = []
    for word in held_out[:5]:
        chat.clear()
        examples.append(f"`{word}` -> `{chat.reply([{'role': 'user', 'content': word}]).result().text}`")

    base_steps = torch.load(base_ckpt, weights_only=True, map_location="cpu")["global_step"]
    met = fine_tuned >= 0.9 and base <= 0.1 and kept["wall"] <= 5 * 60 + 60
    command = "python benchmarks/sft_synthetic.py --data-path /path/to/tinyshakespeare.txt" + (
        f" --base-ckpt {args.base_ckpt}" if args.base_ckpt else ""
    )
    base_line = f"{base_steps} steps" + (f", trained here in {base_wall:.0f} s" if base_wall is not None else "")
    rows = []
    for packing, run in runs.items():
        final = run["curve"][-1]
        rows.append(f"| {'packed: 24 rows of 64' if packing else 'padded: 64 rows of 24'} | {run['steps']} | "
                    f"{run['wall']:.0f} | {run['steps'] / run['wall']:.2f} | {final[2]:.4f} | "
                    f"{time_to(run, reached):.0f} |")  # fmt: skip
    curves = [f"- {'packed' if packing else 'padded'}: "
              + ", ".join(f"step {step + 1}: {loss:.4f} ({t:.0f} s)" for t, step, loss in run["curve"])
              for packing, run in runs.items()]  # fmt: skip
    body = f"""{stamp(command)}
Target: fine-tuned with train.py for at most 5 minutes, the model reverses >= 90% of 200 held-out words exactly through
the chat path (greedy), where the base model reverses <= 10%. The machine is shared with other sessions (load average
near 10 on its 2 cores during these runs): wall times are noisy, and steps per second far below a quiet machine's.

| model | exact replies (200 held-out words) |
|---|---|
| base (configs/shakespeare_char_cpu.yaml, {base_line}), with the template's rows | **{base:.1%}** |
| fine-tuned, {"packed" if faster else "padded"} ({kept["steps"]} steps, {kept["wall"]:.0f} s of train.py) \
| **{fine_tuned:.1%}** |

Target {"met" if met else "NOT met"}. Fine-tuned replies to the first held-out words: {", ".join(examples)}.

Packing against padding, side by side (same 1,536 token slots per step, the same schedule, validation every 100 steps
on the same {args.train_conversations // 50:,} held-out conversations; time from the train.py start):

| rows | steps in the 5 minutes | train.py wall (s) | steps/s | last val/loss | s to val/loss {reached:.4f} |
|---|---|---|---|---|---|
{chr(10).join(rows)}

Faster to the same val/loss: **{"packed" if faster else "padded"}**. val/loss (s from the start) at each validation:

{chr(10).join(curves)}
"""
    record("Chat fine-tuning on a CPU: reversing words (benchmarks/sft_synthetic.py)", body)


if __name__ == "__main__":
    main()
