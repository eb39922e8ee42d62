"""Benchmarks during training (--model.eval_tasks): the same figures on 1 and 2 processes, exact resume with them on,
and task data that cannot be loaded stopping the run before its first step in one line."""

from pathlib import Path

import pytest
from conftest import train
from task_fixtures import write_documents
from test_bad_input import assert_one_error_line
from test_scale import DDP, EVERY_STEP, assert_resumes, scalars


def eval_args(folder: Path, corpus: Path) -> list[str]:
    text = corpus.read_text()
    files = {task: write_documents(folder, task, text, 15) for task in ("hellaswag", "lambada_openai")}
    data = ", ".join(f"{task}: {path}" for task, path in files.items())
    return ["--model.eval_tasks", "[hellaswag, lambada_openai]", "--model.eval_task_data", f"{{{data}}}",
            "--model.eval_batch_size", "7"]  # fmt: skip


TAGS = ("eval/hellaswag/acc", "eval/hellaswag/acc_norm", "eval/hellaswag/acc_token_mean", "eval/lambada_openai/acc")


@pytest.mark.slow  # three training runs, one of them on 2 processes
def test_eval_is_the_same_on_two_processes_and_resumes_exactly(tmp_path: Path, small_corpus: Path) -> None:
    args = [*EVERY_STEP, *eval_args(tmp_path, small_corpus)]
    one = train(tmp_path / "one", small_corpus, *args, "--trainer.max_steps", "8")
    assert one.returncode == 0, one.stderr
    two = train(tmp_path / "two", small_corpus, *args, *DDP, "--trainer.max_steps", "6")
    assert two.returncode == 0, two.stderr
    for tag in TAGS:
        logged = scalars(tmp_path / "one", tag)
        assert sorted(logged) == [1, 3, 5, 7]
        assert scalars(tmp_path / "two", tag) == {s: v for s, v in logged.items() if s < 6}, tag
    ppl = "eval/lambada_openai/perplexity"  # an untrained model's: large, equal to float32's precision
    two_ppl, one_ppl = scalars(tmp_path / "two", ppl), scalars(tmp_path / "one", ppl)
    assert two_ppl == pytest.approx({s: v for s, v in one_ppl.items() if s < 6}, rel=1e-5)
    # resumed in one process, the run goes on as the uninterrupted one: losses and evaluations
    assert_resumes(tmp_path / "two", tmp_path / "one", small_corpus, *args[len(EVERY_STEP) :])
    for tag in TAGS:
        assert scalars(tmp_path / "two", tag, 1) == {7: scalars(tmp_path / "one", tag)[7]}


def test_task_data_that_cannot_be_loaded_stops_the_run_before_its_first_step(tmp_path: Path, corpus: Path) -> None:
    missing = train(tmp_path / "run", corpus, "--model.eval_tasks", "[piqa]", "--model.eval_task_data",
                    f"{{piqa: {tmp_path / 'nope.jsonl'}}}")  # fmt: skip
    assert_one_error_line(missing, "--task_data piqa=", "no such file or folder")
    assert not list((tmp_path / "run").rglob("*.ckpt"))
    unknown = train(tmp_path / "run2", corpus, "--model.eval_tasks", "[hellaswag, mmlu]")
    assert_one_error_line(unknown, "unknown task 'mmlu'")
