"""Loading a trained GPT from a Lightning checkpoint alone, without Lightning and without unpickling code."""

from dataclasses import fields
from pathlib import Path

import torch

from tinygpt_pl.data import TextDataModule
from tinygpt_pl.errors import UsageError
from tinygpt_pl.model import GPT, GPTConfig
from tinygpt_pl.tokenizer import Tokenizer, tokenizer_from_state


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> tuple[GPT, Tokenizer]:
    """The GPT (in eval mode) and the tokenizer that a training checkpoint holds.

    Loads with weights_only=True: tensors and plain containers only, so a checkpoint cannot run code.
    """
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"checkpoint {str(path)!r} does not exist: pass --ckpt_path to a .ckpt file of a run")
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        raise UsageError(
            f"{str(path)!r} is not a readable checkpoint ({type(e).__name__}): pass a .ckpt written by train.py"
        ) from None
    if "state_dict" not in checkpoint or TextDataModule.__qualname__ not in checkpoint:
        raise UsageError(f"{str(path)!r} is not a tinygpt_pl training checkpoint: pass a .ckpt written by train.py")
    hparams = checkpoint["hyper_parameters"]
    model = GPT(GPTConfig(**{f.name: hparams[f.name] for f in fields(GPTConfig)}))
    prefix = "model."
    state = {k.removeprefix(prefix): v for k, v in checkpoint["state_dict"].items() if k.startswith(prefix)}
    model.load_state_dict(state)
    tokenizer = tokenizer_from_state(checkpoint[TextDataModule.__qualname__]["tokenizer"])
    return model.eval(), tokenizer
