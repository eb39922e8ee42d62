"""Export a model to Hugging Face transformers: python -m tinygpt_pl.export --ckpt_path CKPT --out DIR

DIR is what transformers' GPT2LMHeadModel.save_pretrained and a tokenizer's save_pretrained write, so that
AutoModelForCausalLM.from_pretrained(DIR), AutoTokenizer.from_pretrained(DIR) and pipeline("text-generation") load
it as it is. The char tokenizer becomes a `tokenizers` tokenizer.json with one token per character.
"""

from pathlib import Path

import torch
from jsonargparse import auto_cli

from tinygpt_pl.errors import UsageError, exit_on_bad_input
from tinygpt_pl.hf.convert import TOKENIZER_KEY, hf_config_from_gpt, hf_state_from_gpt, import_hf
from tinygpt_pl.hf.tokenizer import hf_tokenizer
from tinygpt_pl.load import load_model
from tinygpt_pl.model import GPT


def export(*, ckpt_path: str, out: str) -> None:
    """Write a Hugging Face transformers folder (GPT-2 architecture) of a model and its tokenizer.

    Args:
        ckpt_path: a .ckpt written by train.py (or anything sample.py loads: a Hugging Face folder, a hub name).
        out: the folder to write: new or empty, never overwritten.
    """
    out_dir = Path(out).expanduser()
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise UsageError(f"--out {out} is not an empty folder: pass a new or empty folder (nothing is overwritten)")
    model, tokenizer = load_model(ckpt_path)
    if not isinstance(model, GPT):
        raise UsageError(f"{ckpt_path} holds a {type(model).__name__}, not a GPT: only GPTs export to GPT-2")
    values = hf_config_from_gpt(model.config, tokenizer.vocab_size)
    hf_tok = hf_tokenizer(tokenizer)
    transformers = import_hf("transformers")
    config = transformers.GPT2Config(**values, bos_token_id=tokenizer.eot_id, eos_token_id=tokenizer.eot_id,
                                     **{TOKENIZER_KEY: tokenizer.state_dict()})  # fmt: skip
    with torch.device("meta"):  # no time spent initialising weights that are replaced at once
        hf_model = transformers.GPT2LMHeadModel(config)
    hf_model.load_state_dict(hf_state_from_gpt(model, tokenizer.vocab_size), assign=True)
    hf_model.tie_weights()
    hf_model.save_pretrained(out_dir)
    hf_tok.save_pretrained(out_dir)
    print(f"wrote {out_dir}: load it with transformers' AutoModelForCausalLM/AutoTokenizer.from_pretrained")


@exit_on_bad_input
def main(args: list[str] | None = None) -> None:
    auto_cli(export, args=args, exit_on_error=False)


if __name__ == "__main__":
    main()
