"""The LightningModule: the GPT with its optimizer, learning-rate schedule and validation loss."""

import math
from dataclasses import fields
from functools import partial
from typing import Literal

import lightning as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.strategies import FSDPStrategy
from torchmetrics import SumMetric

from tinygpt_pl.errors import UsageError
from tinygpt_pl.evaluation.training import TrainingEvaluation
from tinygpt_pl.generation.generate import Sampling, generate
from tinygpt_pl.load import build_model
from tinygpt_pl.model import GPTConfig
from tinygpt_pl.training.init_from import check_tokenizer, init_from_hparams, init_from_state
from tinygpt_pl.training.optim import Muon, MuonWithAdamW, check_optimizer_strategy, renumber_optimizer_state
from tinygpt_pl.training.safety.nonfinite import NonFiniteGuard

# what a checkpoint's weights fix, with the value of a checkpoint written before the option existed
SHAPE_DEFAULTS = {"arch": "gpt", **{f.name: f.default for f in fields(GPTConfig) if f.name != "dropout"}}


def cosine_lr(step: int, learning_rate: float, min_lr: float, warmup_steps: int, decay_steps: int) -> float:
    """Linear warm-up to learning_rate, then cosine decay to min_lr at decay_steps, then min_lr."""
    if step < warmup_steps:
        return learning_rate * (step + 1) / (warmup_steps + 1)
    if step >= decay_steps:
        return min_lr
    progress = (step - warmup_steps) / (decay_steps - warmup_steps)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (learning_rate - min_lr)


def wsd_lr(
    step: int, learning_rate: float, min_lr: float, warmup_steps: int, decay_steps: int, decay_fraction: float
) -> float:
    """Warm-up, stable, decay: cosine_lr's warm-up, then learning_rate until the last decay_fraction of decay_steps,
    then a linear decay to min_lr at decay_steps, then min_lr."""
    if step < warmup_steps or step >= decay_steps:
        return cosine_lr(step, learning_rate, min_lr, warmup_steps, decay_steps)
    decay_start = max(warmup_steps, decay_steps * (1 - decay_fraction))
    progress = max(0.0, step - decay_start) / (decay_steps - decay_start)
    return learning_rate + progress * (min_lr - learning_rate)


class GPTModule(L.LightningModule):
    """Trains a GPT: next-token cross-entropy, AdamW (or Muon with AdamW), warm-up + cosine (or warm-up-stable-decay)
    schedule stepped per optimizer step.

    Args:
        vocab_size, block_size: set from the data (linked by the CLI).
        arch: gpt, or the lecture's bigram model (bigram.py), which ignores the options of the GPT's shape.
        init: the GPT's initialisation: gpt2 (N(0, 0.02), residual projections scaled down; GPT.__init__), or pytorch:
            each layer's own default, as the lecture's stages before its final model have it (build_model).
        n_layer, n_head, n_embd, dropout, bias: the Transformer's shape (see GPTConfig).
        activation, pos_emb, feed_forward, residual, norm: the lecture's stages and GPT-2's GELU (see GPTConfig).
        qk_norm, tie_weights, zero_init_proj, logit_softcap: the modern recipe's model options (see GPTConfig).
        init_from: start from a model's weights: a train.py checkpoint (path/to/last.ckpt; its tokenizer becomes the
            data's), OpenAI's GPT-2 (gpt2, gpt2-medium, gpt2-large, gpt2-xl, from the Hugging Face hub, cached) or a
            Hugging Face GPT-2 folder. The model takes their shape and vocabulary (the run's hparams record it), grown
            by the rows the chat template's tokens need, with block_size up to their context (positions cropped) and
            any dropout; the data must use their tokenizer. A new run loads them as it starts (weights only: a new
            optimizer, step 0); a resumed one has its own weights (training/init_from.py).
        learning_rate, min_lr, warmup_steps: the schedule's peak, floor and warm-up length.
        lr_decay_steps: the step at which the schedule reaches min_lr; default trainer.max_steps.
        lr_schedule: cosine (decays from the warm-up on), or wsd: constant after the warm-up, then a linear decay over
            the last decay_fraction of the steps (the speedruns' warm-up-stable-decay).
        weight_decay: applied to 2-D weights (matmuls, embeddings) only, not to biases and LayerNorms.
        betas: AdamW's betas.
        optimizer: adamw, or muon: torch.optim.Muon (float32 on a CPU) for the Blocks' Linear weights (muon_lr,
            muon_momentum, muon_weight_decay) and AdamW for the rest (learning_rate); every group follows the schedule,
            scaled to its own peak (optim.py).
        sample_tokens: length of the text sample logged to TensorBoard at each validation (0: none).
        compile: torch.compile the GPT (in place, so checkpoint keys stay those of the plain model).
        skip_nonfinite_steps: skip a step whose gradients are inf or nan (counted in train/skipped_steps) instead of
            stopping the run; it still stops after max_skips_in_a_row such steps in a row. See safety/nonfinite.py.
        max_skips_in_a_row: how many skipped steps in a row end the run.
        eval_tasks: benchmarks scored at every validation and logged as eval/<task>/<metric> (hellaswag, arc_easy,
            piqa, lambada_openai; evaluation/training.py), each rank its share; eval_limit: only their first N
            examples; eval_task_data: {task: local file} instead of the hub; eval_batch_size: continuations per pass.

    Nothing in a training step waits for the GPU: train/loss, lr and grad_norm are logged only on the steps that log
    (every trainer.log_every_n_steps), and train/loss is then the mean over the whole global batch. A loss or gradient
    norm that turns non-finite is caught on the device and stops the run before any checkpoint or sample is made from
    non-finite weights (safety/nonfinite.py).
    """

    def __init__(
        self,
        vocab_size: int = 65,
        block_size: int = 256,
        arch: Literal["gpt", "bigram"] = "gpt",
        init: Literal["gpt2", "pytorch"] = "gpt2",
        n_layer: int = 6,
        n_head: int = 6,
        n_embd: int = 384,
        dropout: float = 0.2,
        bias: bool = False,
        activation: str = "gelu",
        pos_emb: str = "learned",
        feed_forward: bool = True,
        residual: bool = True,
        norm: str = "layernorm",
        qk_norm: bool = False,
        tie_weights: bool = True,
        zero_init_proj: bool = False,
        logit_softcap: float | None = None,
        init_from: str | None = None,
        learning_rate: float = 1e-3,
        min_lr: float = 1e-4,
        warmup_steps: int = 100,
        lr_decay_steps: int | None = None,
        weight_decay: float = 0.1,
        betas: tuple[float, float] = (0.9, 0.99),
        sample_tokens: int = 200,
        compile: bool = False,
        skip_nonfinite_steps: bool = False,
        max_skips_in_a_row: int = 10,
        optimizer: Literal["adamw", "muon"] = "adamw",
        muon_lr: float = 0.02,
        muon_momentum: float = 0.95,
        muon_weight_decay: float = 0.0,
        lr_schedule: Literal["cosine", "wsd"] = "cosine",
        decay_fraction: float = 0.2,
        eval_tasks: list[str] | None = None,
        eval_limit: int | None = None,
        eval_task_data: dict[str, str] | None = None,
        eval_batch_size: int = 32,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        if optimizer == "muon" and skip_nonfinite_steps:
            raise UsageError(
                "--model.skip_nonfinite_steps skips a step on the device, which only the fused AdamW can: "
                "it does not work with --model.optimizer muon; use one of them"
            )
        if not 0 < decay_fraction <= 1:
            raise UsageError(f"--model.decay_fraction must be in (0, 1], got {decay_fraction}")
        if init_from is not None:
            self.hparams.update(init_from_hparams(init_from, self.hparams))
        self.build()
        # the split's summed loss and token count, summed across DDP ranks: val/loss is their exact ratio. A NaN stays
        # in (torchmetrics' default leaves it out, which shows a broken model a finite loss, after a host sync per
        # batch to find it)
        self.val_loss_sum, self.val_tokens = SumMetric(nan_strategy="disable"), SumMetric(nan_strategy="disable")
        if max_skips_in_a_row < 1:
            raise UsageError(f"--model.max_skips_in_a_row must be >= 1, got {max_skips_in_a_row}")
        self.guard = NonFiniteGuard(skip_nonfinite_steps, max_skips_in_a_row)
        self.step_losses: list[torch.Tensor] = []  # the micro-batch losses of a logging step, kept on the device
        self.evaluation = (
            TrainingEvaluation(eval_tasks, eval_limit, eval_task_data, eval_batch_size) if eval_tasks else None
        )

    def build(self) -> None:
        """The model of the hyperparameters (again in setup, when the data's chat template needs more rows)."""
        try:
            self.model = build_model(self.hparams)
        except ValueError as e:
            raise UsageError(f"--model: {e}") from None
        self.decayed = {name: p.dim() >= 2 for name, p in self.model.named_parameters()}  # matrices, not vectors
        if self.hparams.compile:
            self.model.compile()  # compiles the module's call, not a wrapper: no "_orig_mod." in its state_dict

    def logs_this_step(self) -> bool:
        """Whether the optimizer step under way is one Lightning writes to the logger (the 0-based step s with
        (s + 1) % log_every_n_steps == 0)."""
        every = self.trainer.log_every_n_steps
        return every > 0 and (self.global_step + 1) % every == 0

    def training_step(self, batch: tuple[torch.Tensor, ...], batch_idx: int) -> torch.Tensor:
        _, loss = self.model(*batch)  # x, y, and packed conversations' segments (data/conversations.py)
        self.guard.observe_loss(loss.detach())
        if self.logs_this_step():
            self.step_losses.append(loss.detach())
            if len(self.step_losses) == self.trainer.accumulate_grad_batches:
                # mean over the micro-batches here and over the ranks by sync_dist: the loss of the global batch
                self.log("train/loss", torch.stack(self.step_losses).mean(), sync_dist=True)
                self.log("lr", self.lr_schedulers().get_last_lr()[0])
                self.step_losses.clear()
        return loss

    def on_train_batch_start(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        """At a fit's first micro-batch, make Lightning log this optimizer step under its own index: a resumed run
        restores Lightning's count of logged steps one short or one long, depending on where the checkpoint was
        written (at a validation, at a step end) and on the accumulation."""
        if batch_idx == 0:
            self.trainer.fit_loop.epoch_loop._batches_that_stepped = self.global_step

    def setup(self, stage: str) -> None:
        datamodule = getattr(self.trainer, "datamodule", None)
        init_from = self.hparams.init_from
        if datamodule is None:
            return
        if self.evaluation is not None:
            if isinstance(self.trainer.strategy, FSDPStrategy):
                raise UsageError("--model.eval_tasks does not run on sharded models yet: use --trainer.strategy ddp")
            self.evaluation.prepare(datamodule.tokenizer, self.hparams.block_size)
        if init_from is None:
            return
        check_tokenizer(init_from, datamodule.tokenizer)
        if datamodule.tokenizer.vocab_size > self.hparams.vocab_size:  # the chat template's tokens: more rows
            self.hparams.vocab_size = datamodule.vocab_size
            self.build()

    def on_train_start(self) -> None:
        """A new run from another model's weights loads them here, after Lightning restored any checkpoint (resumed
        runs have their own weights) and through the strategy, which loads them into sharded models too."""
        self.guard.reset(self.device)
        self.trained = [p for p in self.parameters() if p.requires_grad]  # (walking the modules each step costs 1%)
        hp = self.hparams
        if hp.init_from is not None and self.trainer.ckpt_path is None:
            datamodule = getattr(self.trainer, "datamodule", None)
            needed = hp.vocab_size if datamodule is None else datamodule.tokenizer.vocab_size
            state = init_from_state(hp.init_from, hp.block_size, hp.vocab_size, needed)
            self.trainer.strategy.load_model_state_dict({"state_dict": {f"model.{k}": v for k, v in state.items()}})

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """The gradient norm of the whole model (before clipping), for the divergence guard and for clipping at every
        step, logged on the steps that log."""
        grads = [p.grad for p in self.trained if p.grad is not None]
        self.grad_norm = torch.nn.utils.get_total_norm(grads)
        if isinstance(self.trainer.strategy, FSDPStrategy):  # each rank holds a shard of the gradients
            self.grad_norm = self.trainer.strategy.reduce(self.grad_norm.square(), reduce_op="sum").sqrt()
        found_inf = self.guard.observe_step(self.grad_norm, self.global_step + 1)
        if found_inf is not None:
            optimizer.found_inf = found_inf  # the fused AdamW step does nothing where it is 1
        if self.logs_this_step():
            self.log("grad_norm", self.grad_norm)
            if self.guard.skip:
                self.log("train/skipped_steps", self.guard.skipped_steps().float())
            self.guard.check(self.trainer)

    def configure_gradient_clipping(
        self,
        optimizer: torch.optim.Optimizer,
        gradient_clip_val: float | None = None,
        gradient_clip_algorithm: str | None = None,
    ) -> None:
        """Clip by the norm computed for this step (over all shards under FSDP, where Lightning's clipping by norm
        refuses to run) instead of computing it again."""
        if gradient_clip_val and gradient_clip_algorithm != "value":
            torch.nn.utils.clip_grads_with_norm_(self.trained, gradient_clip_val, self.grad_norm)
        else:
            super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)

    def on_validation_start(self) -> None:
        if not self.trainer.sanity_checking:
            self.guard.check(self.trainer)

    def on_validation_epoch_start(self) -> None:
        # sums in fp32 under any precision: bf16-true converts the model with .to(bfloat16), torchmetrics' states too
        for metric in (self.val_loss_sum, self.val_tokens):
            metric.set_dtype(torch.float32)

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        x, y = batch
        _, loss = self.model(x, y)
        tokens = (y != -1).sum()
        self.val_loss_sum.update(loss.float() * tokens)  # in fp32: a bf16 product of loss and tokens loses digits
        self.val_tokens.update(tokens)

    def on_validation_epoch_end(self) -> None:
        val_loss = self.val_loss_sum.compute() / self.val_tokens.compute()
        self.val_loss_sum.reset()
        self.val_tokens.reset()
        # synced already: with rank_zero_only, sync_dist=True runs no collective and tells Lightning not to warn
        log = partial(self.log, rank_zero_only=True, sync_dist=True)
        log("val/loss", val_loss, prog_bar=True)
        log("val/ppl", torch.exp(val_loss))
        # bits per UTF-8 byte of the val text: the split's summed loss in bits over its bytes, which, unlike the loss
        # per token, compares models with different tokenizers
        tokens_per_byte = getattr(getattr(self.trainer, "datamodule", None), "val_tokens_per_byte", None)
        if tokens_per_byte is not None:
            log("val/bpb", val_loss * tokens_per_byte / math.log(2))
        if not self.trainer.sanity_checking:
            self.log_sample()
            if self.evaluation is not None:
                self.evaluation.run(self)

    def log_sample(self) -> None:
        """A short generated text in TensorBoard, sampled with its own RNG so training is unaffected."""
        datamodule = getattr(self.trainer, "datamodule", None)
        if self.hparams.sample_tokens <= 0 or not self.trainer.is_global_zero or datamodule is None:
            return
        if not isinstance(self.logger, TensorBoardLogger):
            return
        tokenizer = datamodule.tokenizer
        generator = torch.Generator(device=self.device).manual_seed(0)
        idx = torch.full((1, 1), tokenizer.eot_id or 0, dtype=torch.long, device=self.device)  # a document's start
        out = generate(self.model, idx, self.hparams.sample_tokens, Sampling(top_k=200),
                       vocab_limit=tokenizer.vocab_size, generator=generator)  # fmt: skip
        text = tokenizer.decode(out[0].tolist())
        self.logger.experiment.add_text("sample", f"```\n{text}\n```", self.global_step)

    def optimizer_layout(self, names: list[str]) -> list[list[str]]:
        """The parameters (by name, in model order) of each optimizer group, in the order the optimizer's state
        numbers them: AdamW's weight-decayed ones, AdamW's others, then Muon's hidden matrices (if Muon)."""
        muon = self.hparams.optimizer == "muon"
        hidden = [name for name in names if muon and name.startswith("transformer.h.") and self.decayed[name]]
        decay = [name for name in names if self.decayed[name] and name not in hidden]
        return [decay, [name for name in names if not self.decayed[name]], hidden]

    def configure_optimizers(self) -> dict:
        # by name, as shapes were before any wrapping: FSDP shows each parameter as a flat 1-D shard here
        params = {name.replace("_fsdp_wrapped_module.", ""): p for name, p in self.model.named_parameters()}
        if changed := sorted(params.keys() ^ self.decayed.keys()):
            raise RuntimeError(
                f"the model's parameter names changed since it was built ({changed[0]}): a new wrapper around it? "
                "weight decay is chosen by those names"
            )
        hp = self.hparams
        muon = hp.optimizer == "muon"
        check_optimizer_strategy(hp.optimizer, fsdp=isinstance(self.trainer.strategy, FSDPStrategy))
        trained = {name: p for name, p in params.items() if p.requires_grad}
        decay, no_decay, hidden = self.optimizer_layout(list(trained))
        groups = [
            {"params": [trained[name] for name in decay], "weight_decay": hp.weight_decay},
            {"params": [trained[name] for name in no_decay], "weight_decay": 0.0},
        ]
        # fused: one kernel per step on GPUs, 3x faster than foreach on a CPU; also the only AdamW that can skip a step
        # on the device (found_inf)
        optimizer = torch.optim.AdamW(groups, lr=hp.learning_rate, betas=tuple(hp.betas), fused=True)
        if muon:
            if not hidden:
                raise UsageError("--model.optimizer muon: this model has no Blocks for Muon to train: use adamw")
            matrices = [trained[name] for name in hidden]
            kwargs = dict(lr=hp.muon_lr, momentum=hp.muon_momentum, weight_decay=hp.muon_weight_decay)
            optimizer = MuonWithAdamW(optimizer, Muon(matrices, **kwargs))
        decay_steps = hp.lr_decay_steps or self.trainer.max_steps
        if decay_steps <= 0:
            raise UsageError("the schedule needs an end: set --trainer.max_steps or --model.lr_decay_steps")
        schedule = partial(wsd_lr, decay_fraction=hp.decay_fraction) if hp.lr_schedule == "wsd" else cosine_lr

        def lr_lambda(step: int) -> float:
            """The schedule as a factor of each group's peak (learning_rate for AdamW, muon_lr for Muon)."""
            return schedule(step, hp.learning_rate, hp.min_lr, hp.warmup_steps, decay_steps) / hp.learning_rate

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        self.guard.check(self.trainer)  # a diverged run stops here, before the file is written
        checkpoint["fsdp"] = isinstance(self.trainer.strategy, FSDPStrategy)  # see cli.check_resume
        if self.guard.skip:
            checkpoint["skipped_steps"] = int(self.guard.skipped_steps())

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.guard.skipped_before = checkpoint.get("skipped_steps", 0)
        datamodule = getattr(self.trainer, "datamodule", None)
        if datamodule is not None and type(datamodule).__qualname__ in checkpoint:
            # Lightning restores the data after the model: check the tokenizer first, it explains a vocab_size change
            datamodule.load_state_dict(checkpoint[type(datamodule).__qualname__])
        saved = {**SHAPE_DEFAULTS, **checkpoint.get("hyper_parameters", {})}
        diff = [f"{k}={saved[k]} (this run: {self.hparams[k]})" for k in SHAPE_DEFAULTS if saved[k] != self.hparams[k]]
        if diff:
            raise UsageError(
                f"the checkpoint holds a model of another shape: {', '.join(diff)}: "
                "resume with the model settings it was trained with (its config.yaml)"
            )
        if (trained_with := saved.get("optimizer", "adamw")) != self.hparams.optimizer:
            raise UsageError(
                f"the checkpoint's optimizer state is {trained_with}'s, not {self.hparams.optimizer}'s: "
                f"resume with --model.optimizer {trained_with}"
            )
        if "optimizer_states" in checkpoint and not checkpoint.get("fsdp"):  # FSDP's state is keyed by name
            # a checkpoint's model order (its state_dict's): until the GPT was built in nanoGPT's order again, the
            # position embedding came after the Blocks, and the optimizer state numbers parameters in model order
            saved = [key.removeprefix("model.") for key in checkpoint["state_dict"]]
            saved = [name for name in saved if name in self.decayed]
            renumber_optimizer_state(checkpoint["optimizer_states"][0], self.optimizer_layout(saved),
                                     self.optimizer_layout(list(self.decayed)))  # fmt: skip
        # A resumed run's train loader starts at the saved optimizer step (datamodule.py), perhaps with another
        # accumulation (the same global batch on another device count). Lightning counts micro-batches, so recount
        # those done in the new run's units, all of them finished: else it validates and saves at the wrong
        # micro-batches and steps the optimizer mid-accumulation.
        if "loops" in checkpoint:
            progress = checkpoint["loops"]["fit_loop"]["epoch_loop.batch_progress"]
            done = checkpoint["global_step"] * self.trainer.accumulate_grad_batches
            progress["total"].update(dict.fromkeys(progress["total"], done))
            progress["current"].update(dict.fromkeys(progress["current"], 0))
