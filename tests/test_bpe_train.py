"""train.py and sample.py with GPT-2 BPE on memory-mapped tokens, on one and two ranks, and its bad input."""

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ROOT, run_script, train
from test_bad_input import assert_one_error_line, digests

from tinygpt_pl.training.cli import TrainCLI

GPT2_DEBUG = ["--data.tokenizer", "gpt2", "--data.num_proc", "1", "--model.sample_tokens", "5"]


def bpe_train(root: Path, corpus: Path, cache: Path, *args: str):
    return train(root, corpus, *GPT2_DEBUG, "--data.cache_dir", str(cache), *args)


@pytest.fixture(scope="module")
def gpt2_run(tmp_path_factory: pytest.TempPathFactory, corpus: Path) -> tuple[Path, Path]:
    """(run root, cache) of a finished 6-step gpt2 debug run."""
    root, cache = tmp_path_factory.mktemp("gpt2"), tmp_path_factory.mktemp("cache")
    result = bpe_train(root, corpus, cache, "--trainer.max_steps", "6", "--trainer.val_check_interval", "6")
    assert result.returncode == 0, result.stderr
    return root, cache


def test_gpt2_run_pads_the_vocabulary_and_samples_real_tokens(gpt2_run, tmp_path):
    root, _ = gpt2_run
    ckpt = root / "checkpoints" / "last.ckpt"
    checkpoint = torch.load(ckpt, weights_only=True)
    assert checkpoint["hyper_parameters"]["vocab_size"] == 50304
    assert checkpoint["TextDataModule"] == {"tokenizer": {"name": "gpt2"}}
    result = run_script("sample.py", "--ckpt_path", str(ckpt), "--prompt", "ROMEO:", "--max_new_tokens", "30",
                        "--temperature", "3.0", "--top_k", "null", cwd=tmp_path)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("ROMEO:")  # padded ids (>= 50257) would not decode


def test_same_tokens_per_step_on_one_and_two_ranks(tmp_path, corpus, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", str(ROOT / "tests"))
    cache = tmp_path / "cache"
    logs = {}
    for devices, batch_size in ((1, 8), (2, 4)):
        logs[devices] = tmp_path / f"tokens{devices}"
        config = tmp_path / f"log{devices}.yaml"
        config.write_text(
            "trainer:\n  callbacks:\n    - class_path: token_log.TokenLog\n"
            f"      init_args:\n        out_dir: {logs[devices]}\n"
        )
        result = bpe_train(tmp_path / f"run{devices}", corpus, cache, "--config", str(config),
                           "--trainer.devices", str(devices), "--trainer.strategy", "ddp" if devices > 1 else "auto",
                           "--data.batch_size", str(batch_size), "--trainer.max_steps", "3",
                           "--trainer.val_check_interval", "3", "--trainer.limit_val_batches", "2")  # fmt: skip
        assert result.returncode == 0, result.stderr
    for step in range(3):
        one = np.load(logs[1] / f"step{step}-rank0.npy")
        two = [np.load(logs[2] / f"step{step}-rank{rank}.npy") for rank in (0, 1)]
        assert one.shape == (8, 32) and not np.array_equal(two[0], two[1])
        assert np.array_equal(np.concatenate(two), one)
    assert not np.array_equal(np.load(logs[1] / "step0-rank0.npy"), np.load(logs[1] / "step1-rank0.npy"))
    assert len(list((cache / "tokens").iterdir())) == 1  # one tokenization, shared by both runs


def test_resume_with_another_tokenizer(gpt2_run, tmp_path, corpus):
    root, cache = gpt2_run
    before = digests(root / "checkpoints")
    result = train(root, corpus, "--ckpt_path", "last", "--trainer.max_steps", "8")  # char, the default
    assert_one_error_line(result, "another tokenizer/vocabulary (gpt2)", "this run's data (char)", "same --data")
    assert digests(root / "checkpoints") == before


def test_damaged_cache(gpt2_run, tmp_path, corpus):
    _, cache = gpt2_run
    (token_dir,) = (cache / "tokens").iterdir()
    copy = tmp_path / "cache" / "tokens" / token_dir.name
    copy.mkdir(parents=True)
    for p in token_dir.iterdir():
        (copy / p.name).write_bytes(p.read_bytes())
    (copy / "train.bin").write_bytes((copy / "train.bin").read_bytes()[:-2])
    before = digests(copy)
    result = bpe_train(tmp_path / "run", corpus, tmp_path / "cache")
    assert_one_error_line(result, "the token cache", "is damaged", "delete the folder")
    assert digests(copy) == before


def test_unknown_tokenizer(tmp_path, corpus):
    result = train(tmp_path / "run", corpus, "--data.tokenizer", "gpt5")
    assert_one_error_line(result, "unknown tokenizer 'gpt5'", "gpt2, r50k_base")


def test_missing_text_column(tmp_path, corpus):
    docs = tmp_path / "docs.jsonl"
    docs.write_text('{"content": "hello"}\n')
    result = train(tmp_path / "run", docs, *GPT2_DEBUG, "--data.cache_dir", str(tmp_path / "cache"))
    assert_one_error_line(result, "has no column 'text' (its columns: content)", "--data.text_column")


def test_hub_dataset_that_cannot_be_reached(tmp_path, corpus, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    result = run_script("train.py", "--config", "configs/debug.yaml", *GPT2_DEBUG, "--data.hf_path",
                        "no-such-user/no-such-dataset", "--trainer.default_root_dir", str(tmp_path / "run"),
                        "--data.cache_dir", str(tmp_path / "cache"))  # fmt: skip
    assert_one_error_line(result, "could not load the hub dataset no-such-user/no-such-dataset", "--data.hf_path")


@pytest.mark.parametrize("devices", [1, 2])
def test_fineweb_config_steps_half_a_million_tokens_on_any_device_count(tmp_path, devices):
    cli = TrainCLI(["--config", str(ROOT / "configs" / "gpt2_124m_fineweb.yaml"), "--trainer.accelerator", "cpu",
                    "--trainer.devices", str(devices), "--trainer.default_root_dir", str(tmp_path),
                    "--data.cache_dir", str(tmp_path / "cache")])  # fmt: skip
    trainer, hp, dm = cli.trainer, cli.model.hparams, cli.datamodule
    accumulate = trainer.accumulate_grad_batches
    assert devices * dm.batch_size * accumulate * dm.block_size == 524_288 and accumulate == 32 // devices
    assert trainer.val_check_interval == 250 * accumulate  # every 250 optimizer steps
    assert (hp.learning_rate, hp.min_lr, hp.warmup_steps, hp.weight_decay) == (6e-4, 6e-5, 700, 0.1)
    assert tuple(hp.betas) == (0.9, 0.95) and hp.vocab_size == 50304 and hp.block_size == 1024
    assert (dm.hf_path, dm.hf_name, dm.tokenizer.name) == ("HuggingFaceFW/fineweb-edu", "sample-10BT", "gpt2")
    assert not (tmp_path / "cache").exists()  # nothing downloaded or tokenized before prepare_data
