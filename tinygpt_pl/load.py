"""A trained model and its tokenizer, from wherever it is: a train.py checkpoint (read without Lightning and without
unpickling code), a Hugging Face GPT-2 folder or a GPT-2 on the hub. sample.py, serve.py, export and evaluation
all start here."""

from collections.abc import Mapping
from dataclasses import fields
from pathlib import Path
from typing import Any

import torch

from tinygpt_pl.bigram import BigramConfig, BigramLanguageModel
from tinygpt_pl.data.tokenizer import Tokenizer, tokenizer_from_state
from tinygpt_pl.errors import UsageError
from tinygpt_pl.hf.convert import gpt_config_from_hf, gpt_state_from_hf, hf_config, hf_weights
from tinygpt_pl.hf.tokenizer import tokenizer_from_hf_config
from tinygpt_pl.model import GPT, GPTConfig

DATA_STATE = "TextDataModule"  # a checkpoint's key for the DataModule's state (Lightning's: the class's name)


def read_checkpoint(path: str | Path, map_location: str | torch.device = "cpu", mmap: bool = False) -> dict:
    """The checkpoint file's contents, loaded with weights_only=True: tensors and plain containers only, so a
    checkpoint cannot run code. mmap: leave the tensors on disk until they are read."""
    try:
        return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except Exception as e:
        raise UsageError(
            f"{str(path)!r} is not a readable checkpoint ({type(e).__name__}): pass a .ckpt written by train.py"
        ) from None


def build_model(hparams: Mapping[str, Any]) -> GPT | BigramLanguageModel:
    """The model that GPTModule's hyperparameters describe (training/module.py), for training and for
    load_checkpoint.

    init "pytorch" gives each layer PyTorch's own initialisation (N(0, 1) embeddings, Linear weights and biases
    uniform in +-1/sqrt(fan_in)), as the lecture's stages 1-5 had it: their val losses depend on it. (The GPT's
    N(0, 0.02) came with the lecture's final model; from it, stage 1 ends its 5000 steps at 2.54 instead of 2.40.)
    """
    if hparams.get("arch") == "bigram":
        return BigramLanguageModel(BigramConfig(hparams["vocab_size"], hparams["block_size"]))
    # options newer than a checkpoint keep their defaults, which built the model it holds
    model = GPT(GPTConfig(**{f.name: hparams[f.name] for f in fields(GPTConfig) if f.name in hparams}))
    if hparams.get("init") == "pytorch":
        for module in model.modules():
            if hasattr(module, "reset_parameters"):
                module.reset_parameters()
    return model


def load_checkpoint(
    path: str | Path, map_location: str | torch.device = "cpu"
) -> tuple[GPT | BigramLanguageModel, Tokenizer]:
    """The model (in eval mode: the GPT, or the lecture's bigram model) and the tokenizer that a training checkpoint
    holds."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"checkpoint {str(path)!r} does not exist: pass --ckpt_path to a .ckpt file of a run")
    checkpoint = read_checkpoint(path, map_location)
    if "state_dict" not in checkpoint or DATA_STATE not in checkpoint:
        raise UsageError(f"{str(path)!r} is not a tinygpt_pl training checkpoint: pass a .ckpt written by train.py")
    hparams = checkpoint["hyper_parameters"]
    model = build_model(hparams)
    prefix = "model."
    state = {k.removeprefix(prefix): v for k, v in checkpoint["state_dict"].items() if k.startswith(prefix)}
    model.load_state_dict(state)
    tokenizer = tokenizer_from_state(checkpoint[DATA_STATE]["tokenizer"])
    return model.eval(), tokenizer


def load_hf(source: str, device: str = "cpu") -> tuple[GPT, Tokenizer]:
    """The GPT (in eval mode) and tokenizer of a Hugging Face GPT-2: a save_pretrained folder or a hub name."""
    config = hf_config(source)
    values = gpt_config_from_hf(config, source)
    tokenizer = tokenizer_from_hf_config(config)
    if values["vocab_size"] < tokenizer.vocab_size:
        raise UsageError(
            f"{source} has {values['vocab_size']} token embeddings, fewer than the {tokenizer.vocab_size} of its "
            f"tokenizer ({tokenizer.name}): pass a GPT-2 model with GPT-2's vocabulary"
        )
    model = GPT(GPTConfig(**values, dropout=0.0))
    model.load_state_dict(gpt_state_from_hf(hf_weights(source), values["block_size"]))
    return model.to(device).eval(), tokenizer


def load_model(source: str, device: str = "cpu") -> tuple[GPT | BigramLanguageModel, Tokenizer]:
    """The GPT (in eval mode, on device) and tokenizer of source: a train.py checkpoint (.ckpt file), a Hugging Face
    GPT-2 folder (what save_pretrained or tinygpt_pl.export wrote), or a GPT-2 on the hub (gpt2 ... gpt2-xl)."""
    if Path(source).expanduser().is_file() or source.endswith(".ckpt"):
        model, tokenizer = load_checkpoint(Path(source).expanduser(), map_location=device)
        return model.to(device), tokenizer
    return load_hf(source, device)
