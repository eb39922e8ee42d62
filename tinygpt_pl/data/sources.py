"""Where the text comes from: local files or a hub dataset, read through HF `datasets`.

A local source is a file, a folder or a glob of .txt, .jsonl/.json or .parquet files. Each .txt file is one document,
read as written in pieces cut at line ends; .jsonl/.json/.parquet rows and hub dataset rows are documents. The
tokenized corpus ends every document with the end-of-text token.
"""

from __future__ import annotations

import glob
import hashlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from tinygpt_pl.errors import UsageError

if TYPE_CHECKING:  # datasets is imported where a corpus is read: a second off every start-up that reuses the cache
    from datasets import Dataset

BUILDERS = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}
VALIDATION_SPLIT = "validation"
DOCUMENT_END = "document_end"  # a column of .txt rows: whether the row is the last piece of its file
PIECE_CHARS = 1 << 16  # .txt pieces: big enough for fast batched encoding, small enough to buffer 1000 of


def local_files(path: str) -> list[Path]:
    """The data files that `path` names: itself, the data files under a folder, or those matching a glob."""
    p = Path(path).expanduser()
    if p.is_file():
        files = [p]
    elif p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.suffix in BUILDERS and f.is_file())
    else:
        files = sorted(Path(f) for f in glob.glob(str(p), recursive=True) if Path(f).is_file())
    if not files:
        raise UsageError(
            f"--data.path {path}: no such file, and no data files match it: pass a file, a folder or a glob of "
            f"{'/'.join(BUILDERS)} files"
        )
    builders = {BUILDERS.get(f.suffix) for f in files}
    if None in builders or len(builders) > 1:
        raise UsageError(
            f"--data.path {path} matches {', '.join(sorted({f.suffix or f.name for f in files}))} files: "
            "pass files of one kind, .txt or .jsonl/.json or .parquet"
        )
    return [f.resolve() for f in files]


def source_key(files: list[Path] | None, hf_path: str | None, hf_name: str | None, split: str,
               text_column: str) -> tuple[str, str]:  # fmt: skip
    """(a readable description, a short hash) of the source: files by path, size and modification time (so an
    edited file is a new source), a hub dataset by name, config and split."""
    if files is not None:
        parts = [[str(f), (s := f.stat()).st_size, s.st_mtime_ns] for f in files]
        described = str(files[0]) + (f" and {len(files) - 1} more files" if len(files) > 1 else "")
    else:
        parts = [hf_path, hf_name, split]
        described = f"hub dataset {hf_path}" + (f" ({hf_name})" if hf_name else "") + f", split {split}"
    digest = hashlib.sha256(json.dumps([parts, text_column]).encode()).hexdigest()[:16]
    return described, digest


def text_pieces(files: list[str], source: str) -> Iterator[dict]:
    """The rows of .txt files: pieces of about PIECE_CHARS characters cut at line ends, line breaks as written,
    the last piece of each file marked as a document's end. (source names the files' content for HF's cache.)"""
    for file in files:
        with open(file, encoding="utf-8", newline="") as f:
            piece = f.read(PIECE_CHARS) + f.readline()
            while piece:
                following = f.read(PIECE_CHARS) + f.readline()
                yield {"text": piece, DOCUMENT_END: not following}
                piece = following


def load_local(files: list[Path], text_column: str, cache_dir: Path, source: str) -> dict[str, Dataset]:
    """{"train": the files as one dataset}, read through HF's cache; source: a key that changes with the files."""
    import datasets

    builder = BUILDERS[files[0].suffix]
    paths = [str(f) for f in files]
    try:
        if builder == "text":
            features = datasets.Features({"text": datasets.Value("string"), DOCUMENT_END: datasets.Value("bool")})
            train = datasets.Dataset.from_generator(text_pieces, features=features, cache_dir=str(cache_dir),
                                                    gen_kwargs={"files": paths, "source": source})  # fmt: skip
        else:
            train = datasets.load_dataset(builder, data_files=paths, split="train", cache_dir=str(cache_dir))
    except datasets.exceptions.DatasetGenerationError as e:
        cause = e.__cause__ or e
        raise UsageError(
            f"could not read {files[0]} as {builder} ({type(cause).__name__}: {' '.join(str(cause).split())[:200]}): "
            "fix the file, or pass files of the kind their suffix says"
        ) from None
    return check_column({"train": train}, text_column, str(files[0]))


def load_hub(hf_path: str, hf_name: str | None, split: str, text_column: str) -> dict[str, Dataset]:
    """{"train": the chosen split, "val": the dataset's own validation split when it has one}, through the HF
    cache (offline, only datasets already downloaded there load)."""
    import datasets

    name = hf_path + (f" ({hf_name})" if hf_name else "")
    try:
        splits = datasets.load_dataset(hf_path, hf_name)
    except (OSError, ValueError, datasets.exceptions.DatasetsError) as e:
        raise UsageError(
            f"could not load the hub dataset {name} ({type(e).__name__}: {' '.join(str(e).split())[:200]}): "
            "check --data.hf_path/--data.hf_name on huggingface.co/datasets and the network "
            "(offline, only datasets already in the HF cache load)"
        ) from None
    if split not in splits:
        raise UsageError(f"the hub dataset {name} has no split {split!r}: use --data.split {' or '.join(splits)}")
    chosen = {"train": splits[split]}
    if VALIDATION_SPLIT in splits and split != VALIDATION_SPLIT:
        chosen["val"] = splits[VALIDATION_SPLIT]
    return check_column(chosen, text_column, name)


def check_column(splits: dict[str, Dataset], text_column: str, name: str) -> dict[str, Dataset]:
    for dataset in splits.values():
        if text_column not in dataset.column_names:
            raise UsageError(
                f"{name} has no column {text_column!r} (its columns: {', '.join(dataset.column_names)}): "
                "pass --data.text_column with the column that holds the text"
            )
    return splits
