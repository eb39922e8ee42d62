"""A task ready to score (its examples encoded for one model's tokenizer and context) and the scoring of it, whole or
one rank's share (every world_size-th example), into TaskCounts."""

from dataclasses import dataclass

from tinygpt_pl.data.tokenizer import Tokenizer
from tinygpt_pl.evaluation.metrics import TaskCounts
from tinygpt_pl.evaluation.scoring import Encoded, Score, encode, score
from tinygpt_pl.evaluation.tasks import Example, Task, load_examples
from tinygpt_pl.generation.generate import Model


@dataclass
class PreparedTask:
    task: Task
    examples: list[Example]
    encoded: Encoded


def prepare(
    task: Task,
    tokenizer: Tokenizer,
    block_size: int,
    path: str | None = None,
    limit: int | None = None,
    skip_unencodable: bool = False,
) -> PreparedTask:
    """The task's first `limit` examples (from path, else the hub), encoded; bad data ends here in one line."""
    examples = load_examples(task, path, limit)
    return PreparedTask(task, examples, encode(examples, tokenizer, block_size, skip_unencodable))


def evaluate_task(
    model: Model,
    prepared: PreparedTask,
    vocab_size: int,
    batch_size: int = 32,
    rank: int = 0,
    world_size: int = 1,
    progress: bool = False,
) -> tuple[TaskCounts, list[list[Score] | None]]:
    """This rank's counts and its examples' scores (None where skipped or another rank's)."""
    mine = [r for r in prepared.encoded.requests if r.example % world_size == rank]
    skipped = [(i, why) for i, why in prepared.encoded.skipped if i % world_size == rank]
    share = Encoded(mine, skipped, prepared.encoded.cropped)
    scores = score(model, share, len(prepared.examples), vocab_size, batch_size, progress)
    counts = TaskCounts(prepared.task.kind)
    for i, example in enumerate(prepared.examples):
        if i % world_size == rank:
            counts.add_example(example, scores[i], cropped=i in prepared.encoded.cropped)
    return counts, scores
