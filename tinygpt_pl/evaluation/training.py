"""Benchmarks during training (GPTModule's eval_tasks): at every validation each rank scores its share of the
examples, the counts are summed across ranks (the figures do not depend on the number of devices) and rank 0 logs
eval/<task>/<metric>. It runs after the validation loss, in eval mode and without randomness, so the training RNG and
data order are untouched; task data is loaded when the run is set up, so that data which cannot be loaded stops the run
before its first step."""

import lightning as L
import torch

from tinygpt_pl.data.tokenizer import Tokenizer
from tinygpt_pl.errors import UsageError
from tinygpt_pl.evaluation.evaluator import PreparedTask, evaluate_task, prepare
from tinygpt_pl.evaluation.metrics import TaskCounts
from tinygpt_pl.evaluation.tasks import parse_task_data, parse_tasks


class TrainingEvaluation:
    def __init__(self, tasks: list[str], limit: int | None, task_data: dict[str, str] | None, batch_size: int) -> None:
        self.tasks = parse_tasks(tasks)
        self.paths = parse_task_data(task_data)
        if limit is not None and limit < 1:
            raise UsageError(f"--model.eval_limit must be >= 1, got {limit}")
        if batch_size < 1:
            raise UsageError(f"--model.eval_batch_size must be >= 1, got {batch_size}")
        self.limit, self.batch_size = limit, batch_size
        self.prepared: list[PreparedTask] = []

    def prepare(self, tokenizer: Tokenizer, block_size: int) -> None:
        """Loads and encodes every task's examples (once per run); text the tokenizer cannot encode is skipped."""
        if not self.prepared:
            self.prepared = [prepare(task, tokenizer, block_size, self.paths.get(task.name), self.limit, True)
                             for task in self.tasks]  # fmt: skip
        self.vocab_size = tokenizer.vocab_size

    @torch.no_grad()
    def run(self, module: L.LightningModule) -> None:
        """Scores this rank's share of every task and logs the metrics of all ranks' summed counts, on rank 0."""
        trainer = module.trainer
        for prepared in self.prepared:
            counts, _ = evaluate_task(module.model, prepared, self.vocab_size, self.batch_size,
                                      trainer.global_rank, trainer.world_size)  # fmt: skip
            summed = trainer.strategy.reduce(counts.counts.to(module.device), reduce_op="sum")
            total = TaskCounts(prepared.task.kind, summed.cpu())
            for metric, figure in total.results().items():
                module.log(f"eval/{prepared.task.name}/{metric}", figure["value"], rank_zero_only=True)
