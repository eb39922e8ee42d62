"""Tokenize a corpus once into a cache: one flat token file per split, plus a JSON sidecar that describes it.

The token file holds the ids end to end (uint16 when the vocabulary fits, else uint32); the sidecar records the
source, the tokenizer, the token count, the dtype, the file's sha256 and its modification time. Both are written
under a temporary name and renamed when complete, sidecar last, so an interrupted prepare leaves no sidecar and is
done again. Each tokenizing process appends its batches' tokens to a file of its own, and the files are joined in
order: memory does not grow with the corpus.

A SentencePiece tokenizer is trained once on the training text (training_text) and kept in the cache beside the
token files (cached_sentencepiece).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from tinygpt_pl.data.sources import DOCUMENT_END
from tinygpt_pl.data.tokenizer import SentencePieceTokenizer, Tokenizer
from tinygpt_pl.errors import UsageError

if TYPE_CHECKING:
    from datasets import Dataset

TOKENIZER_MAX_CHARS = 100_000_000  # of training text for SentencePiece, which holds it all in memory


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits (half the disk and page cache), else uint32."""
    return np.dtype(np.uint16 if vocab_size <= 2**16 else np.uint32)


def write_tokens(f: BinaryIO, ids: np.ndarray, dtype: np.dtype) -> None:
    """Append ids to the token file as dtype, refusing ids that the dtype cannot hold."""
    if len(ids) and ids.max() > np.iinfo(dtype).max:
        raise UsageError(
            f"the corpus has token id {int(ids.max())}, more than {dtype.name} holds: the tokenizer gives ids beyond "
            "its vocab_size; use another --data.tokenizer"
        )
    f.write(ids.astype(dtype, copy=False).tobytes())


def tokenize_to_file(dataset: Dataset, text_column: str, tokenizer: Tokenizer, out: Path, meta: dict,
                     num_proc: int) -> None:  # fmt: skip
    """Tokenize dataset[text_column] into the token file `out` (and its sidecar out.json), each document followed
    by the end-of-text token: every row is a document, unless a DOCUMENT_END column says which rows end one."""
    dtype = token_dtype(tokenizer.vocab_size)
    remove_abandoned_work(out)
    # each tokenizing process's token file and the one being assembled, named after this process, gone at the end
    work = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}@{socket.gethostname()}@{os.getpid()}@"))

    def encode(batch: pa.Table, rank: int | None) -> pa.Table:
        """Append the batch's ids, end-of-text tokens in place, to this process's token file. Each process takes
        one contiguous shard of the rows, in rank order, so the files end to end hold the corpus in order."""
        ids = tokenizer.encode_batch(batch.column(text_column).to_pylist())
        lengths = np.fromiter(map(len, ids), np.int64, len(ids))
        flat = np.concatenate(ids) if ids else np.zeros(0, np.uint32)
        ends = np.ones(len(ids), bool)
        if DOCUMENT_END in batch.column_names:
            ends = batch.column(DOCUMENT_END).to_numpy(zero_copy_only=False)
        with open(work / f"{rank or 0:05d}.bin", "ab") as f:
            write_tokens(f, np.insert(flat, np.cumsum(lengths)[ends], tokenizer.eot_id), dtype)
        return pa.table({})

    try:
        dataset.with_format("arrow").map(
            encode,
            batched=True,
            with_rank=True,
            num_proc=min(num_proc, len(dataset)) if num_proc > 1 else None,
            remove_columns=dataset.column_names,
            cache_file_name=str(work / "done.arrow"),  # empty: the tokens went to the files above
            # names this output, not a hash of the tokenizer object (slow, useless); short, as datasets allows 64
            # characters with its "_00000_of_00002" suffix per process
            new_fingerprint=hashlib.sha256(f"{out.parent.name}-{out.name}".encode()).hexdigest()[:32],
            desc=f"tokenizing {out.stem}",
        )
        part = work / out.name
        with open(part, "wb") as f:
            for shard in sorted(work.glob("[0-9]*.bin")):
                with open(shard, "rb") as g:
                    shutil.copyfileobj(g, f, 1 << 24)
                shard.unlink()
        count = part.stat().st_size // dtype.itemsize
        if count == 0:
            raise UsageError(f"{meta['source']} has no text to train on: pass a corpus with text in it")
        os.replace(part, out)
        sidecar = {**meta, "tokens": count, "dtype": dtype.name, "sha256": sha256_of(out),
                   "mtime_ns": out.stat().st_mtime_ns}  # fmt: skip
        (work / "meta.json").write_text(json.dumps(sidecar, indent=1))
        os.replace(work / "meta.json", sidecar_path(out))  # last: the token file is complete
    finally:
        shutil.rmtree(work, ignore_errors=True)


def remove_abandoned_work(out: Path) -> None:
    """Delete the work folders that killed prepares of `out` on this machine left (their process is gone), which can
    hold as much as the corpus. Other machines' folders stay: they may share the cache and be working."""
    for work in out.parent.glob(f".{out.name}@{socket.gethostname()}@*@*"):
        pid = int(work.name.split("@")[2])
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            shutil.rmtree(work, ignore_errors=True)
        except PermissionError:
            pass  # alive, another user's


def sidecar_path(token_file: Path) -> Path:
    return token_file.with_suffix(".json")


def read_sidecar(token_file: Path) -> dict | None:
    """The sidecar of a finished token file, or None if there is none (never prepared, or interrupted)."""
    try:
        return json.loads(sidecar_path(token_file).read_text())
    except FileNotFoundError:
        return None
    except (ValueError, UnicodeDecodeError):
        raise damaged(token_file, "its sidecar is not valid JSON") from None


def damaged(token_file: Path, why: str) -> UsageError:
    return UsageError(
        f"the token cache {token_file} is damaged ({why}): delete the folder {token_file.parent} "
        "to tokenize the corpus again"
    )


def check_token_file(token_file: Path, meta: dict, full: bool) -> None:
    """Raise if the token file does not match its sidecar: its size always; when full, its sha256 too, unless it
    still has the modification time the sidecar recorded (hashing a corpus of 10B tokens takes a minute)."""
    try:
        expected = int(meta["tokens"]) * np.dtype(meta["dtype"]).itemsize
        sha256 = meta["sha256"]
    except (KeyError, TypeError, ValueError):
        raise damaged(token_file, "its sidecar lacks tokens, dtype or sha256") from None
    if not token_file.is_file():
        raise damaged(token_file, "the token file is missing")
    stat = token_file.stat()
    if stat.st_size != expected:
        raise damaged(token_file, f"{stat.st_size} bytes, the sidecar says {expected}")
    if full and stat.st_mtime_ns != meta.get("mtime_ns") and sha256_of(token_file) != sha256:
        raise damaged(token_file, "its content does not match the sha256 in its sidecar")


def open_tokens(token_file: Path) -> np.memmap:
    """The token file, memory-mapped read-only, after checking that it is the size its sidecar says."""
    meta = read_sidecar(token_file)
    if meta is None:
        raise damaged(token_file, "its sidecar is missing")
    check_token_file(token_file, meta, full=False)
    return np.memmap(token_file, dtype=meta["dtype"], mode="r")


def training_text(splits: dict[str, Dataset], text_column: str, val_fraction: float) -> Iterator[str]:
    """The text a tokenizer may learn from, cut at blank lines (SentencePiece's "sentences", whose line breaks it
    learns as pieces): the train split, at most TOKENIZER_MAX_CHARS of it, and without the last val_fraction of its
    characters when the source has no val split of its own (the last val_fraction of tokens will validate)."""
    train = splits["train"]
    budget = TOKENIZER_MAX_CHARS
    if "val" not in splits:
        budget = min(budget, int(pc.sum(pc.utf8_length(train.data.column(text_column))).as_py() * (1 - val_fraction)))
    for batch in train.iter(batch_size=1000):
        for text in batch[text_column]:
            if budget <= 0:
                return
            text = text[:budget]
            budget -= len(text)
            yield from text.split("\n\n")


def cached_sentencepiece(model_file: Path, train: Callable[[], SentencePieceTokenizer]) -> SentencePieceTokenizer:
    """The SentencePiece model in model_file, else the one train() returns, written there whole (under a temporary
    name, then renamed; training is deterministic, so ranks that train at once write the same bytes)."""
    if model_file.is_file():
        try:
            return SentencePieceTokenizer(model_file.read_bytes())
        except RuntimeError:
            raise UsageError(
                f"the cached SentencePiece model {model_file} is damaged: delete it to train it again"
            ) from None
    tokenizer = train()
    model_file.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=model_file.parent, prefix=f".{model_file.name}.", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(tokenizer.model)
        os.replace(tmp, model_file)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return tokenizer
