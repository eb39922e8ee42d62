"""Evaluate a model on benchmarks as lm-evaluation-harness does:

    python -m tinygpt_pl.evaluate --ckpt_path gpt2 --tasks hellaswag,arc_easy,piqa,lambada_openai [--limit N]

Prints a table (task, metric, value, stderr, examples) and, with --out, writes it as JSON with every choice's
log-likelihood. The tasks, their scoring and the data they read are in tinygpt_pl/evaluation/.
"""

import json
import math
import sys
from pathlib import Path

import torch
from jsonargparse import auto_cli

from tinygpt_pl.errors import UsageError, exit_on_bad_input
from tinygpt_pl.evaluation.evaluator import evaluate_task, prepare
from tinygpt_pl.evaluation.tasks import parse_task_data, parse_tasks
from tinygpt_pl.load import load_model


def evaluate(
    *,
    ckpt_path: str,
    tasks: str,
    limit: int | None = None,
    batch_size: int = 32,
    device: str = "auto",
    out: str | None = None,
    task_data: str | None = None,
    skip_unencodable: bool = False,
    progress: bool = True,
) -> dict:
    """Score a model on multiple-choice and last-word benchmarks by log-likelihood, as lm-evaluation-harness does.

    Args:
        ckpt_path: a .ckpt written by train.py, a Hugging Face GPT-2 folder, or a hub name (gpt2, gpt2-medium, ...).
        tasks: comma-separated: hellaswag, arc_easy, piqa, lambada_openai.
        limit: only the first N examples of each task (lm-eval's --limit).
        batch_size: continuations scored per forward pass.
        device: where the model runs: auto (a GPU if there is one), cpu, cuda, cuda:1, ...
        out: a JSON file to write (new: an existing file is never overwritten).
        task_data: local task documents in the hub's format, for offline nodes: TASK=PATH[,TASK=PATH...], each PATH a
            .jsonl file (one document per line), a .json array, or a folder the hub's dataset was saved in.
        skip_unencodable: skip (and list) examples with text the tokenizer cannot encode (characters a char model
            never saw) instead of stopping.
        progress: show a progress bar.
    """
    chosen = parse_tasks(tasks)
    paths = parse_task_data(task_data.split(",") if task_data else None)
    if unused := sorted(paths.keys() - {t.name for t in chosen}):
        raise UsageError(f"--task_data {unused[0]}=...: {unused[0]} is not among --tasks {tasks}: add it or drop it")
    if limit is not None and limit < 1:
        raise UsageError(f"--limit must be >= 1, got {limit}")
    if batch_size < 1:
        raise UsageError(f"--batch_size must be >= 1, got {batch_size}")
    if out is not None and Path(out).expanduser().exists():
        raise UsageError(f"--out {out} exists: pass a new file (results are never overwritten)")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    model, tokenizer = load_model(ckpt_path, device)
    block_size = model.config.block_size
    results = {"model": ckpt_path, "limit": limit, "batch_size": batch_size, "tasks": {}}
    for task in chosen:
        prepared = prepare(task, tokenizer, block_size, paths.get(task.name), limit, skip_unencodable)
        if progress:
            print(f"{task.name}: {len(prepared.examples)} examples", file=sys.stderr, flush=True)
        counts, scores = evaluate_task(model, prepared, tokenizer.vocab_size, batch_size, progress=progress)
        results["tasks"][task.name] = {
            "metrics": counts.results(),
            "examples": int(counts["examples"]),
            "cropped": int(counts["cropped"]),
            "skipped": [{"example": i, "reason": why} for i, why in prepared.encoded.skipped],
            "loglikelihoods": [
                None if s is None else [c.loglikelihood for c in s[: len(example.continuations)]]
                for example, s in zip(prepared.examples, scores, strict=True)
            ],
        }
    print(table(results, block_size))
    if out is not None:
        path = Path(out).expanduser()
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(results, indent=1) + "\n")
        print(f"wrote {path}")
    return results


def table(results: dict, block_size: int) -> str:
    """The results as a plain-text table, with a line for each task that cropped or skipped examples."""
    lines = [f"{'task':<16}{'metric':<16}{'value':>12} {'stderr':>11} {'examples':>9}"]
    notes = []
    for name, task in results["tasks"].items():
        for metric, figure in task["metrics"].items():
            value, stderr = (number(figure[key]) for key in ("value", "stderr"))
            lines.append(f"{name:<16}{metric:<16}{value:>12} {stderr:>11} {task['examples']:>9}")
        if task["cropped"]:
            notes.append(f"{name}: {task['cropped']} examples longer than the model's context ({block_size} tokens) "
                         "were cropped from the left, as lm-eval crops them")  # fmt: skip
        if task["skipped"]:
            skipped = ", ".join(str(s["example"]) for s in task["skipped"][:20])
            notes.append(f"{name}: skipped {len(task['skipped'])} examples the tokenizer cannot encode: {skipped}"
                         f"{' ...' if len(task['skipped']) > 20 else ''} ({task['skipped'][0]['reason']})")  # fmt: skip
    return "\n".join(lines + notes)


def number(x: float) -> str:
    """Four decimals, or four significant digits for a large value (an untrained model's perplexity)."""
    return "" if math.isnan(x) else f"{x:.4f}" if abs(x) < 1e5 else f"{x:.4g}"


@exit_on_bad_input
def main(args: list[str] | None = None) -> None:
    auto_cli(evaluate, args=args, exit_on_error=False)


if __name__ == "__main__":
    main()
