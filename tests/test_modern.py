"""The modern recipe: each architecture option does what it names while the default stays nanoGPT's GPT, Muon with
AdamW trains the right parameters and resumes exactly (one process and 2 DDP processes), the warm-up-stable-decay
schedule has its shape, and combinations that cannot work are refused in one line."""

import math
import shutil
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from conftest import train
from test_bad_input import assert_one_error_line
from test_model import tiny
from test_scale import DDP, EVERY_STEP, FSDP

from tinygpt_pl.data.datamodule import TextDataModule
from tinygpt_pl.errors import UsageError
from tinygpt_pl.model import GPT, RotaryEmbedding
from tinygpt_pl.training.fsdp import fsdp_strategy
from tinygpt_pl.training.module import GPTModule, cosine_lr, wsd_lr
from tinygpt_pl.training.optim import Muon, MuonWithAdamW, orthogonalize


def nanogpt_logits(model: GPT, idx: torch.Tensor) -> torch.Tensor:
    """nanoGPT's forward pass written out with the model's weights: learned positions, pre-LayerNorm Blocks with exact
    GELU, attention as softmax(q k^T / sqrt(d)) masked to the past, the head tied to the token embedding."""
    t, n_head = idx.size(1), model.config.n_head
    sd = {k.removeprefix("transformer."): v for k, v in model.state_dict().items()}
    x = sd["wte.weight"][idx] + sd["wpe.weight"][:t]
    for i in range(model.config.n_layer):
        w = {k.removeprefix(f"h.{i}."): v for k, v in sd.items() if k.startswith(f"h.{i}.")}
        h = F.layer_norm(x, x.shape[-1:], w["ln_1.weight"])
        q, k, v = (z.unflatten(-1, (n_head, -1)).transpose(1, 2) for z in (h @ w["attn.c_attn.weight"].T).chunk(3, -1))
        scores = (q @ k.transpose(-2, -1) / math.sqrt(q.size(-1))).masked_fill(~torch.ones(t, t).tril().bool(), -1e9)
        x = x + (scores.softmax(-1) @ v).transpose(1, 2).flatten(2) @ w["attn.c_proj.weight"].T
        h = F.layer_norm(x, x.shape[-1:], w["ln_2.weight"])
        x = x + F.gelu(h @ w["mlp.c_fc.weight"].T) @ w["mlp.c_proj.weight"].T
    return F.layer_norm(x, x.shape[-1:], sd["ln_f.weight"]) @ sd["wte.weight"].T


def test_the_default_model_is_nanogpts():
    model = tiny().eval()
    idx = torch.randint(0, 65, (2, 16))
    torch.testing.assert_close(model(idx)[0], nanogpt_logits(model, idx), rtol=1e-4, atol=1e-5)


class Offset:
    """A KVCache that says `length` positions came before but holds none: the sequence starts at position length."""

    def __init__(self, length: int) -> None:
        self.length = length

    def update(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return k, v


def test_rotary_scores_depend_only_on_relative_position():
    rotary = RotaryEmbedding(head_size=8, block_size=32)
    q, k = torch.randn(2, 1, 1, 1, 8)  # one query and one key of one head

    def score(i: int, j: int) -> torch.Tensor:
        return (rotary(q, torch.tensor([[i]])) * rotary(k, torch.tensor([[j]]))).sum()

    torch.testing.assert_close(score(3, 1), score(12, 10))
    torch.testing.assert_close(score(3, 1), score(25, 23))
    assert not torch.allclose(score(3, 1), score(3, 2))


def test_rotary_model_has_no_position_weights_and_is_the_same_anywhere_in_the_context():
    idx = torch.randint(0, 65, (2, 8))
    rotary = tiny(pos_emb="rotary").eval()
    assert not any("wpe" in name for name in rotary.state_dict())
    later = [Offset(6) for _ in rotary.transformer.h]
    torch.testing.assert_close(rotary.hidden_states(idx, later), rotary.hidden_states(idx), rtol=1e-5, atol=1e-5)
    learned = tiny().eval()
    assert not torch.allclose(learned.hidden_states(idx, later), learned.hidden_states(idx), atol=1e-3)


def test_qk_norm_normalises_each_heads_queries_and_keys():
    model = tiny(qk_norm=True).eval()
    seen = []
    model.transformer.h[1].attn.qk_norm.register_forward_hook(lambda module, args, out: seen.append(out))
    idx = torch.randint(0, 65, (2, 16))
    logits, _ = model(idx)
    assert len(seen) == 2 and seen[0].shape == (2, 4, 16, 8)  # queries, keys: (B, n_head, T, head_size)
    for q_or_k in seen:
        torch.testing.assert_close(q_or_k.square().mean(-1), torch.ones(2, 4, 16), rtol=1e-4, atol=1e-4)
    assert not torch.allclose(logits, tiny().eval()(idx)[0])  # the same weights without it


def test_rmsnorm_scales_to_unit_rms_without_centring():
    norm = tiny(norm="rmsnorm").transformer.h[0].ln_1
    x = torch.randn(4, 32) + 2
    y = norm(x)
    torch.testing.assert_close(y, x / x.square().mean(-1, keepdim=True).sqrt(), rtol=1e-5, atol=1e-5)
    assert (y.mean(-1).abs() > 0.1).all()  # LayerNorm would centre it


def test_relu2_feed_forward_computes_relu_squared():
    mlp = tiny(activation="relu2").transformer.h[0].mlp
    x = torch.randn(3, 32)
    torch.testing.assert_close(mlp(x), mlp.c_proj(F.relu(mlp.c_fc(x)) ** 2))


def test_untied_head_and_embedding_are_two_matrices_that_both_train():
    tied = tiny()
    assert tied.lm_head.weight is tied.transformer.wte.weight
    model = tiny(tie_weights=False)
    head, embedding = model.lm_head.weight, model.transformer.wte.weight
    assert head.data_ptr() != embedding.data_ptr() and not torch.equal(head, embedding)
    before = head.detach().clone(), embedding.detach().clone()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    idx = torch.randint(0, 65, (2, 16))
    model(idx, idx)[1].backward()
    optimizer.step()
    assert not torch.equal(head, before[0]) and not torch.equal(embedding, before[1])
    assert model.num_params() == tiny().num_params() + 65 * 32


def test_zero_init_makes_every_block_the_identity():
    x = torch.randn(2, 16, 32)
    for block in tiny(zero_init_proj=True).transformer.h:
        torch.testing.assert_close(block(x), x, rtol=0, atol=0)
    assert not torch.allclose(tiny().transformer.h[0](x), x)


def test_softcap_bounds_the_logits():
    model = tiny(logit_softcap=5.0).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(100)
    idx = torch.randint(0, 65, (2, 16))
    raw = model.lm_head(model.hidden_states(idx))
    logits, _ = model(idx)
    assert raw.abs().max() > 20 and logits.abs().max() <= 5
    torch.testing.assert_close(logits, 5 * torch.tanh(raw / 5))


def test_wsd_schedule_warms_up_holds_then_decays_linearly():
    lr = [wsd_lr(s, 1e-3, 1e-4, warmup_steps=100, decay_steps=2000, decay_fraction=0.2) for s in range(2200)]
    assert lr[:100] == [cosine_lr(s, 1e-3, 1e-4, 100, 2000) for s in range(100)]  # the same warm-up
    assert set(lr[100:1601]) == {1e-3}  # stable until the last 20% of the 2000 steps
    assert lr[1800] == pytest.approx(1e-3 - 0.5 * 9e-4) and lr[1999] == pytest.approx(1e-4 + 9e-4 / 400)
    assert lr[2000] == lr[2199] == 1e-4


def configured(**hparams) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler, GPTModule]:
    module = GPTModule(n_layer=2, n_head=2, n_embd=16, block_size=8, **hparams)
    module.trainer = L.Trainer(max_steps=10, logger=False)
    config = module.configure_optimizers()
    return config["optimizer"], config["lr_scheduler"]["scheduler"], module


def test_muon_trains_the_blocks_matrices_and_adamw_the_rest():
    optimizer, scheduler, module = configured(optimizer="muon", tie_weights=False, bias=True, muon_lr=0.05,
                                              lr_schedule="wsd", warmup_steps=0)  # fmt: skip
    adamw, muon = optimizer.optimizers
    assert isinstance(optimizer, MuonWithAdamW) and isinstance(muon, Muon)
    names = {p: name for name, p in module.model.named_parameters()}
    in_muon = {names[p] for group in muon.param_groups for p in group["params"]}
    matrices = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
    assert in_muon == {f"transformer.h.{i}.{m}.weight" for i in (0, 1) for m in matrices}
    decay, no_decay = ({names[p] for p in group["params"]} for group in adamw.param_groups)
    assert decay == {"transformer.wte.weight", "transformer.wpe.weight", "lm_head.weight"}
    assert no_decay == {name for name, p in module.model.named_parameters() if p.dim() == 1}
    assert [g["lr"] for g in optimizer.param_groups] == [1e-3, 1e-3, 0.05]  # each group its own peak
    for _ in range(10):  # to the end of the schedule (trainer.max_steps): min_lr, 0.1 of each peak
        scheduler.step()
    assert [g["lr"] for g in muon.param_groups] == [pytest.approx(0.005)]
    assert [g["lr"] for g in adamw.param_groups] == [pytest.approx(1e-4)] * 2


def test_muon_on_a_cpu_steps_as_torchs_muon_with_a_float32_iteration():
    torch.manual_seed(0)
    start = [torch.randn(48, 16), torch.randn(16, 48), torch.randn(48, 16)]
    ours, theirs = ([w.clone().requires_grad_() for w in start] for _ in range(2))
    optimizers = Muon(ours, lr=0.05, weight_decay=0.1), torch.optim.Muon(theirs, lr=0.05, weight_decay=0.1)
    for _ in range(3):
        for w, g in zip(ours + theirs, [torch.randn_like(w) for w in start] * 2, strict=True):
            w.grad = g
        for optimizer in optimizers:
            optimizer.step()
        for a, b, w0 in zip(ours, theirs, start, strict=True):
            assert (b - w0).abs().max() > 0.02  # they move, and in the same way up to bfloat16's rounding
            torch.testing.assert_close(a, b, rtol=0, atol=2e-3)
    assert set(optimizers[0].state[ours[0]]) == set(optimizers[1].state[theirs[0]]) == {"momentum_buffer"}

    g, coefficients = torch.randn(48, 16), (3.4445, -4.775, 2.0315)  # torch's defaults, 5 steps
    x = g.double().T / g.double().norm()
    for _ in range(5):
        gram = x @ x.T
        x = coefficients[0] * x + (coefficients[1] * gram + coefficients[2] * gram @ gram) @ x
    torch.testing.assert_close(orthogonalize(g[None], coefficients, 5, 1e-7)[0], x.T.float(), rtol=0, atol=1e-5)
    stacked = orthogonalize(torch.stack([g, 2 * g, -g]), coefficients, 5, 1e-7)  # each matrix on its own
    torch.testing.assert_close(stacked, torch.stack([x.T.float(), x.T.float(), -x.T.float()]), rtol=0, atol=1e-5)


def fit(corpus: Path, max_steps: int, ckpt_path: Path | None = None) -> L.Trainer:
    """Muon + AdamW on a tiny GPT, 2 micro-batches a step, clipped, on the WSD schedule; in this process."""
    data = TextDataModule(path=str(corpus), block_size=16, batch_size=4)
    torch.manual_seed(0)
    module = GPTModule(vocab_size=data.vocab_size, block_size=16, n_layer=2, n_head=2, n_embd=16, dropout=0.0,
                       optimizer="muon", lr_schedule="wsd", warmup_steps=2, lr_decay_steps=8)  # fmt: skip
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=max_steps, accumulate_grad_batches=2,
                        gradient_clip_val=0.5, limit_val_batches=0, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)  # fmt: skip
    trainer.fit(module, datamodule=data, ckpt_path=ckpt_path)
    return trainer


def assert_same_tensors(a: dict, b: dict) -> None:
    """Two (nested) state dicts hold the same tensors, bit for bit."""
    assert a.keys() == b.keys()
    for key, value in a.items():
        if isinstance(value, dict):
            assert_same_tensors(value, b[key])
        elif isinstance(value, torch.Tensor):
            torch.testing.assert_close(b[key], value, rtol=0, atol=0, msg=key)


def test_muon_with_adamw_resumes_exactly_in_one_process(tmp_path: Path, small_corpus: Path) -> None:
    whole = fit(small_corpus, 8)
    first = fit(small_corpus, 4)
    first.save_checkpoint(tmp_path / "step4.ckpt")
    state = torch.load(tmp_path / "step4.ckpt", weights_only=True)["optimizer_states"][0]
    muon_state = state["state"][len(state["param_groups"][0]["params"]) + len(state["param_groups"][1]["params"])]
    assert muon_state["momentum_buffer"].abs().sum() > 0  # Muon's momentum is in the checkpoint beside AdamW's moments
    resumed = fit(small_corpus, 8, tmp_path / "step4.ckpt")
    assert resumed.global_step == whole.global_step == 8
    assert_same_tensors(whole.lightning_module.state_dict(), resumed.lightning_module.state_dict())
    assert_same_tensors(whole.optimizers[0].state_dict()["state"], resumed.optimizers[0].state_dict()["state"])
    assert whole.optimizers[0].param_groups[2]["lr"] == resumed.optimizers[0].param_groups[2]["lr"]


MUON = ["--model.optimizer", "muon", "--model.muon_lr", "0.05", "--model.lr_schedule", "wsd", "--model.warmup_steps",
        "1", "--checkpoint.save_top_k", "-1"]  # fmt: skip


@pytest.mark.slow  # two 2-process runs: about a minute; test_muon_with_adamw_resumes_exactly_in_one_process is fast
def test_muon_with_adamw_resumes_exactly_on_two_ddp_processes(tmp_path: Path, small_corpus: Path) -> None:
    """A 2-process run of 4 steps keeps its checkpoint of step 2; that checkpoint resumed on 2 processes ends where
    the run ended: the same weights and optimizer state (Muon's momentum, AdamW's moments), bit for bit."""
    run, resumed = tmp_path / "run", tmp_path / "resumed"
    result = train(run, small_corpus, *EVERY_STEP, *DDP, *MUON, "--trainer.max_steps", "4")
    assert result.returncode == 0, result.stderr
    (step2,) = (run / "checkpoints").glob("best-step2-*.ckpt")
    result = train(resumed, small_corpus, *EVERY_STEP, *DDP, *MUON, "--trainer.max_steps", "4",
                   "--ckpt_path", str(shutil.copy(step2, tmp_path / "step2.ckpt")))  # fmt: skip
    assert result.returncode == 0, result.stderr
    whole, split = (torch.load(root / "checkpoints" / "last.ckpt", weights_only=True) for root in (run, resumed))
    assert whole["global_step"] == split["global_step"] == 4
    assert_same_tensors(whole["state_dict"], split["state_dict"])
    assert_same_tensors(whole["optimizer_states"][0]["state"], split["optimizer_states"][0]["state"])


def test_options_that_cannot_work_together_are_refused():
    with pytest.raises(UsageError, match="skip_nonfinite_steps .* does not work with --model.optimizer muon"):
        GPTModule(optimizer="muon", skip_nonfinite_steps=True)
    with pytest.raises(UsageError, match=r"--model.decay_fraction must be in \(0, 1\], got 0"):
        GPTModule(lr_schedule="wsd", decay_fraction=0)
    module = GPTModule(n_layer=1, n_head=2, n_embd=16, block_size=8, optimizer="muon")
    module.trainer = L.Trainer(accelerator="cpu", devices=2, strategy=fsdp_strategy(gpu=False), logger=False)
    with pytest.raises(UsageError, match="whole matrices, which FSDP shards: use --trainer.strategy ddp"):
        module.configure_optimizers()


def test_a_checkpoint_resumes_only_with_the_optimizer_it_was_trained_with():
    adamw = GPTModule(n_layer=1, n_head=2, n_embd=16, block_size=8)
    muon = GPTModule(n_layer=1, n_head=2, n_embd=16, block_size=8, optimizer="muon")
    muon.trainer = L.Trainer(logger=False)
    with pytest.raises(UsageError, match="optimizer state is adamw's, not muon's: resume with --model.optimizer adamw"):
        muon.on_load_checkpoint({"hyper_parameters": dict(adamw.hparams)})


@pytest.mark.slow  # 2 processes; test_options_that_cannot_work_together_are_refused refuses in this process
def test_fsdp_with_muon_is_refused_in_one_line(tmp_path: Path, small_corpus: Path) -> None:
    """Refused before the processes start (cli.py), else each process would print the line."""
    result = train(tmp_path / "run", small_corpus, *FSDP, "--model.optimizer", "muon")
    assert_one_error_line(result, "FSDP shards", "--trainer.strategy ddp")
