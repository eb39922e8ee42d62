"""The lecture's tokenizers side by side on the CPU recipe's compute budget: characters, SentencePiece (1k and 4k
pieces, trained on the training split) and GPT-2's BPE. Each trains configs/shakespeare_char_cpu.yaml's model and
settings through train.py for the same wall time (--trainer.max_time); the table gives each vocabulary's size, its
tokens per byte of tiny Shakespeare, and val/bpb over the full val split after that time: bits per byte, which,
unlike the loss per token, compares models whose tokens differ.

    python benchmarks/compare_tokenizers.py --data-path ../shared/data/tinyshakespeare.txt [--seconds 170]

On a machine shared with other work, OMP_NUM_THREADS=1 keeps torch's threads from waiting on each other (a step
can take 20x longer with 2 threads on 2 busy cores); the table records it.
"""

import argparse
import os
import sys
import tempfile
from importlib.metadata import version
from pathlib import Path

import lightning as L
import yaml
from cpu_recipe import DEFAULT_CONFIG, run_timed
from results import RESULTS, record, stamp

from tinygpt_pl.data.datamodule import TextDataModule
from tinygpt_pl.load import read_checkpoint
from tinygpt_pl.training.module import GPTModule

TOKENIZERS = {
    "char": ["--data.tokenizer", "char"],
    "SentencePiece BPE 1k": ["--data.tokenizer", "sentencepiece", "--data.tokenizer_vocab_size", "1024"],
    "SentencePiece BPE 4k": ["--data.tokenizer", "sentencepiece", "--data.tokenizer_vocab_size", "4096"],
    "GPT-2 BPE (tiktoken)": ["--data.tokenizer", "gpt2"],
}
TITLE = "Tokenizers at the CPU recipe's budget (benchmarks/compare_tokenizers.py)"


def max_time(seconds: int) -> str:
    """seconds as Lightning's --trainer.max_time, DD:HH:MM:SS."""
    return f"00:{seconds // 3600:02d}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def evaluate(root: Path, text: str) -> dict:
    """The finished run in root: its steps, its tokenizer's vocabulary and tokens per byte of text, and val/loss and
    val/bpb of its last checkpoint over the full val split (the data as the run's config.yaml set it up)."""
    (config,) = root.glob("lightning_logs/version_*/config.yaml")
    data = TextDataModule(**yaml.safe_load(config.read_text())["data"])
    ckpt = root / "checkpoints" / "last.ckpt"
    checkpoint = read_checkpoint(ckpt, mmap=True)
    module = GPTModule(**{k: v for k, v in checkpoint["hyper_parameters"].items() if not k.startswith("_")})
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False)  # fmt: skip
    (result,) = trainer.validate(module, datamodule=data, ckpt_path=str(ckpt), verbose=False)
    return {
        "vocab": data.tokenizer.vocab_size,
        "model_vocab": data.vocab_size,
        "tokens_per_byte": len(data.tokenizer.encode(text)) / len(text.encode()),
        "steps": checkpoint["global_step"],
        "val_loss": result["val/loss"],
        "val_bpb": result["val/bpb"],
    }


def benchmark(config: Path, data_path: str, seconds: int, results: Path) -> None:
    """Train the config for `seconds` with each tokenizer; print the table and record it in results."""
    text = Path(data_path).read_text(encoding="utf-8")
    rows = {}
    with tempfile.TemporaryDirectory(prefix="tokenizers-") as tmp:
        for i, (name, args) in enumerate(TOKENIZERS.items()):
            root = Path(tmp) / f"run{i}"
            cmd = [sys.executable, "train.py", "--config", str(config), "--data.path", data_path, "--data.cache_dir",
                   str(Path(tmp) / "cache"), "--trainer.default_root_dir", str(root), "--trainer.max_time",
                   max_time(seconds), "--trainer.enable_progress_bar", "false", *args]  # fmt: skip
            wall = run_timed(cmd, Path(tmp) / f"run{i}.log")
            rows[name] = evaluate(root, text)
            print(f"{name}: {wall:.0f} s in all, {rows[name]}", flush=True)
    lines = [
        f"| tokenizer | vocabulary (model's) | tokens per byte | steps in {seconds} s | val/loss per token "
        "| **val/bpb** |",
        "|---|---|---|---|---|---|",
        *(
            f"| {name} | {r['vocab']:,} ({r['model_vocab']:,}) | {r['tokens_per_byte']:.3f} | {r['steps']} "
            f"| {r['val_loss']:.4f} | **{r['val_bpb']:.4f}** |"
            for name, r in rows.items()
        ),
    ]
    body = "\n".join(
        [
            stamp(),
            f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')} (which nproc counts) of {os.cpu_count()} "
            f"CPUs; torch {version('torch')}, lightning {version('lightning')}, "
            f"sentencepiece {version('sentencepiece')}.",
            "",
            f"Each tokenizer trains {config.name}'s model and settings through train.py for {seconds} s of wall time "
            f"(`--trainer.max_time {max_time(seconds)}`, the recipe's schedule cut short where time runs out; "
            "SentencePiece trains on the training split before that). Tokens per byte: of the whole tiny "
            "Shakespeare. val/loss and val/bpb: of the last checkpoint over the full val split; val/bpb = the "
            "split's summed loss in bits / its UTF-8 bytes, so the rows compare although their tokens differ.",
            "",
            *lines,
        ]
    )
    record(TITLE, body, results)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="the training recipe (YAML)")
    parser.add_argument("--data-path", required=True, help="tiny Shakespeare, passed to train.py as --data.path")
    parser.add_argument("--seconds", type=int, default=170, help="training wall time per tokenizer (default 170)")
    parser.add_argument("--results", type=Path, default=RESULTS, help="the Markdown file to write the section into")
    args = parser.parse_args()
    benchmark(args.config.resolve(), str(Path(args.data_path).resolve()), args.seconds, args.results)


if __name__ == "__main__":
    main()
