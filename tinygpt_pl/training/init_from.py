"""--model.init_from: a new run that starts from another model's weights (weights only: a new optimizer, step 0, its own
run folder). The source is a train.py checkpoint (.ckpt), a Hugging Face GPT-2 folder or a GPT-2 on the hub.

The run takes the source's shape and tokenizer (the data must use it), with its own block_size (at most the source's
context) and dropout. When the data needs more token ids than the source has rows (the chat template's special tokens
after a char vocabulary, or after GPT-2's 50257), the embedding and head grow; every row from the source tokenizer's
last id on starts at the mean of the real tokens' embeddings (a token the model has never seen, in the middle of those
it has), as do GPT-2's padding rows that the special tokens take.
"""

from collections.abc import Mapping
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

import torch

from tinygpt_pl.data.tokenizer import Tokenizer, tokenizer_from_state
from tinygpt_pl.errors import UsageError
from tinygpt_pl.hf.convert import gpt_config_from_hf, gpt_state_from_hf, hf_config, hf_weights
from tinygpt_pl.hf.tokenizer import tokenizer_from_hf_config
from tinygpt_pl.load import read_checkpoint
from tinygpt_pl.model import GPTConfig

DATA_STATE = "TextDataModule"  # a checkpoint's key of the data's state (its tokenizer)


def is_checkpoint(source: str) -> bool:
    return source.endswith(".ckpt") or Path(source).expanduser().is_file()


def read_source_checkpoint(source: str) -> dict:
    path = Path(source).expanduser()
    if not path.is_file():
        raise UsageError(f"--model.init_from {source}: no such checkpoint: pass an existing .ckpt of a train.py run")
    checkpoint = read_checkpoint(path, mmap=True)
    if "state_dict" not in checkpoint or DATA_STATE not in checkpoint:
        raise UsageError(f"--model.init_from {source} is not a checkpoint of a train.py run: pass a .ckpt one wrote")
    return checkpoint


def source_model(source: str) -> tuple[dict, Tokenizer]:
    """The GPTConfig values (without dropout) of the source's model, and its tokenizer."""
    if not is_checkpoint(source):
        config = hf_config(source)
        return gpt_config_from_hf(config, source), tokenizer_from_hf_config(config)
    checkpoint = read_source_checkpoint(source)
    hparams = checkpoint["hyper_parameters"]
    if hparams.get("arch", "gpt") != "gpt":
        raise UsageError(f"--model.init_from {source} holds a {hparams['arch']} model: start from a GPT's checkpoint")
    values = {f.name: hparams.get(f.name, f.default) for f in fields(GPTConfig) if f.name != "dropout"}
    return values, tokenizer_from_state(checkpoint[DATA_STATE]["tokenizer"])


def init_from_hparams(source: str, hparams: Mapping[str, Any]) -> dict:
    """The model hyperparameters of a run that starts from the weights of source: their shape and vocabulary, with
    the run's block_size (at most their context) and dropout. Refuses, in one line, settings that contradict them: a
    value other than GPTConfig's default that differs from the weights'."""
    values, _ = source_model(source)
    if hparams.get("arch", "gpt") != "gpt":
        raise UsageError(f"--model.init_from {source} loads a GPT: drop --model.arch {hparams['arch']}")
    defaults = asdict(GPTConfig())
    for key, value in values.items():
        if key not in ("vocab_size", "block_size") and hparams[key] not in (defaults[key], value):
            raise UsageError(
                f"--model.{key} {hparams[key]} contradicts the weights of {source} ({key}={value}): "
                "drop it (the model takes the weights' shape)"
            )
    if hparams["block_size"] > values["block_size"]:
        raise UsageError(
            f"--data.block_size {hparams['block_size']} is longer than the context of {source} "
            f"({values['block_size']} positions): pass --data.block_size {values['block_size']} or less"
        )
    return {**values, "block_size": hparams["block_size"]}


def check_tokenizer(source: str, data_tokenizer: Tokenizer) -> None:
    """The data must be tokenized as the source's weights read tokens (the chat template aside, which adds ids)."""
    _, tokenizer = source_model(source)
    ours, theirs = (getattr(t, "base", t) for t in (data_tokenizer, tokenizer))
    if ours.state_dict() != theirs.state_dict():
        fix = theirs.name if theirs.name != "char" and not is_checkpoint(source) else f"{source} (or drop it)"
        raise UsageError(
            f"--model.init_from {source}: its weights read the tokens of the {theirs.name} tokenizer, not those of the "
            f"{ours.name} tokenizer of this data: pass --data.tokenizer {fix}"
        )


def init_from_state(source: str, block_size: int, vocab_size: int, needed: int) -> dict[str, torch.Tensor]:
    """The source's weights for a model of block_size positions (cropped) and vocab_size rows, of which the data's
    tokenizer uses the first `needed`: rows it adds, and rows the source lacks, start at the mean (see above)."""
    if is_checkpoint(source):
        checkpoint = read_source_checkpoint(source)
        state = {k.removeprefix("model."): v for k, v in checkpoint["state_dict"].items() if k.startswith("model.")}
        if "transformer.wpe.weight" in state:
            state["transformer.wpe.weight"] = state["transformer.wpe.weight"][:block_size]
    else:
        state = gpt_state_from_hf(hf_weights(source), block_size)
    real = source_model(source)[1].vocab_size
    for name in ("transformer.wte.weight", "lm_head.weight"):
        rows = state[name]
        grown = rows[:real].mean(0, keepdim=True).repeat(vocab_size, 1)
        grown[:real] = rows[:real]
        grown[needed : len(rows)] = rows[needed:vocab_size]  # padding rows the source has keep its weights
        state[name] = grown
    return state
