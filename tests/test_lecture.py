"""The lecture's stages (configs/lecture/): the architecture each one builds, the bigram model, and each config
training through the command line."""

import math
from pathlib import Path

import pytest
import torch
import yaml
from conftest import ROOT

from tinygpt_pl.bigram import BigramConfig, BigramLanguageModel
from tinygpt_pl.data.datamodule import TextDataModule
from tinygpt_pl.generation.generate import Sampling, generate
from tinygpt_pl.load import load_checkpoint
from tinygpt_pl.model import Block, PlainBlock
from tinygpt_pl.training.cli import main
from tinygpt_pl.training.module import GPTModule

STAGES = sorted(p.stem for p in (ROOT / "configs" / "lecture").glob("*.yaml"))
V = 65  # tiny Shakespeare's characters


def linear(n_in: int, n_out: int, bias: bool = True) -> int:
    return n_in * n_out + (n_out if bias else 0)


def lecture_params(C: int, T: int, n_head: int, n_layer: int, ffwd: bool, residual: bool, ln: bool) -> int:
    """Parameters of the lecture's model at a stage, from its layers (ng-video-lecture's gpt.py as the lecture grows
    it): embeddings, heads of key/query/value Linear(C, C // n_head, bias=False), the projection and 4x feed-forward
    with residuals (before them a 1x feed-forward), LayerNorms, lm_head Linear(C, V)."""
    heads = n_head * 3 * linear(C, C // n_head, bias=False)
    if residual:
        block = heads + linear(C, C) + linear(C, 4 * C) + linear(4 * C, C) + (2 * 2 * C if ln else 0)
    else:
        block = heads + (linear(C, C) if ffwd else 0)
    return V * C + T * C + n_layer * block + (2 * C if ln else 0) + linear(C, V)


# (C, T, n_head, n_layer, feed-forward, residual, LayerNorm) of each stage after the bigram
LECTURE_STAGES = {
    "01_single_head": (32, 8, 1, 1, False, False, False),
    "02_multi_head": (32, 8, 4, 1, False, False, False),
    "03_feed_forward": (32, 8, 4, 1, True, False, False),
    "04_residual": (32, 8, 4, 3, True, True, False),
    "05_layernorm": (32, 8, 4, 3, True, True, True),
    "06_scaled_up": (384, 256, 6, 6, True, True, True),
}


def stage_config(stage: str) -> dict:
    return yaml.safe_load((ROOT / "configs" / "lecture" / f"{stage}.yaml").read_text())


def stage_model(stage: str) -> torch.nn.Module:
    config = stage_config(stage)
    return GPTModule(vocab_size=V, block_size=config["data"]["block_size"], **config["model"]).model


def test_lecture_counts_match_the_lecture_printout():
    assert lecture_params(*LECTURE_STAGES["06_scaled_up"]) == 10_788_929  # "10.788929 M parameters"


@pytest.mark.parametrize("stage", list(LECTURE_STAGES))
def test_stage_builds_the_lecture_architecture(stage):
    C, T, n_head, n_layer, ffwd, residual, ln = LECTURE_STAGES[stage]
    model = stage_model(stage)
    # Every Linear here has a bias (bias: true) but the LM head, which never has one: the lecture's key, query and
    # value have none and its lm_head has one.
    assert model.num_params() == lecture_params(*LECTURE_STAGES[stage]) + n_layer * 3 * C - V
    assert (model.config.n_embd, model.config.block_size, model.config.n_head) == (C, T, n_head)
    assert len(model.transformer.h) == n_layer
    assert all(type(b) is (Block if residual else PlainBlock) for b in model.transformer.h)
    assert isinstance(model.transformer.ln_f, torch.nn.LayerNorm) == ln
    assert "wpe" in model.transformer and model.lm_head.weight is not model.transformer.wte.weight
    # PyTorch's own initialisation until the final model, which has gpt.py's N(0, 0.02)
    assert model.transformer.wte.weight.std().item() == pytest.approx(0.02 if C == 384 else 1.0, rel=0.2)
    if ffwd:
        mlp = model.transformer.h[0].mlp
        assert isinstance(mlp.act, torch.nn.ReLU) and mlp.c_fc.out_features == (4 if residual else 1) * C


def test_bigram_stage_is_a_lookup_table_with_loss_ln_vocab_at_init(small_corpus):
    model = stage_model("00_bigram")
    assert isinstance(model, BigramLanguageModel) and model.num_params() == V * V
    data = TextDataModule(path=str(small_corpus), block_size=8, batch_size=32)
    data.setup("fit")
    x = torch.from_numpy(data.val_tokens[:800].astype("int64")).view(100, 8)
    logits, loss = model(x, x)
    assert logits.shape == (100, 8, V)
    assert loss.item() == pytest.approx(math.log(V), abs=1e-3)
    assert torch.equal(model.logits(model.hidden_states(x)), model.token_embedding_table.weight[x])


def train_stage(stage: str, root: Path, corpus: Path, *args: str) -> None:
    main(["--config", str(ROOT / "configs" / "lecture" / f"{stage}.yaml"), "--data.path", str(corpus),
          "--trainer.default_root_dir", str(root), "--trainer.enable_progress_bar", "false",
          "--trainer.enable_model_summary", "false", "--trainer.max_steps", "2", "--trainer.val_check_interval", "2",
          "--trainer.limit_val_batches", "2", "--trainer.num_sanity_val_steps", "0", "--model.sample_tokens", "5",
          "--data.batch_size", "2", *args])  # fmt: skip


# 06's 10.8M parameters take 10-20 s of CPU for two steps and their checkpoints, even over a context of 8
TRAINED = [pytest.param(s, marks=pytest.mark.slow) if s == "06_scaled_up" else s for s in STAGES]


@pytest.mark.parametrize("stage", TRAINED)
def test_lecture_config_trains(stage, tmp_path, small_corpus):
    train_stage(stage, tmp_path, small_corpus, *(["--data.block_size", "8"] if stage == "06_scaled_up" else []))
    checkpoint = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert checkpoint["global_step"] == 2
    hparams = checkpoint["hyper_parameters"]
    assert hparams["learning_rate"] == hparams["min_lr"] and hparams["warmup_steps"] == 0  # constant, as the lecture's
    if stage == "00_bigram":
        model, tokenizer = load_checkpoint(tmp_path / "checkpoints" / "last.ckpt")
        assert isinstance(model, BigramLanguageModel) and model.config == BigramConfig(tokenizer.vocab_size, 8)
        assert model.token_embedding_table.weight.abs().sum() > 0  # trained away from its zeros
        idx = torch.tensor([tokenizer.encode("ROMEO:")])
        out = generate(model, idx, 20, Sampling(top_k=10), generator=torch.Generator().manual_seed(0))
        assert tokenizer.decode(out[0].tolist()).startswith("ROMEO:") and out.shape == (1, 26)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--model.feed_forward", "false"], "--model: residual connections come with the feed-forward"),
        (["--model.residual", "false"], "--model: normalisation comes after residual connections"),
        (["--model.arch", "trigram"], "model.arch\": Expected a typing.Literal['gpt', 'bigram']. Got value: trigram"),
    ],
)
def test_option_combination_no_stage_has(args, message, tmp_path, small_corpus, capsys):
    with pytest.raises(SystemExit) as exit:
        train_stage("05_layernorm", tmp_path, small_corpus, *args)
    assert exit.value.code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0]
    assert not (tmp_path / "checkpoints").exists()
