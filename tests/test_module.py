import math

import lightning as L
import pytest
import torch
import torch.nn.functional as F

from tinygpt_pl.data.datamodule import TextDataModule
from tinygpt_pl.training.module import GPTModule, cosine_lr


def test_cosine_schedule_warms_up_then_decays_to_min_lr():
    lr = [cosine_lr(s, 1e-3, 1e-4, warmup_steps=100, decay_steps=2000) for s in range(2500)]
    assert lr[0] == pytest.approx(1e-3 / 101) and lr[99] == pytest.approx(1e-3 * 100 / 101)
    assert lr[100] == pytest.approx(1e-3)
    assert lr[1050] == pytest.approx(1e-4 + 0.5 * 9e-4)
    assert all(a >= b for a, b in zip(lr[100:], lr[101:], strict=False))
    assert lr[2000] == lr[2499] == 1e-4


def test_weight_decay_only_on_matrices():
    module = GPTModule(n_layer=1, n_head=2, n_embd=16, block_size=8, bias=True)
    module.trainer = L.Trainer(max_steps=10, logger=False)
    config = module.configure_optimizers()
    decay, no_decay = config["optimizer"].param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() == 2 for p in decay["params"]) and all(p.dim() == 1 for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(module.parameters()))


def test_adamw_is_fused_on_a_cpu_too_and_steps_as_the_foreach_one_does():
    """The fused AdamW (3x faster than foreach on a CPU for the CPU recipe's model) on every device; its steps are the
    foreach AdamW's to rounding."""
    module = GPTModule(n_layer=1, n_head=2, n_embd=16, block_size=8, bias=True)
    module.trainer = L.Trainer(max_steps=10, logger=False)
    fused = module.configure_optimizers()["optimizer"]
    assert fused.defaults["fused"] is True
    copies = {p: p.detach().clone().requires_grad_() for p in module.parameters()}
    hyper = ("lr", "betas", "weight_decay")
    groups = [{"params": [copies[p] for p in g["params"]], **{k: g[k] for k in hyper}} for g in fused.param_groups]
    foreach = torch.optim.AdamW(groups, foreach=True)
    assert not foreach.param_groups[0]["fused"]
    generator = torch.Generator().manual_seed(0)
    for _ in range(3):
        for p, copy in copies.items():
            p.grad = torch.randn(p.shape, generator=generator)
            copy.grad = p.grad.clone()
        fused.step()
        foreach.step()
    for p, copy in copies.items():
        torch.testing.assert_close(p, copy, rtol=1e-6, atol=1e-7)


def test_weight_decay_refuses_parameter_names_it_does_not_know():
    """Decay is chosen by the names of the unwrapped model; a wrapper that renames them must not go unnoticed."""
    module = GPTModule(n_layer=1, n_head=2, n_embd=16, block_size=8)
    module.trainer = L.Trainer(max_steps=10, logger=False)
    module.model = torch.nn.ModuleDict({"wrapper": module.model})
    with pytest.raises(RuntimeError, match=r"parameter names changed since it was built \(transformer.h.0"):
        module.configure_optimizers()


@pytest.fixture
def small(tmp_path, corpus) -> tuple[TextDataModule, GPTModule]:
    """A 20,000-character corpus in blocks of 48 and a one-layer GPT for it."""
    path = tmp_path / "small.txt"
    path.write_text(corpus.read_text()[:20_000])
    dm = TextDataModule(path=str(path), block_size=48, batch_size=5)
    return dm, GPTModule(vocab_size=dm.vocab_size, block_size=48, n_layer=1, n_head=2, n_embd=16, dropout=0.0)


def validate(module: GPTModule, dm: TextDataModule, **trainer_args) -> dict[str, float]:
    """What Trainer.validate reports for the module over the datamodule's val split."""
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                        enable_checkpointing=False, **trainer_args)  # fmt: skip
    (result,) = trainer.validate(module, datamodule=dm, verbose=False)
    return result


def test_val_loss_is_the_exact_token_mean_over_the_whole_split(small):
    dm, module = small
    result = validate(module, dm)

    ids = torch.tensor(dm.val_tokens.astype("int64"))
    with torch.no_grad():
        total, count = 0.0, 0
        for start in range(0, len(ids) - 1, 48):
            x = ids[start : start + 48][: len(ids) - 1 - start]
            y = ids[start + 1 : start + 49]
            logits, _ = module.model(x[None])
            total += F.cross_entropy(logits[0], y, reduction="sum").item()
            count += len(y)
    assert count == len(ids) - 1
    assert result["val/loss"] == pytest.approx(total / count, rel=1e-5)
    assert result["val/ppl"] == pytest.approx(math.exp(total / count), rel=1e-5)


def test_a_nan_in_some_validation_batches_makes_val_loss_nan(small):
    """A model that computes NaN for one character shows it in val/loss, instead of its batches being left out of the
    mean (torchmetrics' default), which would report a finite loss for a broken model."""
    dm, module = small
    dm.setup("validate")
    val_blocks = torch.tensor(dm.val_tokens.astype("int64"))[: len(dm.val_tokens) // 48 * 48].view(-1, 48)
    blocks_with = torch.stack([(val_blocks == token).any(dim=1).sum() for token in range(dm.vocab_size)])
    rare = int(torch.where(blocks_with > 0, blocks_with, len(val_blocks)).argmin())
    assert 0 < blocks_with[rare] < len(val_blocks) / 2  # a character in some validation blocks only
    with torch.no_grad():  # its input embedding only: untied from the LM head, whose row would be NaN everywhere
        module.model.lm_head.weight = torch.nn.Parameter(module.model.lm_head.weight.clone())
        module.model.transformer.wte.weight[rare] = float("nan")
    result = validate(module, dm)
    assert math.isnan(result["val/loss"]), result


def test_val_loss_of_a_bf16_model_sums_its_batch_losses_in_fp32(small):
    """Under bf16-true, each batch's loss is a bf16 number; the split's sum of loss x tokens is taken in fp32 (in bf16
    the product alone loses up to 128 on 12,288 tokens of a loss near 3)."""
    dm, module = small
    result = validate(module, dm, precision="bf16-true")

    total, count = 0.0, 0
    with torch.no_grad():
        for x, y in dm.val_dataloader():
            _, loss = module.model(x, y)
            assert loss.dtype == torch.bfloat16
            tokens = int((y != -1).sum())
            total, count = total + loss.item() * tokens, count + tokens
    assert result["val/loss"] == pytest.approx(total / count, rel=1e-6)
