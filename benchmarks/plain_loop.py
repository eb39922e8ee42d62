"""The plain PyTorch training loop the benchmarks hold the project against: nanoGPT's loop, written out by hand.

It reuses the package's GPT, training batches and learning-rate schedule, so only the loop itself differs from
train.py: no Trainer, no callbacks, no logging machinery.
"""

import contextlib
from collections.abc import Mapping
from dataclasses import fields

import torch

from tinygpt_pl.data.batches import train_batch
from tinygpt_pl.data.datamodule import TextDataModule
from tinygpt_pl.model import GPT, GPTConfig
from tinygpt_pl.training.module import cosine_lr


def build(hp: Mapping, device: torch.device, precision: str) -> tuple[GPT, torch.optim.AdamW]:
    """The GPT of the hyperparameters hp (GPTModule's arguments) on device, and AdamW with weight decay on the
    matrices only, fused on CUDA, as nanoGPT's configure_optimizers does."""
    model = GPT(GPTConfig(**{f.name: hp[f.name] for f in fields(GPTConfig)})).to(device)
    if precision == "bf16-true":
        model = model.to(torch.bfloat16)
    if hp["compile"]:
        model.compile()
    groups = [
        {"params": [p for p in model.parameters() if p.dim() >= 2], "weight_decay": float(hp["weight_decay"])},
        {"params": [p for p in model.parameters() if p.dim() < 2], "weight_decay": 0.0},
    ]
    optimizer = torch.optim.AdamW(
        groups, lr=float(hp["learning_rate"]), betas=tuple(hp["betas"]), fused=device.type == "cuda"
    )
    return model, optimizer


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    return torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16-mixed" else contextlib.nullcontext()


def train_step(
    model: GPT,
    optimizer: torch.optim.Optimizer,
    data: TextDataModule,
    step: int,
    hp: Mapping,
    decay_steps: int,
    accumulate: int,
    clip: float | None,
    precision_context: contextlib.AbstractContextManager,
) -> torch.Tensor:
    """Optimizer step `step` (0-based) over `accumulate` micro-batches; the last micro-batch's loss."""
    lr = cosine_lr(step, float(hp["learning_rate"]), float(hp["min_lr"]), hp["warmup_steps"], decay_steps)
    for group in optimizer.param_groups:
        group["lr"] = lr
    device = next(model.parameters()).device
    for k in range(accumulate):
        x, y = train_batch(data.train_tokens, data.block_size, data.batch_size, data.seed, step, k, accumulate)
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with precision_context:
            _, loss = model(x, y)
        (loss / accumulate).backward()
    if clip:
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.detach()
