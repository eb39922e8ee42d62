"""val/bpb: the val split's summed loss in bits over the UTF-8 bytes of the text its targets stand for."""

import math
from pathlib import Path

import lightning as L
import pytest
import torch

from tinygpt_pl.data.datamodule import TextDataModule
from tinygpt_pl.training.module import GPTModule


def validate(data: TextDataModule, **trainer_options) -> dict[str, float]:
    """val/loss, val/ppl and val/bpb of a tiny untrained GPT (always the same one) over the whole val split."""
    torch.manual_seed(0)
    module = GPTModule(vocab_size=data.vocab_size, block_size=data.block_size, n_layer=1, n_head=2, n_embd=16,
                       dropout=0.0)  # fmt: skip
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_checkpointing=False,
                        enable_model_summary=False, **trainer_options)  # fmt: skip
    (result,) = trainer.validate(module, datamodule=data, verbose=False)
    return result


def test_char_tokenizer_on_ascii_text_gives_loss_over_ln_2(small_corpus: Path):
    data = TextDataModule(path=str(small_corpus), block_size=48, batch_size=16)
    result = validate(data)
    assert data.val_tokens_per_byte == 1.0
    assert result["val/bpb"] == pytest.approx(result["val/loss"] / math.log(2), rel=1e-7)


def test_multibyte_characters_count_as_their_bytes(tmp_path: Path):
    path = tmp_path / "corpus.txt"
    path.write_text("Où est le café? Ça coûte 3 €, señor — ça va.\n" * 200)
    data = TextDataModule(path=str(path), block_size=48, batch_size=16)
    result = validate(data)
    targets = data.val_tokens[1:]
    n_bytes = len(data.tokenizer.decode(targets.tolist()).encode())
    assert n_bytes > len(targets)
    assert result["val/bpb"] == pytest.approx(result["val/loss"] * len(targets) / n_bytes / math.log(2), rel=1e-6)


def test_bpe_divides_by_bytes_not_tokens(small_corpus: Path, tmp_path: Path):
    """GPT-2 BPE: the val split's bytes are the text its targets decode to (the end-of-text token is no text)."""
    data = TextDataModule(path=str(small_corpus), tokenizer="gpt2", block_size=48, batch_size=16, num_proc=1,
                          cache_dir=str(tmp_path))  # fmt: skip
    data.prepare_data()
    result = validate(data)
    targets = data.val_tokens[1:].tolist()
    assert targets[-1] == data.tokenizer.eot_id  # the corpus is one document
    text = data.tokenizer.decode(targets[:-1])
    assert small_corpus.read_text().endswith(text)
    n_bytes = len(text.encode())
    assert len(targets) < 0.4 * n_bytes
    assert result["val/bpb"] == pytest.approx(result["val/loss"] * len(targets) / n_bytes / math.log(2), rel=1e-6)


@pytest.mark.slow
def test_the_same_on_two_ranks(small_corpus: Path):
    """Each rank validates its share of the val split: val/bpb over two DDP ranks is the one-rank value."""
    data = TextDataModule(path=str(small_corpus), block_size=48, batch_size=16)
    one = validate(data, devices=1)
    two = validate(TextDataModule(path=str(small_corpus), block_size=48, batch_size=16), devices=2,
                   strategy="ddp_spawn")  # fmt: skip
    assert two["val/bpb"] == pytest.approx(one["val/bpb"], rel=1e-6)
