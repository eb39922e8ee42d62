"""A trained model and its tokenizer, from wherever it is: a train.py checkpoint (read without Lightning and without
unpickling code), a Hugging Face GPT-2 folder or a GPT-2 on the hub. sample.py, serve.py, export and evaluation
all start here."""

from pathlib import Path

import torch

from tinygpt_pl.bigram import BigramLanguageModel
from tinygpt_pl.data.datamodule import TextDataModule
from tinygpt_pl.data.tokenizer import Tokenizer, tokenizer_from_state
from tinygpt_pl.errors import UsageError
from tinygpt_pl.hf.convert import gpt_config_from_hf, gpt_state_from_hf, hf_config, hf_weights
from tinygpt_pl.hf.tokenizer import tokenizer_from_hf_config
from tinygpt_pl.model import GPT, GPTConfig
from tinygpt_pl.training.checkpoint import read_checkpoint
from tinygpt_pl.training.module import build_model


def load_checkpoint(
    path: str | Path, map_location: str | torch.device = "cpu"
) -> tuple[GPT | BigramLanguageModel, Tokenizer]:
    """The model (in eval mode: the GPT, or the lecture's bigram model) and the tokenizer that a training checkpoint
    holds."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"checkpoint {str(path)!r} does not exist: pass --ckpt_path to a .ckpt file of a run")
    checkpoint = read_checkpoint(path, map_location)
    if "state_dict" not in checkpoint or TextDataModule.__qualname__ not in checkpoint:
        raise UsageError(f"{str(path)!r} is not a tinygpt_pl training checkpoint: pass a .ckpt written by train.py")
    hparams = checkpoint["hyper_parameters"]
    model = build_model(hparams)
    prefix = "model."
    state = {k.removeprefix(prefix): v for k, v in checkpoint["state_dict"].items() if k.startswith(prefix)}
    model.load_state_dict(state)
    tokenizer = tokenizer_from_state(checkpoint[TextDataModule.__qualname__]["tokenizer"])
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
