"""The benchmarks as lm-evaluation-harness 0.4.13 defines them (lm_eval/tasks/<task>/*.yaml and utils.py): the hub
dataset and split it reads, and how a document becomes a context and its continuations.

Each document is one Example: the context, the continuations to score after it (the target delimiter " " already in
front of a multiple-choice answer, as lm-eval builds its requests) and, for multiple choice, the answers' own texts
(acc_norm divides by their length in characters) and the index of the right one. HellaSwag's examples also carry
build-nanogpt's rendering of the document (its hellaswag.py: the raw `ctx`, and " " + each raw ending), on which
acc_token_mean is scored so that it compares with build-nanogpt's and llm.c's figures. Task data comes from the hub
through `datasets` (cached by it), or from a local file or folder in the hub's format for offline nodes.
"""

import json
import re
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from tinygpt_pl.errors import UsageError


@dataclass(frozen=True)
class Example:
    context: str
    continuations: list[str]  # what is scored after the context
    choices: list[str]  # the answers' texts (multiple choice), for acc_norm's lengths
    gold: int  # the right continuation (multiple choice); 0 for lambada's one
    completion: tuple[str, list[str]] | None = None  # build-nanogpt's context and continuations, for acc_token_mean


@dataclass(frozen=True)
class Task:
    name: str
    kind: str  # "multiple_choice" (acc, acc_norm, acc_token_mean) or "last_word" (acc, perplexity)
    hub: tuple[str, str | None, str]  # lm-eval's dataset_path, dataset_name and the split it evaluates
    fields: tuple[str, ...]  # what a document must have
    example: Callable[[dict], Example]


def multiple_choice(context: str, choices: list[str], gold: int) -> Example:
    return Example(context, [" " + choice for choice in choices], choices, gold)  # target_delimiter " "


def hellaswag_preprocess(text: str) -> str:
    """lm-eval's hellaswag/utils.py preprocess: WikiHow's bracketed artifacts removed."""
    text = text.strip().replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    return text.replace("  ", " ")


def hellaswag(doc: dict) -> Example:
    context = doc["ctx_a"] + " " + doc["ctx_b"].capitalize()
    query = hellaswag_preprocess(doc["activity_label"] + ": " + context)
    example = multiple_choice(query, [hellaswag_preprocess(ending) for ending in doc["endings"]], int(doc["label"]))
    ctx = doc["ctx"] if "ctx" in doc else " ".join(filter(None, (doc["ctx_a"], doc["ctx_b"])))  # the hub's ctx
    return replace(example, completion=(ctx, [" " + ending for ending in doc["endings"]]))


def arc(doc: dict) -> Example:
    choices = doc["choices"]
    return multiple_choice(f"Question: {doc['question']}\nAnswer:", list(choices["text"]),
                           list(choices["label"]).index(doc["answerKey"]))  # fmt: skip


def piqa(doc: dict) -> Example:
    return multiple_choice(f"Question: {doc['goal']}\nAnswer:", [doc["sol1"], doc["sol2"]], int(doc["label"]))


def lambada(doc: dict) -> Example:
    words = doc["text"].split(" ")
    return Example(" ".join(words[:-1]), [" " + words[-1]], [], 0)


TASKS = {
    task.name: task
    for task in (
        Task("hellaswag", "multiple_choice", ("Rowan/hellaswag", None, "validation"),
             ("activity_label", "ctx_a", "ctx_b", "endings", "label"), hellaswag),
        Task("arc_easy", "multiple_choice", ("allenai/ai2_arc", "ARC-Easy", "test"),
             ("question", "choices", "answerKey"), arc),
        Task("piqa", "multiple_choice", ("baber/piqa", None, "validation"), ("goal", "sol1", "sol2", "label"), piqa),
        Task("lambada_openai", "last_word", ("EleutherAI/lambada_openai", "default", "test"), ("text",), lambada),
    )
}  # fmt: skip


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise UsageError(f"unknown task {name!r}: choose from {', '.join(TASKS)}")
    return TASKS[name]


def parse_tasks(tasks: str | list[str]) -> list[Task]:
    """Tasks by name, from "a,b" or a list; each once."""
    names = tasks.split(",") if isinstance(tasks, str) else [n for item in tasks for n in item.split(",")]
    names = [name.strip() for name in names if name.strip()]
    if not names:
        raise UsageError(f"no task given: choose from {', '.join(TASKS)}")
    return [get_task(name) for name in dict.fromkeys(names)]


def parse_task_data(items: list[str] | dict[str, str] | None) -> dict[str, str]:
    """--task_data hellaswag=path.jsonl (repeatable, or comma-separated) as {task: path}."""
    if isinstance(items, dict) or items is None:
        pairs = dict(items or {})
    else:
        pairs = {}
        for item in (part for entry in items for part in entry.split(",") if part):
            name, sep, path = item.partition("=")
            if not sep or not path:
                raise UsageError(f"--task_data {item!r}: give TASK=PATH, e.g. hellaswag=hellaswag.jsonl")
            pairs[name.strip()] = path
    for name in pairs:
        get_task(name)
    return pairs


def read_records(path: Path) -> list[tuple[str, dict]]:
    """The documents of a local file, each with where it is (line N of a .jsonl, record N of a .json array)."""
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json" and text.lstrip().startswith("["):
        try:
            records = json.loads(text)
        except json.JSONDecodeError as e:
            raise UsageError(f"{path}: not valid JSON ({e}): pass the task's documents in the hub's format") from None
        return [(f"record {i + 1}", record) for i, record in enumerate(records)]
    out = []
    for number, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                out.append((f"line {number}", json.loads(line)))
            except json.JSONDecodeError as e:
                raise UsageError(f"{path} line {number}: not a JSON object ({e.msg}): one document per line") from None
    return out


def read_dataset(source: str, name: str | None, split: str) -> list[tuple[str, dict]]:
    """The documents of a hub dataset (downloaded once into datasets' cache) or of a folder in a hub's layout."""
    try:
        import datasets
    except ImportError:
        raise UsageError("task data from the hub needs datasets: pip install datasets") from None
    try:
        dataset = datasets.load_dataset(source, name, split=split)
    except Exception as e:  # datasets raises many kinds (connection, missing files, no such split)
        reason = " ".join(str(e).split())[:200]
        raise UsageError(
            f"could not load {source} ({split} split) through datasets: {reason}: connect to the hub once, "
            "or pass --task_data TASK=FILE with the task's documents (jsonl, in the hub's format)"
        ) from None
    return [(f"record {i + 1}", record) for i, record in enumerate(dataset)]


def load_examples(task: Task, path: str | None = None, limit: int | None = None) -> list[Example]:
    """The task's first `limit` documents as Examples, from path (a .jsonl/.json file or a dataset folder) or the hub.
    A document without a field the task reads is refused in one line that says which, and where."""
    if path is None:
        dataset, name, split = task.hub
        records = read_dataset(dataset, name, split)
        where = f"{dataset} ({split})"
    else:
        local = Path(path).expanduser()
        if not local.exists():
            raise UsageError(f"--task_data {task.name}={path}: no such file or folder")
        records = read_records(local) if local.is_file() else read_dataset(str(local), None, task.hub[2])
        where = str(local)
    if limit is not None:
        records = records[:limit]
    examples = []
    for place, doc in records:
        missing = [f for f in task.fields if not isinstance(doc, dict) or f not in doc]
        if missing:
            raise UsageError(
                f"{where} {place}: no field {missing[0]!r}, which {task.name} documents have "
                f"({', '.join(task.fields)}): pass the task's documents in the hub's format"
            )
        try:
            examples.append(task.example(doc))
        except (TypeError, ValueError, KeyError, AttributeError) as e:
            raise UsageError(f"{where} {place}: not a {task.name} document ({type(e).__name__}: {e})") from None
    if not examples:
        raise UsageError(f"{where}: no {task.name} documents")
    return examples
