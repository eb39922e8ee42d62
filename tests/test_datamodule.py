import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch

from tinygpt_pl.data import datamodule as data
from tinygpt_pl.data.batches import TrainBatchMaker, ValBatchMaker, train_batch
from tinygpt_pl.data.datamodule import TextDataModule
from tinygpt_pl.errors import UsageError

TOKENS = np.arange(1000, dtype=np.uint16) % 97


def test_train_blocks_are_shifted_by_one_and_in_range():
    x, y = train_batch(TOKENS, block_size=32, batch_size=16, seed=1, step=0, part=0, num_parts=1)
    assert x.shape == y.shape == (16, 32) and x.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])
    for row_x, row_y in zip(x, y, strict=True):
        start = int(np.flatnonzero(np.all(np.lib.stride_tricks.sliding_window_view(TOKENS, 32) == row_x.numpy(), 1))[0])
        assert np.array_equal(TOKENS[start + 1 : start + 33], row_y.numpy())


def test_train_blocks_are_a_pure_function_of_seed_and_step():
    a = train_batch(TOKENS, 8, 4, seed=1, step=5, part=0, num_parts=1)[0]
    assert torch.equal(a, train_batch(TOKENS, 8, 4, seed=1, step=5, part=0, num_parts=1)[0])
    assert not torch.equal(a, train_batch(TOKENS, 8, 4, seed=1, step=6, part=0, num_parts=1)[0])
    assert not torch.equal(a, train_batch(TOKENS, 8, 4, seed=2, step=5, part=0, num_parts=1)[0])


def test_ranks_and_micro_batches_split_one_global_batch():
    # 2 ranks x 3 accumulation micro-batches x 4 sequences see exactly the 24 sequences of one 24-sequence batch.
    whole = train_batch(TOKENS, 8, 24, seed=7, step=3, part=0, num_parts=1)[0]
    parts = {}
    for rank in range(2):
        maker = TrainBatchMaker(TOKENS, 8, 4, seed=7, accumulate=3, world_size=2, rank=rank)
        for k in range(3):
            parts[(rank, k)] = maker(3 * 3 + k)[0]
    assert not torch.equal(parts[(0, 0)], parts[(1, 0)])  # ranks differ
    assert torch.equal(torch.cat([parts[(r, k)] for k in range(3) for r in range(2)]), whole)


@pytest.mark.parametrize("world_size", [1, 2, 3])
@pytest.mark.parametrize("block_size", [7, 10])
def test_val_split_is_covered_exactly_once(world_size, block_size):
    tokens = np.arange(101, dtype=np.uint16)
    predicted = []
    for rank in range(world_size):
        maker = ValBatchMaker(tokens, block_size, batch_size=3, world_size=world_size, rank=rank)
        for j in range(len(maker)):
            x, y = maker(j)
            assert x.shape == y.shape and x.shape[1] == block_size
            mask = y != -1
            assert torch.equal(y[:, :-1][mask[:, 1:]], x[:, 1:][mask[:, 1:]])  # y is x shifted by one
            predicted.extend(y[mask].tolist())
    assert sorted(predicted) == list(range(1, 101))  # every token but the first is a target exactly once


def write(tmp_path: Path, content: bytes) -> str:
    path = tmp_path / "corpus.txt"
    path.write_bytes(content)
    return str(path)


def test_datamodule_splits_90_10_and_builds_vocab(corpus):
    dm = TextDataModule(path=str(corpus), block_size=64, batch_size=4)
    dm.setup("fit")
    assert dm.vocab_size == 65
    assert len(dm.train_tokens) == 1_003_854 and len(dm.val_tokens) == 111_540
    assert dm.tokenizer.decode(dm.val_tokens[:20].tolist()) == corpus.read_text()[1_003_854:1_003_874]


@pytest.mark.parametrize(
    "content, message",
    [
        (b"", "is empty"),
        (b"to be or not to be" * 2, "too few for one block"),
        (b"caf\xe9 " * 1000, "not UTF-8 text"),
    ],
)
def test_bad_corpus_gives_one_clear_error(tmp_path, content, message):
    with pytest.raises(UsageError, match=message):
        TextDataModule(path=write(tmp_path, content), block_size=64)


def test_missing_file(tmp_path):
    with pytest.raises(UsageError, match="does not exist: pass --data.path"):
        TextDataModule(path=str(tmp_path / "nope.txt"))


def test_download_checks_hash_and_caches(tmp_path, corpus, monkeypatch):
    monkeypatch.setattr(data, "TINY_SHAKESPEARE_URL", corpus.as_uri())
    path = data.fetch_tiny_shakespeare(tmp_path / "cache")
    assert path.read_bytes() == corpus.read_bytes()
    assert [p.name for p in (tmp_path / "cache").iterdir()] == ["tinyshakespeare.txt"]
    monkeypatch.setattr(data, "TINY_SHAKESPEARE_URL", "file:///nonexistent/input.txt")
    assert data.fetch_tiny_shakespeare(tmp_path / "cache") == path  # cache hit: no download


def test_download_with_wrong_hash_leaves_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "TINY_SHAKESPEARE_URL", Path(write(tmp_path, b"not shakespeare")).as_uri())
    with pytest.raises(UsageError, match="does not match its sha256"):
        data.fetch_tiny_shakespeare(tmp_path / "cache")
    assert list((tmp_path / "cache").iterdir()) == []


def test_offline_download_says_to_pass_a_path(tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(data.urllib.request, "urlopen", offline)
    with pytest.raises(UsageError, match="pass --data.path FILE"):
        TextDataModule(cache_dir=str(tmp_path))
