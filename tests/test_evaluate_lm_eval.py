"""evaluate against lm-evaluation-harness itself: `lm_eval --model hf`, run as a user runs it, on the exported folder
of a char model and of a GPT-2-tokenizer model, over local copies of every task: its acc and acc_norm equal
evaluate's, and every choice's log-likelihood is within 1e-4 of evaluate's (fp32, CPU)."""

from pathlib import Path

import pytest
from task_fixtures import agreement, run_lm_eval, write_documents

from tinygpt_pl.evaluate import evaluate
from tinygpt_pl.evaluation.tasks import TASKS
from tinygpt_pl.export import main as export


@pytest.mark.slow  # lm-eval's start-up alone takes tens of seconds
@pytest.mark.parametrize("model", ["char", "gpt2"])
def test_lm_eval_hf_on_an_export_scores_as_evaluate(model: str, request, corpus: Path, tmp_path: Path) -> None:
    """The char model is the debug run's (a 32-character context: many examples are cropped); the GPT-2 one is the
    random stand-in for GPT-2 (GPT-2's BPE, 128 positions)."""
    if model == "char":
        source = str(request.getfixturevalue("debug_run") / "checkpoints" / "last.ckpt")
    else:
        source = str(request.getfixturevalue("gpt2_standin"))
    export(["--ckpt_path", source, "--out", str(tmp_path / "hf")])
    text = corpus.read_text()
    data = {task: write_documents(tmp_path, task, text, 24, seed=1) for task in TASKS}
    theirs = run_lm_eval(tmp_path / "hf", data, tmp_path, batch_size=8)
    ours = evaluate(ckpt_path=source, tasks=",".join(TASKS), task_data=",".join(f"{t}={p}" for t, p in data.items()),
                    batch_size=8, progress=False)  # fmt: skip
    if model == "char":
        assert ours["tasks"]["hellaswag"]["cropped"] > 0 and ours["tasks"]["lambada_openai"]["cropped"] > 0
    for task, figures in agreement(ours, theirs).items():
        assert figures["examples"] == 24 and figures["choices"] >= 24, task
        assert figures["max_difference"] <= 1e-4, task
        assert figures["metrics"] and all(a == b for a, b in figures["metrics"].values()), (task, figures["metrics"])
