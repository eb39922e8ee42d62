"""The SentencePiece tokenizer: trained on the training split once and cached, lossless, carried by the checkpoint,
and its bad input."""

import runpy
import shutil
import sys
from pathlib import Path

import pytest
import sentencepiece as spm
import torch
from conftest import ROOT
from sentencepiece import sentencepiece_model_pb2

from tinygpt_pl.data.datamodule import TextDataModule
from tinygpt_pl.data.tokenizer import SentencePieceTokenizer, train_sentencepiece
from tinygpt_pl.load import load_checkpoint
from tinygpt_pl.training.cli import main

VOCAB = 512
SENTENCEPIECE = ["--data.tokenizer", "sentencepiece", "--data.tokenizer_vocab_size", str(VOCAB)]
TRICKY = "  two  spaces,\ttab\r\nCRLF\n\n\nblank lines, unseen: café — 日本語 🙂, and </s> as text\n"


def sentencepiece_data(corpus: Path, cache: Path, **kwargs) -> TextDataModule:
    options = {"tokenizer": "sentencepiece", "tokenizer_vocab_size": VOCAB, **kwargs}
    return TextDataModule(path=str(corpus), block_size=32, batch_size=8, cache_dir=str(cache), num_proc=1, **options)


def model_type(tokenizer: SentencePieceTokenizer) -> int:
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(tokenizer.model)
    return proto.trainer_spec.model_type


@pytest.fixture(scope="module")
def bpe(tmp_path_factory: pytest.TempPathFactory, small_corpus: Path) -> tuple[TextDataModule, Path]:
    """(the datamodule, its cache) of a SentencePiece BPE model trained on the small corpus."""
    cache = tmp_path_factory.mktemp("cache")
    return sentencepiece_data(small_corpus, cache), cache


def test_round_trip_is_lossless(bpe, small_corpus):
    tokenizer = bpe[0].tokenizer
    assert tokenizer.vocab_size == VOCAB and model_type(tokenizer) == sentencepiece_model_pb2.TrainerSpec.BPE
    for text in (small_corpus.read_text(), TRICKY):
        ids = tokenizer.encode(text)
        assert tokenizer.decode(ids) == text
        assert tokenizer.byte_lengths()[ids].sum() == len(text.encode())  # val/bpb's bytes are the text's
    corpus_ids = tokenizer.encode(small_corpus.read_text())
    assert len(corpus_ids) < 0.6 * len(small_corpus.read_text())  # it learnt pieces longer than characters
    assert tokenizer.eot_id not in tokenizer.encode(TRICKY)  # "</s>" in text is text, never the end-of-text token
    assert [ids.tolist() for ids in tokenizer.encode_batch(["ROMEO:", TRICKY])] == [
        tokenizer.encode("ROMEO:"),
        tokenizer.encode(TRICKY),
    ]


def test_trained_once_on_the_training_split_and_cached_by_settings(tmp_path, small_corpus):
    """A word that only the held-out last tenth of the corpus repeats is no piece; the model is written once and
    reused; another setting trains another model (and tokenizes into another cache)."""
    shakespeare = small_corpus.read_text()[:54_000]
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(shakespeare + "zqzq " * 1200)  # 60k characters: the last 10% are the zqzqs
    assert any("zq" in piece for piece in pieces(train_sentencepiece([corpus.read_text()], VOCAB, "bpe")))
    cache = tmp_path / "cache"

    first = sentencepiece_data(corpus, cache)
    assert not any("zq" in piece for piece in pieces(first.tokenizer))
    (model_file,) = (cache / "tokenizers").iterdir()
    assert model_file.read_bytes() == first.tokenizer.model
    stamp = model_file.stat().st_mtime_ns

    again = sentencepiece_data(corpus, cache)
    assert again.tokenizer.model == first.tokenizer.model and model_file.stat().st_mtime_ns == stamp
    assert again.token_dir == first.token_dir

    other = sentencepiece_data(corpus, cache, tokenizer_vocab_size=VOCAB + 64)
    assert other.tokenizer.vocab_size == VOCAB + 64 and other.token_dir != first.token_dir
    assert len(list((cache / "tokenizers").iterdir())) == 2
    assert not list((cache / "tokenizers").glob(".*"))  # no temporary file left

    unigram = sentencepiece_data(corpus, cache, tokenizer_model_type="unigram")
    assert model_type(unigram.tokenizer) == sentencepiece_model_pb2.TrainerSpec.UNIGRAM
    assert unigram.tokenizer.decode(unigram.tokenizer.encode(TRICKY)) == TRICKY
    assert len(list((cache / "tokenizers").iterdir())) == 3


def pieces(tokenizer: SentencePieceTokenizer) -> list[str]:
    return [tokenizer.processor.id_to_piece(i) for i in range(tokenizer.vocab_size)]


def test_an_existing_model_file(tmp_path, small_corpus):
    """A .model that SentencePiece wrote with its own defaults (not ours) tokenizes the corpus, cached by its
    content."""
    prefix = tmp_path / "own"
    spm.SentencePieceTrainer.train(input=str(small_corpus), model_prefix=str(prefix), vocab_size=300, minloglevel=2)
    model_file = prefix.with_suffix(".model")
    data = TextDataModule(path=str(small_corpus), tokenizer=str(model_file), cache_dir=str(tmp_path / "cache"),
                          num_proc=1, block_size=32)  # fmt: skip
    assert data.tokenizer.model == model_file.read_bytes() and data.tokenizer.vocab_size == 300
    data.prepare_data()
    data.setup("fit")
    assert data.token_dir.name.startswith(f"sentencepiece-{data.tokenizer.digest}-")
    text = data.tokenizer.decode(data.val_tokens[:100].tolist())
    assert " ".join(text.split()) in " ".join(small_corpus.read_text().split())  # its normalisation joins lines


def test_the_checkpoint_carries_the_model(tmp_path, small_corpus, monkeypatch, capsys):
    """sample.py (run in this process) needs only the checkpoint: the corpus and every cache are gone."""
    corpus, cache, root = tmp_path / "corpus.txt", tmp_path / "cache", tmp_path / "run"
    shutil.copyfile(small_corpus, corpus)
    train(root, corpus, cache, *SENTENCEPIECE)
    (model_file,) = (cache / "tokenizers").iterdir()
    model = model_file.read_bytes()
    shutil.rmtree(cache)
    corpus.unlink()

    ckpt = root / "checkpoints" / "last.ckpt"
    assert torch.load(ckpt, weights_only=True)["TextDataModule"]["tokenizer"] == {
        "name": "sentencepiece",
        "model": model,
    }
    _, tokenizer = load_checkpoint(ckpt)
    assert isinstance(tokenizer, SentencePieceTokenizer) and tokenizer.model == model
    monkeypatch.setattr(sys, "argv", ["sample.py", "--ckpt_path", str(ckpt), "--prompt", "ROMEO:",
                                      "--max_new_tokens", "20", "--temperature", "2.0"])  # fmt: skip
    capsys.readouterr()
    runpy.run_path(str(ROOT / "sample.py"), run_name="__main__")
    out = capsys.readouterr().out
    assert out.startswith("ROMEO:") and len(out) > len("ROMEO:\n")
    assert not cache.exists() and not corpus.exists()


def train(root: Path, corpus: Path, cache: Path, *args: str) -> None:
    """train.py's main, in this process: 2 steps of the debug model."""
    main(["--config", str(ROOT / "configs" / "debug.yaml"), "--data.path", str(corpus), "--data.cache_dir", str(cache),
          "--data.num_proc", "1", "--trainer.default_root_dir", str(root), "--trainer.enable_progress_bar", "false",
          "--trainer.enable_model_summary", "false", "--trainer.max_steps", "2", "--trainer.val_check_interval", "2",
          "--trainer.limit_val_batches", "2", "--model.sample_tokens", "5", *args])  # fmt: skip


@pytest.mark.parametrize(
    ("args", "model_file", "fragments"),
    [
        ([*SENTENCEPIECE[:2], "--data.tokenizer_vocab_size", "100000"], None, ["100000 is more pieces", "or less"]),
        ([*SENTENCEPIECE[:2], "--data.tokenizer_vocab_size", "100"], None, ["100 is fewer pieces", "or more"]),
        (["--data.tokenizer", "{model}"], b"not a model", ["is not a SentencePiece model", "x.model"]),
        (["--data.tokenizer", "{model}"], b"", ["is not a SentencePiece model", "x.model"]),
        (["--data.tokenizer", "{model}"], None, ["x.model: no such file", "sentencepiece to train one"]),
        (
            ["--data.tokenizer_vocab_size", "512"],
            None,
            ["--data.tokenizer_vocab_size", "the tokenizer is char", "drop them"],
        ),
    ],
    ids=["vocab-too-large", "vocab-too-small", "not-a-model", "empty-model", "missing-model", "vocab-size-for-char"],
)
def test_bad_input(args, model_file, fragments, tmp_path, small_corpus, capsys):
    model = tmp_path / "x.model"
    if model_file is not None:
        model.write_bytes(model_file)
    cache, root = tmp_path / "cache", tmp_path / "run"
    with pytest.raises(SystemExit) as exit:
        train(root, small_corpus, cache, *(arg.format(model=model) for arg in args))
    assert exit.value.code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, errors
    assert all(fragment in errors[0] for fragment in fragments), errors[0]
    assert not (cache / "tokenizers").exists() and not (cache / "tokens").exists()  # nothing cached
    assert not root.exists()


def test_the_largest_vocabulary_the_message_names_trains(tmp_path, small_corpus, capsys):
    with pytest.raises(SystemExit):
        train(
            tmp_path / "run",
            small_corpus,
            tmp_path / "cache",
            *SENTENCEPIECE[:2],
            "--data.tokenizer_vocab_size",
            "100000",
        )
    (error,) = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    largest = int(error.split("pass ")[1].split()[0])
    data = sentencepiece_data(small_corpus, tmp_path / "cache", tokenizer_vocab_size=largest)
    assert data.tokenizer.vocab_size == largest
