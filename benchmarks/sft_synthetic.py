"""Chat fine-tuning learns on a CPU: the CPU recipe's base model (configs/shakespeare_char_cpu.yaml) fine-tuned with
train.py (configs/sft_synthetic_cpu.yaml, at most 5 minutes) to reverse the word the user gives, then asked 200
held-out words through the chat path (generation/chat.py, the code of sample.py --chat and /v1/chat/completions),
greedily; a reply counts when it is exactly the reversed word. The base model is asked the same way, through the same
template (its weights with the template's rows added as --model.init_from adds them: what the fine-tuning starts from).

Words are random strings of 3 to 7 lowercase letters (in tiny Shakespeare's alphabet), the held-out ones in neither
the training nor the validation conversations.

    python benchmarks/sft_synthetic.py --data-path /path/to/tinyshakespeare.txt [--base-ckpt out/.../last.ckpt]
"""

import argparse
import json
import random
import re
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
    result = subprocess.run([sys.executable, str(REPO / "train.py"), *args, "--trainer.enable_progress_bar", "false"],
                            cwd=REPO, capture_output=True, text=True)  # fmt: skip
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
    write_conversations(out / "reversal" / "train.jsonl", words(args.train_conversations, rng, set(held_out)))
    sft_root = out / "sft"
    sft_wall, log = train(["--config", "configs/sft_synthetic_cpu.yaml", "--model.init_from", str(base_ckpt),
                           "--data.path", str(out / "reversal" / "train.jsonl"), "--data.cache_dir",
                           str(out / "cache"), "--trainer.default_root_dir", str(sft_root)])  # fmt: skip
    sft_ckpt = sft_root / "checkpoints" / "last.ckpt"
    checkpoint = torch.load(sft_ckpt, weights_only=False, map_location="cpu")
    steps = checkpoint["global_step"]
    val_loss = min(float(re.search(r"loss([0-9.]+)\.ckpt", p.name).group(1))
                   for p in (sft_root / "checkpoints").glob("best-*.ckpt"))  # fmt: skip

    model, tokenizer = load_model(str(sft_ckpt))
    fine_tuned = exact(model, tokenizer, held_out)
    base = exact(base_as_chat_model(base_ckpt, tokenizer, model.config.block_size), tokenizer, held_out)
    examples = []
    chat = Chat(model, tokenizer, Sampling(temperature=0), max_new_tokens=12)
    for word in held_out[:5]:
        chat.clear()
        examples.append(f"`{word}` -> `{chat.reply([{'role': 'user', 'content': word}]).result().text}`")

    met = fine_tuned >= 0.9 and base <= 0.1 and sft_wall <= 5 * 60 + 60
    command = "python benchmarks/sft_synthetic.py --data-path /path/to/tinyshakespeare.txt" + (
        f" --base-ckpt {args.base_ckpt}" if args.base_ckpt else ""
    )
    base_line = (f"trained here in {base_wall:.0f} s (the whole recipe, 2000 steps)" if base_wall is not None
                 else f"an earlier whole run of the recipe ({base_ckpt})")  # fmt: skip
    body = f"""{stamp(command)}
Target: fine-tuned with train.py for at most 5 minutes, the model reverses >= 90% of 200 held-out words exactly through
the chat path (greedy), where the base model reverses <= 10%. The machine is shared with other sessions: wall times
are noisy.

| model | exact replies (200 held-out words) |
|---|---|
| base (configs/shakespeare_char_cpu.yaml, {base_line}) | **{base:.1%}** |
| fine-tuned (configs/sft_synthetic_cpu.yaml: {steps} steps in {sft_wall:.0f} s of train.py wall time, \
best val/loss {val_loss:.4f}) | **{fine_tuned:.1%}** |

Training conversations: {args.train_conversations:,} (2% of them validate); rows padded to 24 tokens. Fine-tuned
replies to the first held-out words: {", ".join(examples)}. Target {"met" if met else "NOT met"}.
"""
    record("Chat fine-tuning on a CPU: reversing words (benchmarks/sft_synthetic.py)", body)


if __name__ == "__main__":
    main()
