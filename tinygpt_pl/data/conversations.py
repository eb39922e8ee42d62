"""Conversations as training data (--data.format chat): rendered by the chat template once into the token cache, served
as one conversation per row, padded.

Each split is three files beside a JSON sidecar (cache.py's, written last): `<split>.bin`, the conversations' ids end to
end; `<split>.mask.bin`, one byte per id, 1 where the id is trained on (the assistant's words and end tokens); and
`<split>.offsets.bin`, where each conversation starts (int64, one more than there are conversations). A training
example is one conversation, cut at block_size + 1 tokens at a message boundary when it is longer (counted), padded
with targets -1; its targets are -1 wherever the mask says the id is not the assistant's. So no conversation attends to
another, and validation covers each held-out conversation's assistant tokens exactly once.

Rows that are no conversation with an assistant message are skipped and counted, or refused with --data.strict.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import tempfile
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pyarrow.compute as pc
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from tinygpt_pl.data.cache import (
    check_token_file,
    damaged,
    open_tokens,
    read_sidecar,
    sha256_of,
    sidecar_path,
    token_dtype,
    write_tokens,
)
from tinygpt_pl.data.chat import BadConversation, ChatTokenizer
from tinygpt_pl.data.tokenizer import SENTENCEPIECE, Tokenizer, get_tokenizer
from tinygpt_pl.errors import UsageError

if TYPE_CHECKING:
    from datasets import Dataset

MESSAGES = "messages"  # the column of conversations, as Hugging Face's chat datasets name it
TRUNCATED = "truncated"


def chat_base_tokenizer(name: str) -> Tokenizer:
    """The tokenizer named by --data.tokenizer that the chat template extends: a BPE by name or a SentencePiece file
    (a char vocabulary, or a SentencePiece model to train, comes from a base model's checkpoint instead)."""
    if name in ("char", SENTENCEPIECE):
        raise UsageError(
            f"--data.format chat with --data.tokenizer {name}: the {name} vocabulary is learnt from a text corpus: "
            "pass --model.init_from the base model's checkpoint (its tokenizer comes with it), or a BPE tokenizer"
        )
    return get_tokenizer(name)


def render_batch(batch: dict, column: str, tokenizer: ChatTokenizer, max_tokens: int) -> dict:
    """The rows' ids, loss masks and status: "" (whole), "truncated", or why the row is skipped."""
    out = {"ids": [], "mask": [], "status": []}
    for messages in batch[column]:
        try:
            ids, mask, truncated = tokenizer.render(messages, max_tokens)
            status = TRUNCATED if truncated else ""
        except BadConversation as e:
            ids, mask, status = [], [], str(e)
        out["ids"].append(ids)
        out["mask"].append(mask)
        out["status"].append(status)
    return out


def tokenize_conversations(dataset: Dataset, column: str, tokenizer: ChatTokenizer, block_size: int, strict: bool,
                           out: Path, meta: dict, num_proc: int) -> None:  # fmt: skip
    """Render the dataset's conversations into out (ids), its mask and offsets files and sidecar; report the rows
    skipped (refused when strict: then nothing is written) and the conversations truncated to block_size + 1 tokens."""
    dtype = token_dtype(tokenizer.vocab_size)
    work = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}@{socket.gethostname()}@{os.getpid()}@"))
    try:
        rendered = dataset.map(
            render_batch,
            batched=True,
            fn_kwargs={"column": column, "tokenizer": tokenizer, "max_tokens": block_size + 1},
            num_proc=min(num_proc, len(dataset)) if num_proc > 1 else None,
            remove_columns=dataset.column_names,
            cache_file_name=str(work / "rendered.arrow"),
            new_fingerprint=hashlib.sha256(f"{out.parent.name}-{out.name}".encode()).hexdigest()[:32],
            desc=f"rendering {out.stem} conversations",
        )
        statuses = rendered.data.column("status").to_pylist()
        skipped = Counter(s for s in statuses if s not in ("", TRUNCATED))
        if skipped and strict:
            row = next(i for i, s in enumerate(statuses) if s not in ("", TRUNCATED))
            raise UsageError(
                f"row {row} of {meta['source']} ({out.stem}) is not a conversation to train on: {statuses[row]}; "
                f"{skipped.total()} rows like it: fix them, or drop --data.strict to skip them"
            )
        kept = len(statuses) - skipped.total()
        if kept == 0:
            raise UsageError(f"{meta['source']} has no conversation to train on ({describe(skipped)}): fix the data")
        if skipped:
            rank_zero_warn(f"{out.stem}: skipped {skipped.total()} of {len(statuses)} rows ({describe(skipped)})")
        truncated = statuses.count(TRUNCATED)
        rank_zero_info(f"{out.stem}: {kept} conversations, {truncated} cut at block_size + 1 = {block_size + 1} tokens")
        lengths = []
        with open(work / out.name, "wb") as ids_file, open(work / "mask.bin", "wb") as mask_file:
            for batch in rendered.data.to_batches():
                ids, mask = batch.column("ids"), batch.column("mask")
                write_tokens(ids_file, ids.values.to_numpy(zero_copy_only=False), dtype)
                mask_file.write(mask.values.to_numpy(zero_copy_only=False).astype(np.uint8).tobytes())
                lengths.append(pc.list_value_length(ids).to_numpy(zero_copy_only=False))
        lengths = np.concatenate(lengths)
        offsets = np.concatenate([[0], np.cumsum(lengths[lengths > 0])]).astype(np.int64)
        offsets.tofile(work / "offsets.bin")
        os.replace(work / "mask.bin", mask_path(out))
        os.replace(work / "offsets.bin", offsets_path(out))
        os.replace(work / out.name, out)
        sidecar = {**meta, "tokens": int(offsets[-1]), "dtype": dtype.name, "sha256": sha256_of(out),
                   "mtime_ns": out.stat().st_mtime_ns, "conversations": kept, "truncated": truncated,
                   "skipped": dict(skipped)}  # fmt: skip
        (work / "meta.json").write_text(json.dumps(sidecar, indent=1))
        os.replace(work / "meta.json", sidecar_path(out))
    finally:
        shutil.rmtree(work, ignore_errors=True)


def describe(skipped: Counter) -> str:
    return ", ".join(f"{n} {why}" for why, n in skipped.most_common())


def mask_path(token_file: Path) -> Path:
    return token_file.with_suffix(".mask.bin")


def offsets_path(token_file: Path) -> Path:
    return token_file.with_suffix(".offsets.bin")


class Conversations:
    """The conversations of a split in the cache (memory-mapped): ids, loss mask and offsets."""

    def __init__(self, ids: np.ndarray, mask: np.ndarray, offsets: np.ndarray) -> None:
        self.ids, self.mask, self.offsets = ids, mask, offsets

    @classmethod
    def open(cls, token_file: Path) -> Conversations:
        """The split's files, checked against the sizes its sidecar records."""
        ids = open_tokens(token_file)
        meta = read_sidecar(token_file) or {}
        check_conversation_files(token_file, meta)
        mask = np.memmap(mask_path(token_file), dtype=np.uint8, mode="r")
        return cls(ids, mask, np.fromfile(offsets_path(token_file), dtype=np.int64))

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def select(self, first: int, stop: int) -> Conversations:
        """Conversations first..stop-1 (a held-out split from the end of the training one)."""
        return Conversations(self.ids, self.mask, self.offsets[first : stop + 1])

    def example(self, i: int, block_size: int) -> tuple[np.ndarray, np.ndarray]:
        """(x, y) of conversation i, padded to block_size: y is -1 where the loss does not count."""
        start, end = self.offsets[i], self.offsets[i + 1]
        ids = self.ids[start:end].astype(np.int64)
        x, y = np.zeros(block_size, np.int64), np.full(block_size, -1, np.int64)
        n = len(ids) - 1
        x[:n] = ids[:-1]
        y[:n] = np.where(self.mask[start + 1 : end] > 0, ids[1:], -1)
        return x, y

    def packed(self, indices: list[int], block_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(x, y, segments) of conversations laid end to end in one row (at most block_size + 1 tokens), padded:
        segments numbers each position's conversation (the padding its own), for the model's document mask."""
        ids = np.concatenate([self.ids[self.offsets[i] : self.offsets[i + 1]] for i in indices]).astype(np.int64)
        mask = np.concatenate([self.mask[self.offsets[i] : self.offsets[i + 1]] for i in indices]) > 0
        lengths = [self.offsets[i + 1] - self.offsets[i] for i in indices]
        x, y = np.zeros(block_size, np.int64), np.full(block_size, -1, np.int64)
        n = min(len(ids) - 1, block_size)
        x[:n] = ids[:n]
        y[:n] = np.where(mask[1 : n + 1], ids[1 : n + 1], -1)
        segments = np.full(block_size, len(indices), np.int64)
        segments[: min(sum(lengths), block_size)] = np.repeat(np.arange(len(indices)), lengths)[:block_size]
        return x, y, segments

    def batch(self, indices: np.ndarray, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = zip(*(self.example(i, block_size) for i in indices), strict=True)
        return torch.from_numpy(np.stack(x)), torch.from_numpy(np.stack(y))

    def targets_per_byte(self, byte_lengths: np.ndarray) -> float:
        """The trained targets per UTF-8 byte of their text (for val/bpb)."""
        ids = self.ids[self.offsets[0] : self.offsets[-1]]
        trained = ids[1:][self.mask[self.offsets[0] + 1 : self.offsets[-1]] > 0]
        return len(trained) / max(1, int(byte_lengths[trained].sum()))


def check_conversation_files(token_file: Path, meta: dict) -> None:
    check_token_file(token_file, meta, full=False)
    if "conversations" not in meta:
        raise damaged(token_file, "its sidecar lacks the conversation count")
    expected = {mask_path(token_file): meta["tokens"], offsets_path(token_file): 8 * (meta["conversations"] + 1)}
    for path, size in expected.items():
        if not path.is_file() or path.stat().st_size != size:
            raise damaged(token_file, f"{path.name} is missing or not {size} bytes")


def open_conversations(token_dir: Path, splits: list[str], val_fraction: float) -> tuple[Conversations, Conversations]:
    """(train, val) conversations of a finished cache: the source's val split, else the last val_fraction of train."""
    train = Conversations.open(token_dir / "train.bin")
    if "val" in splits:
        return train, Conversations.open(token_dir / "val.bin")
    n_val = max(1, round(len(train) * val_fraction))
    if len(train) - n_val < 1:
        raise UsageError(
            f"{len(train)} conversation(s) are too few to hold out val_fraction {val_fraction} of them and train on "
            "the rest: pass more conversations"
        )
    return train.select(0, len(train) - n_val), train.select(len(train) - n_val, len(train))


def chat_train_batch(conversations: Conversations, block_size: int, batch_size: int, seed: int, step: int, part: int,
                     num_parts: int) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """Part `part` of the global batch of step `step`: batch_size conversations drawn by (seed, step) alone, as
    datamodule.train_batch draws blocks of text."""
    rng = np.random.default_rng([seed, step])
    indices = rng.integers(0, len(conversations), size=num_parts * batch_size)
    return conversations.batch(indices[part * batch_size : (part + 1) * batch_size], block_size)


PACKING_DRAW = 256  # conversation indices drawn at a time: a constant, so that the stream is the same for any split


def packed_chat_train_batch(conversations: Conversations, block_size: int, batch_size: int, seed: int, step: int,
                            part: int, num_parts: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """Part `part` of the global batch of step `step`, packed (--data.packing): rows of block_size + 1 tokens, each
    filled with whole conversations in the order (seed, step) draws them until the next one does not fit (it starts
    the next row), the rest padding; with the segments that keep each conversation to itself."""
    rng = np.random.default_rng([seed, step])
    lengths = np.diff(conversations.offsets)
    rows: list[list[int]] = [[]]
    used = 0
    while len(rows) <= (part + 1) * batch_size:  # until the row after this part's last one has begun
        for i in rng.integers(0, len(conversations), size=PACKING_DRAW):
            if used + lengths[i] > block_size + 1:
                rows.append([])
                used = 0
            rows[-1].append(int(i))
            used += lengths[i]
    x, y, segments = zip(*(conversations.packed(row, block_size) for row in rows[part * batch_size :][:batch_size]),
                         strict=True)  # fmt: skip
    return torch.from_numpy(np.stack(x)), torch.from_numpy(np.stack(y)), torch.from_numpy(np.stack(segments))


class ChatValBatchMaker:
    """Batch j of this rank's share (every world_size-th conversation) of the held-out conversations."""

    def __init__(self, conversations: Conversations, block_size: int, batch_size: int, world_size: int,
                 rank: int) -> None:  # fmt: skip
        self.conversations, self.block_size, self.batch_size = conversations, block_size, batch_size
        self.indices = np.arange(rank, len(conversations), world_size)

    def __len__(self) -> int:
        return -(-len(self.indices) // self.batch_size)

    def __call__(self, j: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.conversations.batch(self.indices[j * self.batch_size : (j + 1) * self.batch_size], self.block_size)
