"""GPT-2 weights in: a Hugging Face folder and a hub name (offline, from huggingface_hub's cache) load with
transformers' logits, and --model.init_from fine-tunes from them through the real CLI, or refuses in one line."""

import shutil
from pathlib import Path

import huggingface_hub
import pytest
import torch
from conftest import ROOT
from transformers import AutoTokenizer, GPT2LMHeadModel

from tinygpt_pl.errors import UsageError
from tinygpt_pl.generation.generate import Completion, Sampling
from tinygpt_pl.load import load_model
from tinygpt_pl.training.cli import TrainCLI, main

TEXT = "First Citizen:\nBefore we proceed any further, hear me speak.\n\n  All:\tSpeak, speak."


def hf_logits(folder: Path, idx: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return GPT2LMHeadModel.from_pretrained(folder).eval()(idx).logits


def our_logits(model: torch.nn.Module, idx: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(idx)[0]


def test_hf_folder_loads_with_transformers_logits_and_gpt2_tokens(gpt2_standin):
    model, tokenizer = load_model(str(gpt2_standin))
    c = model.config
    assert (c.n_layer, c.n_head, c.n_embd, c.block_size, c.vocab_size) == (2, 4, 64, 128, 50257)
    assert (c.bias, c.activation, c.dropout, model.training) == (True, "gelu_tanh", 0.0, False)
    assert (
        tokenizer.name == "gpt2"
        and tokenizer.encode(TEXT) == AutoTokenizer.from_pretrained(gpt2_standin)(TEXT)["input_ids"]
    )
    idx = torch.randint(0, 50257, (2, 128), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(our_logits(model, idx), hf_logits(gpt2_standin, idx), atol=1e-4, rtol=0)


def test_greedy_text_from_an_hf_folder_is_transformers_generate(gpt2_standin):
    """The issue's target: greedy text from an imported folder is transformers' generate(do_sample=False)'s."""
    model, tokenizer = load_model(str(gpt2_standin))
    prompt = tokenizer.encode(TEXT)
    ours = Completion(model, tokenizer, TEXT, 60, Sampling(temperature=0)).result()
    hf = GPT2LMHeadModel.from_pretrained(gpt2_standin).eval()
    out = hf.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=60, pad_token_id=50256)
    ids = out[0, len(prompt) :].tolist()
    ids = ids[:-1] if ids[-1] == tokenizer.eot_id else ids  # transformers keeps the end-of-text token it stopped at
    assert ours.completion_tokens == len(ids) > 0
    assert ours.text == tokenizer.decode(ids)


def test_hub_name_loads_offline_from_the_hub_cache(gpt2_standin, tmp_path, monkeypatch):
    """huggingface_hub's own cache layout with the stand-in as gpt2, found by huggingface_hub's own code; gpt2-medium
    is in no cache and the hub is offline: one line says what to do. (huggingface_hub reads HF_HUB_CACHE and
    HF_HUB_OFFLINE into its constants when it is imported, so they are set there.)"""
    repo = tmp_path / "hub" / "models--gpt2"
    commit = "0" * 40
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for name in ("config.json", "model.safetensors"):
        shutil.copy(gpt2_standin / name, snapshot / name)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    model, _ = load_model("gpt2")
    idx = torch.arange(100)[None]
    torch.testing.assert_close(our_logits(model, idx), hf_logits(gpt2_standin, idx), atol=1e-4, rtol=0)
    with pytest.raises(UsageError, match="could not download config.json of gpt2-medium .* connect to the internet"):
        load_model("gpt2-medium")


def finetune(root: Path, corpus: Path, init_from: Path, *args: str) -> None:
    """train.py's CLI, in-process, from the stand-in's weights with GPT-2's tokenizer."""
    main(["--data.path", str(corpus), "--data.tokenizer", "gpt2", "--data.num_proc", "1", "--data.cache_dir",
          str(root.parent / "cache"), "--data.block_size", "64", "--data.batch_size", "2", "--model.init_from",
          str(init_from), "--model.dropout", "0", "--model.learning_rate", "1e-6", "--model.min_lr", "1e-6",
          "--model.warmup_steps", "0", "--model.sample_tokens", "0", "--trainer.max_steps", "2",
          "--trainer.val_check_interval", "2", "--trainer.check_val_every_n_epoch", "null",
          "--trainer.limit_val_batches", "1", "--trainer.num_sanity_val_steps", "0", "--trainer.accelerator", "cpu",
          "--trainer.devices", "1", "--trainer.enable_progress_bar", "false", "--trainer.default_root_dir", str(root),
          *args])  # fmt: skip


def test_init_from_finetunes_and_resumes_without_the_weights(gpt2_standin, small_corpus, tmp_path):
    weights = tmp_path / "gpt2-copy"
    shutil.copytree(gpt2_standin, weights)
    finetune(tmp_path / "run", small_corpus, weights)
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    hparams = torch.load(last, weights_only=True)["hyper_parameters"]
    assert hparams["init_from"] == str(weights)
    assert (hparams["n_layer"], hparams["n_embd"], hparams["vocab_size"], hparams["block_size"]) == (2, 64, 50257, 64)
    assert (hparams["bias"], hparams["activation"]) == (True, "gelu_tanh")
    model, tokenizer = load_model(str(last))
    idx = torch.tensor([tokenizer.encode(TEXT)])
    theirs, ours = hf_logits(gpt2_standin, idx), our_logits(model, idx)
    torch.testing.assert_close(ours, theirs, atol=1e-2, rtol=0)  # two small steps away from the stand-in's weights
    assert not torch.allclose(ours, theirs, atol=1e-6, rtol=0)
    # a resumed run has its own weights: the stand-in's are not read again (config.json is). (In another folder:
    # this process holds the first run's lock.)
    (weights / "model.safetensors").unlink()
    finetune(tmp_path / "resumed", small_corpus, weights, "--ckpt_path", str(last), "--trainer.max_steps", "3")
    assert torch.load(tmp_path / "resumed" / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 3


@pytest.mark.parametrize(
    "args, fragments",
    [
        (["--model.n_layer", "3"], ["--model.n_layer 3 contradicts the weights", "(n_layer=2)"]),
        (["--data.block_size", "256"], ["--data.block_size 256 is longer than the context", "(128 positions)"]),
        (["--data.tokenizer", "char"], ["not those of the char tokenizer", "pass --data.tokenizer gpt2"]),
    ],
)
def test_init_from_refuses_what_contradicts_the_weights(gpt2_standin, small_corpus, tmp_path, capsys, args, fragments):
    with pytest.raises(SystemExit) as exit:
        finetune(tmp_path / "run", small_corpus, gpt2_standin, *args)
    assert exit.value.code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and all(fragment in errors[0] for fragment in fragments), errors
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_finetune_config_is_nanogpts_recipe(gpt2_standin, small_corpus, tmp_path):
    """configs/finetune_shakespeare_gpt2.yaml, with the stand-in for gpt2-xl (128 positions, so shorter blocks)."""
    cli = TrainCLI(["--config", str(ROOT / "configs" / "finetune_shakespeare_gpt2.yaml"), "--model.init_from",
                    str(gpt2_standin), "--data.block_size", "128", "--data.path", str(small_corpus),
                    "--trainer.accelerator", "cpu", "--trainer.default_root_dir", str(tmp_path)])  # fmt: skip
    hp, trainer = cli.model.hparams, cli.trainer
    assert (hp.learning_rate, hp.min_lr, hp.warmup_steps, hp.dropout) == (3e-5, 3e-5, 0, 0.0)
    assert (hp.n_layer, hp.n_embd, hp.vocab_size, cli.datamodule.tokenizer.name) == (2, 64, 50257, "gpt2")
    assert cli.datamodule.batch_size * trainer.accumulate_grad_batches == 32 and trainer.max_steps == 20
    assert trainer.val_check_interval == 5 * trainer.accumulate_grad_batches  # every 5 optimizer steps
