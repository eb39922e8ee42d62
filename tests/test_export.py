"""Hugging Face out: python -m tinygpt_pl.export writes a folder that transformers loads as it is, with our logits and
our tokenizer's ids, for char and gpt2 models; what GPT-2 cannot express, or a non-empty folder, is refused."""

from pathlib import Path

import pytest
import torch
from conftest import ROOT
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline

from tinygpt_pl.data.tokenizer import CharTokenizer
from tinygpt_pl.export import main as export
from tinygpt_pl.load import load_model
from tinygpt_pl.training.cli import main as train

FILES = {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"}


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, small_corpus: Path):
    """trained(name, *args): the last.ckpt of a one-step debug run (in-process) with those options."""

    def run(name: str, *args: str) -> Path:
        root = tmp_path_factory.mktemp(name)
        train(["--config", str(ROOT / "configs" / "debug.yaml"), "--data.path", str(small_corpus),
               "--trainer.default_root_dir", str(root), "--trainer.max_steps", "1", "--trainer.val_check_interval", "1",
               "--trainer.limit_val_batches", "1", "--trainer.num_sanity_val_steps", "0", "--model.sample_tokens", "0",
               "--trainer.enable_progress_bar", "false", "--data.block_size", "128", "--data.batch_size", "1",
               *args])  # fmt: skip
        return root / "checkpoints" / "last.ckpt"

    return run


def logits(model: torch.nn.Module, idx: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = model(idx)
    return out.logits if hasattr(out, "logits") else out[0]


def check_export(ckpt: Path, out: Path, text: str) -> tuple[torch.nn.Module, AutoTokenizer]:
    """Exports ckpt; transformers' model and tokenizer of the folder give our logits (fp32, 1e-4) and ids."""
    export(["--ckpt_path", str(ckpt), "--out", str(out)])
    assert {p.name for p in out.iterdir()} == FILES
    model, tokenizer = load_model(str(ckpt))
    hf_model, hf_tokenizer = AutoModelForCausalLM.from_pretrained(out).eval(), AutoTokenizer.from_pretrained(out)
    ids = tokenizer.encode(text)
    assert hf_tokenizer(text)["input_ids"] == ids and hf_tokenizer.decode(ids) == tokenizer.decode(ids) == text
    idx = torch.tensor([ids])
    ours = logits(model, idx)[..., : tokenizer.vocab_size]
    torch.testing.assert_close(logits(hf_model, idx), ours, atol=1e-4, rtol=0)
    generated = pipeline("text-generation", model=str(out))(text[:5], max_new_tokens=10, do_sample=False)
    assert generated[0]["generated_text"].startswith(text[:5])
    return hf_model, hf_tokenizer


def test_char_model_exports_with_a_character_tokenizer(trained, tmp_path):
    ckpt = trained("char")  # bias false, exact GELU
    text = "First Citizen:\nBefore we proceed any further,  hear me speak.\n\nAll:\nSpeak, speak."
    hf_model, _ = check_export(ckpt, tmp_path / "hf", text)
    model, tokenizer = load_model(str(tmp_path / "hf"))  # back in: our CharTokenizer, the same function
    original, original_tokenizer = load_model(str(ckpt))
    assert isinstance(tokenizer, CharTokenizer) and tokenizer.chars == original_tokenizer.chars
    assert hf_model.config.activation_function == "gelu" and hf_model.config.vocab_size == len(tokenizer.chars)
    idx = torch.tensor([tokenizer.encode(text)])
    torch.testing.assert_close(logits(model, idx), logits(original, idx), atol=1e-5, rtol=0)


def test_gpt2_model_exports_cropped_untied_with_gpt2_bpe(trained, tmp_path):
    ckpt = trained("gpt2", "--data.tokenizer", "gpt2", "--data.num_proc", "1", "--data.cache_dir",
                   str(tmp_path / "cache"), "--model.activation", "relu2", "--model.tie_weights", "false")  # fmt: skip
    assert torch.load(ckpt, weights_only=True)["hyper_parameters"]["vocab_size"] == 50304
    hf_model, _ = check_export(ckpt, tmp_path / "hf", "ROMEO: O, speak again, bright angel!\n\n  JULIET:")
    assert hf_model.config.activation_function == "relu2" and not hf_model.config.tie_word_embeddings
    assert hf_model.config.eos_token_id == 50256
    with safe_open(tmp_path / "hf" / "model.safetensors", "pt") as weights:
        assert weights.get_slice("transformer.wte.weight").get_shape() == [50257, 32]
        assert weights.get_slice("lm_head.weight").get_shape() == [50257, 32]


def test_export_refuses_what_gpt2_cannot_express_and_a_non_empty_folder(trained, tmp_path, capsys):
    def refused(ckpt: Path, out: Path) -> str:
        with pytest.raises(SystemExit) as exit:
            export(["--ckpt_path", str(ckpt), "--out", str(out)])
        assert exit.value.code == 2
        errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
        assert len(errors) == 1
        return errors[0]

    rotary = trained("rotary", "--model.pos_emb", "rotary")
    assert "pos_emb='rotary', which GPT-2's architecture cannot express" in refused(rotary, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "notes.txt").write_text("mine")
    assert f"--out {tmp_path / 'full'} is not an empty folder" in refused(rotary, tmp_path / "full")
    assert [p.name for p in (tmp_path / "full").iterdir()] == ["notes.txt"]
