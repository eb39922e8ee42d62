"""The LightningDataModule: a text corpus (or conversations, data/conversations.py), tokenized once into the cache,
served as blocks of tokens (data/batches.py) that are a pure function of (seed, optimizer step), so that a resumed
run sees what an uninterrupted one would and val/loss is exact over the whole split."""

import functools
import hashlib
import json
import os
import sys
import tempfile
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import lightning as L
import numpy as np
import torch

from tinygpt_pl.data.batches import (
    EveryItemInOrder,
    IndexedBatches,
    StepLoader,
    TrainBatchMaker,
    ValBatchMaker,
    train_batch,
)
from tinygpt_pl.data.cache import (
    cached_sentencepiece,
    check_token_file,
    open_tokens,
    read_sidecar,
    sha256_of,
    token_dtype,
    tokenize_to_file,
    training_text,
)
from tinygpt_pl.data.chat import ChatTokenizer
from tinygpt_pl.data.conversations import (
    MESSAGES,
    ChatValBatchMaker,
    Conversations,
    chat_base_tokenizer,
    chat_train_batch,
    open_conversations,
    packed_chat_train_batch,
    tokenize_conversations,
)
from tinygpt_pl.data.sources import load_hub, load_local, local_files, source_key
from tinygpt_pl.data.tokenizer import (
    SENTENCEPIECE,
    SENTENCEPIECE_OPTIONS,
    TOKENIZER_NAMES,
    CharTokenizer,
    SentencePieceTokenizer,
    get_tokenizer,
    padded_vocab_size,
    tokenizer_from_state,
    train_sentencepiece,
)
from tinygpt_pl.errors import UsageError
from tinygpt_pl.training.init_from import source_model
from tinygpt_pl.training.safety.signals import ignore_signals

DEFAULT_SEED = 1337
TINY_SHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
TINY_SHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"


def default_cache_dir() -> Path:
    """$TINYGPT_PL_CACHE, else $XDG_CACHE_HOME/tinygpt_pl, else ~/.cache/tinygpt_pl."""
    if "TINYGPT_PL_CACHE" in os.environ:
        return Path(os.environ["TINYGPT_PL_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "tinygpt_pl"


def fetch_tiny_shakespeare(cache_dir: Path) -> Path:
    """The lecture's corpus from its canonical URL, downloaded once into cache_dir and checked by sha256."""
    target = cache_dir / "tinyshakespeare.txt"
    if target.exists() and sha256_of(target) == TINY_SHAKESPEARE_SHA256:
        return target
    cache_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=cache_dir, prefix=".tinyshakespeare-", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as f, urllib.request.urlopen(TINY_SHAKESPEARE_URL, timeout=30) as resp:
            f.write(resp.read())
        if sha256_of(Path(tmp)) != TINY_SHAKESPEARE_SHA256:
            raise UsageError(
                f"the download of {TINY_SHAKESPEARE_URL} does not match its sha256: "
                "try again, or pass --data.path with a local copy"
            )
        os.replace(tmp, target)  # atomic: a half-written download is never taken for the corpus
    except OSError as e:
        raise UsageError(
            f"could not download tiny Shakespeare from {TINY_SHAKESPEARE_URL} ({e}): "
            "pass --data.path FILE with a local text file"
        ) from e
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return target


def read_text(path: Path) -> str:
    if not path.is_file():
        raise UsageError(f"data file {str(path)!r} does not exist: pass --data.path to an existing text file")
    raw = path.read_bytes()
    if not raw:
        raise UsageError(f"data file {str(path)!r} is empty: pass --data.path to a file with text in it")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UsageError(
            f"data file {str(path)!r} is not UTF-8 text (byte {raw[e.start]:#04x} at offset {e.start}): "
            "convert it to UTF-8"
        ) from None


def split_sizes(n: int, val_fraction: float, val_max_tokens: int | None) -> tuple[int, int]:
    """(train, val) token counts of a corpus of n tokens: its last val_fraction held out, at most val_max_tokens."""
    n_val = n - int(n * (1 - val_fraction))
    if val_max_tokens is not None:
        n_val = min(n_val, val_max_tokens)
    return n - n_val, n_val


def check_enough(n_train: int, n_val: int, block_size: int, name: str) -> None:
    if min(n_train, n_val) < block_size + 1:
        raise UsageError(
            f"{name} has {n_train} train and {n_val} val tokens, too few for one block of "
            f"{block_size + 1}: use a longer corpus or a smaller --data.block_size"
        )


class TextDataModule(L.LightningDataModule):
    """A text corpus, tokenized, split into train and val tokens.

    With the char tokenizer (the lecture's), one text file is read and tokenized in memory, and its last
    val_fraction validates. With a BPE tokenizer, prepare_data tokenizes the source once into a cache of flat
    token files, which setup memory-maps on every rank; validation is the source's own validation split when it
    has one, else its last val_fraction of tokens.

    Args:
        path: a text file (char); for BPE also a folder or glob of .txt, .jsonl/.json or .parquet files.
            Default: the lecture's tiny Shakespeare, downloaded into the cache.
        block_size: tokens per training example (the model's context length).
        batch_size: sequences per micro-batch on each device.
        global_batch_size: sequences per optimizer step over all devices; the CLI derives the gradient accumulation
            from it and the device count (None: devices x batch_size x trainer.accumulate_grad_batches).
        val_fraction: the share of the corpus, from its end, held out for validation.
        seed: fixes which blocks every training step sees; default the run's --seed_everything (else 1337).
        num_workers: DataLoader worker processes per device.
        cache_dir: where downloads and token files go; default $TINYGPT_PL_CACHE or ~/.cache/tinygpt_pl.
        tokenizer: char, gpt2, r50k_base, cl100k_base or o200k_base; sentencepiece: a SentencePiece model trained on
            the training split, once (the cache keeps it by source and settings); a SentencePiece .model file; or a
            train.py checkpoint's (path/to/last.ckpt; --model.init_from a checkpoint sets it).
        tokenizer_vocab_size: the pieces of the trained SentencePiece model (default 1024).
        tokenizer_model_type: the trained SentencePiece model's algorithm, bpe (default) or unigram.
        text_column: the column of .jsonl/.json/.parquet files or hub datasets that holds the text (chat: the
            conversations, default messages).
        hf_path, hf_name, split: a hub dataset, its config and the split to train on (instead of path).
        val_max_tokens: at most this many val tokens (validation passes stay short on huge corpora).
        num_proc: processes that tokenize; default all CPUs.
        format: text, or chat: rows with a messages list of {role, content} (Hugging Face's chat format), rendered by
            the chat template (data/chat.py); the loss is on the assistant's messages only (data/conversations.py).
        strict: chat: refuse, in one line, a row that is no conversation with an assistant message (default: skip
            and count it).
        packing: chat: training rows hold as many whole conversations as fit, each attending only to itself (a
            document mask, positions from 0), instead of one conversation padded to block_size.
    """

    def __init__(
        self,
        path: str | None = None,
        block_size: int = 256,
        batch_size: int = 64,
        global_batch_size: int | None = None,
        val_fraction: float = 0.1,
        seed: int | None = None,
        num_workers: int = 0,
        cache_dir: str | None = None,
        tokenizer: str = "char",
        tokenizer_vocab_size: int | None = None,
        tokenizer_model_type: Literal["bpe", "unigram"] | None = None,
        text_column: str = "text",
        hf_path: str | None = None,
        hf_name: str | None = None,
        split: str = "train",
        val_max_tokens: int | None = None,
        num_proc: int | None = None,
        format: Literal["text", "chat"] = "text",
        strict: bool = False,
        packing: bool = False,
    ) -> None:
        super().__init__()
        if block_size < 1 or batch_size < 1:
            raise UsageError(f"block_size and batch_size must be >= 1, got {block_size} and {batch_size}")
        if not 0.0 < val_fraction < 1.0:
            raise UsageError(f"val_fraction must be between 0 and 1, got {val_fraction}")
        if val_max_tokens is not None and val_max_tokens < 2:
            raise UsageError(f"val_max_tokens must be >= 2 (or null for no cap), got {val_max_tokens}")
        if path and hf_path:
            raise UsageError("both --data.path and --data.hf_path are set: pass local files or a hub dataset")
        if tokenizer != SENTENCEPIECE and (tokenizer_vocab_size, tokenizer_model_type) != (None, None):
            raise UsageError(
                f"--data.tokenizer_vocab_size and --data.tokenizer_model_type choose the model that --data.tokenizer "
                f"{SENTENCEPIECE} trains, and the tokenizer is {tokenizer}: drop them, or train a SentencePiece model"
            )
        self.block_size, self.batch_size, self.val_fraction = block_size, batch_size, val_fraction
        self.global_batch_size = global_batch_size
        self.seed = DEFAULT_SEED if seed is None else seed
        self.num_workers, self.val_max_tokens = num_workers, val_max_tokens
        self.text_column, self.hf_path, self.hf_name, self.split = text_column, hf_path, hf_name, split
        self.num_proc = num_proc or os.cpu_count() or 1
        self.cache = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
        self.format, self.strict, self.packing = format, strict, packing
        self.train_tokens: np.ndarray | Conversations | None = None
        self.val_tokens: np.ndarray | Conversations | None = None
        given = source_model(tokenizer)[1] if tokenizer.endswith(".ckpt") else None  # --model.init_from's
        if packing and format != "chat":
            raise UsageError("--data.packing packs conversations: it needs --data.format chat")
        if format == "chat":
            self.tokenizer = ChatTokenizer(given or chat_base_tokenizer(tokenizer))
            if not (path or hf_path):
                raise UsageError("--data.format chat needs conversations: pass --data.path or --data.hf_path")
            self.files = None if hf_path else local_files(path)
            self.text_column = MESSAGES if text_column == "text" else text_column
            self.source, self.source_digest = source_key(self.files, hf_path, hf_name, split, self.text_column)
            settings = json.dumps([self.tokenizer.state_dict(), block_size], default=repr)
            name = f"{self.tokenizer.name}-{hashlib.sha256(settings.encode()).hexdigest()[:16]}"
            self.token_dir = self.cache / "chat" / f"{name}-{self.source_digest}"
        elif tokenizer == "char" or isinstance(given, CharTokenizer):
            if hf_path:
                raise UsageError("the char tokenizer reads one text file: pass --data.path, or a BPE --data.tokenizer")
            self.path = Path(path).expanduser() if path else fetch_tiny_shakespeare(self.cache)
            self.text = read_text(self.path)
            self.tokenizer = getattr(given, "base", given) or CharTokenizer.from_text(self.text)
            check_enough(*split_sizes(len(self.text), val_fraction, val_max_tokens), block_size, repr(str(self.path)))
            self.token_dir = None
        else:
            self.files = None if hf_path else local_files(path or str(fetch_tiny_shakespeare(self.cache)))
            self.source, self.source_digest = source_key(self.files, hf_path, hf_name, split, text_column)
            if tokenizer == SENTENCEPIECE:
                self.tokenizer = self.trained_sentencepiece(tokenizer_vocab_size or 1024, tokenizer_model_type or "bpe")
            else:
                self.tokenizer = getattr(given, "base", given) or get_tokenizer(tokenizer)
            name = self.tokenizer.name
            name = name if name in TOKENIZER_NAMES else f"{SENTENCEPIECE}-{self.tokenizer.digest}"
            self.token_dir = self.cache / "tokens" / f"{name}-{self.source_digest}"

    @property
    def vocab_size(self) -> int:
        """The model's vocabulary: BPE vocabularies padded to a multiple of 64 for speed; the char one as it is
        (it is tiny, and the lecture's model has exactly its 65 characters)."""
        n = self.tokenizer.vocab_size
        return n if isinstance(getattr(self.tokenizer, "base", self.tokenizer), CharTokenizer) else padded_vocab_size(n)

    def describe(self) -> str:
        """The corpus in a few words: source, tokenizer, tokens in each split (after setup)."""
        source = self.path.name if self.token_dir is None else self.source
        return (f"{source} ({self.tokenizer.name} tokenizer, {self.tokenizer.vocab_size:,} tokens): "
                f"{len(self.train_tokens):,} train / {len(self.val_tokens):,} val tokens")  # fmt: skip

    def trained_sentencepiece(self, vocab_size: int, model_type: str) -> SentencePieceTokenizer:
        """The SentencePiece model of the source's training text (cache.training_text), trained once and kept in
        the cache by source, split and settings."""
        settings = [self.source_digest, self.val_fraction, vocab_size, model_type, SENTENCEPIECE_OPTIONS]
        digest = hashlib.sha256(json.dumps(settings).encode()).hexdigest()[:16]
        model_file = self.cache / "tokenizers" / f"{SENTENCEPIECE}-{model_type}-{vocab_size}-{digest}.model"

        def train() -> SentencePieceTokenizer:
            texts = training_text(self.load_splits(), self.text_column, self.val_fraction)
            return train_sentencepiece(texts, vocab_size, model_type)

        return cached_sentencepiece(model_file, train)

    def load_splits(self) -> dict:
        """The source's splits as HF datasets ("train", maybe "val")."""
        if self.files is None:
            return load_hub(self.hf_path, self.hf_name, self.split, self.text_column)
        return load_local(self.files, self.text_column, self.cache / "hf", self.source_digest)

    def prepare_data(self) -> None:
        """Tokenize the source into the cache, unless a finished, intact tokenization of it is there.
        Lightning runs this once per node, before setup."""
        if self.token_dir is None or self.cached_splits(full=True):
            return
        splits = self.load_splits()
        meta = {"source": self.source, "tokenizer": self.tokenizer.name, "has_val": "val" in splits}
        self.token_dir.mkdir(parents=True, exist_ok=True)
        for name in sorted(splits, reverse=True):  # train last: its sidecar marks the whole prepare finished
            if self.format == "chat":
                tokenize_conversations(splits[name], self.text_column, self.tokenizer, self.block_size, self.strict,
                                       self.token_dir / f"{name}.bin", meta, self.num_proc)  # fmt: skip
                continue
            tokenize_to_file(splits[name], self.text_column, self.tokenizer, self.token_dir / f"{name}.bin", meta,
                             self.num_proc)  # fmt: skip

    def cached_splits(self, full: bool) -> list[str]:
        """The splits ("train", maybe "val") of a finished tokenization in the cache, checked against their
        sidecars (sizes; content too when full); [] if there is none."""
        meta = read_sidecar(self.token_dir / "train.bin")
        if meta is None:
            return []
        splits = ["train", "val"] if meta.get("has_val") else ["train"]
        for name in splits:
            token_file = self.token_dir / f"{name}.bin"
            check_token_file(token_file, read_sidecar(token_file) or {}, full)
        return splits

    def setup(self, stage: str) -> None:
        if self.train_tokens is not None:
            return
        if self.token_dir is None:
            ids = np.array(self.tokenizer.encode(self.text), dtype=token_dtype(self.vocab_size))
            n_train, _ = split_sizes(len(ids), self.val_fraction, self.val_max_tokens)
            self.train_tokens, self.val_tokens = ids[:n_train], ids[n_train:]
            return
        splits = self.cached_splits(full=False)
        if not splits:
            raise UsageError(f"no tokenized corpus in {self.token_dir}: run prepare_data() before setup()")
        if self.format == "chat":
            self.train_tokens, self.val_tokens = open_conversations(self.token_dir, splits, self.val_fraction)
            return
        ids = open_tokens(self.token_dir / "train.bin")
        if "val" in splits:
            self.train_tokens, self.val_tokens = ids, open_tokens(self.token_dir / "val.bin")[: self.val_max_tokens]
        else:
            n_train, _ = split_sizes(len(ids), self.val_fraction, self.val_max_tokens)
            self.train_tokens, self.val_tokens = ids[:n_train], ids[n_train:]
        check_enough(len(self.train_tokens), len(self.val_tokens), self.block_size, self.source)

    @functools.cached_property
    def val_tokens_per_byte(self) -> float:
        """The val split's targets (every val token but the first) per UTF-8 byte of the text they stand for: val/bpb
        is val/loss times this over ln 2. Counted once, a piece at a time (the val split may be large, on disk)."""
        lengths = self.tokenizer.byte_lengths()
        if self.format == "chat":
            return self.val_tokens.targets_per_byte(lengths)
        targets = self.val_tokens[1:]
        piece = 1 << 24
        n_bytes = sum(int(lengths[targets[i : i + piece]].sum()) for i in range(0, len(targets), piece))
        return len(targets) / n_bytes

    def _loader(self, dataset: IndexedBatches) -> StepLoader:
        return StepLoader(
            dataset,
            batch_size=None,
            sampler=EveryItemInOrder(dataset),
            num_workers=self.num_workers,
            pin_memory=torch.cuda.is_available(),
            persistent_workers=self.num_workers > 0,
            worker_init_fn=ignore_signals,
        )

    def train_dataloader(self) -> StepLoader:
        trainer = self.trainer
        accumulate = trainer.accumulate_grad_batches
        maker = TrainBatchMaker(self.train_tokens, self.block_size, self.batch_size, self.seed, accumulate,
                                trainer.world_size, trainer.global_rank,
                                self.draw_train_batch())  # fmt: skip
        # Start where the (possibly resumed) run stands, so a resumed run sees what an uninterrupted one would.
        stop = trainer.max_steps * accumulate if trainer.max_steps > 0 else sys.maxsize
        return self._loader(IndexedBatches(maker, range(trainer.global_step * accumulate, stop)))

    def draw_train_batch(self) -> Callable:
        if self.format == "chat":
            return packed_chat_train_batch if self.packing else chat_train_batch
        return train_batch

    def val_dataloader(self) -> StepLoader:
        trainer = self.trainer
        make = ChatValBatchMaker if self.format == "chat" else ValBatchMaker
        maker = make(self.val_tokens, self.block_size, self.batch_size, trainer.world_size, trainer.global_rank)
        return self._loader(IndexedBatches(maker, range(len(maker))))

    def state_dict(self) -> dict:
        return {"tokenizer": self.tokenizer.state_dict()}

    def load_state_dict(self, state_dict: dict) -> None:
        saved = state_dict["tokenizer"]
        if tokenizer_from_state(saved).state_dict() != self.tokenizer.state_dict():
            raise UsageError(
                f"the checkpoint was trained with another tokenizer/vocabulary ({saved['name']}) than this run's "
                f"data ({self.tokenizer.name}): resume with the same --data settings as the run that wrote it"
            )
