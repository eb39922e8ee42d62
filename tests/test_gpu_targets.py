"""benchmarks/gpu_targets.py --dry-run: on the CPU every step of the GPU check starts and fills its row of the table,
so that the first lent GPU runs it without surprises."""

import sys
from pathlib import Path

import pytest
from conftest import ROOT, run_script


@pytest.mark.slow  # the doctor, two training runs and the generation benchmark, each a process: about a minute
def test_the_dry_run_starts_every_step_and_writes_one_table(tmp_path: Path, corpus: Path) -> None:
    results = tmp_path / "results.md"
    logs = tmp_path / "logs"
    done = run_script("benchmarks/gpu_targets.py", "--data-path", str(corpus), "--dry-run", "--results", str(results),
                      "--logs", str(logs))  # fmt: skip
    assert done.returncode == 0, done.stderr
    rows = dict(
        line.split(" | ")[:2]
        for line in results.read_text().splitlines()
        if line.startswith("| ") and "---" not in line
    )
    rows = {k.strip("| "): v for k, v in rows.items()}
    assert rows["doctor"].startswith("verdict: OK on CPU"), rows
    assert "tokens/s" in rows["training step (GPT-2 124M, compiled, bf16, on a GPU)"], rows
    for config in ("configs/lecture/06_scaled_up.yaml", "configs/shakespeare_char.yaml"):
        assert rows[config].startswith("val loss ") and "(finished: 4 steps)" in rows[config], rows
    for run in ("pretraining", "chat fine-tuning"):
        row = next(v for k, v in rows.items() if k.startswith(f"{run}, GPT-2 124M shape"))
        assert "tokens/s, MFU unknown (no peak FLOP/s for this device) (median of 3 windows)" in row, rows
    assert "x the tokens/s" in rows["chat fine-tuning against pretraining"], rows
    assert "failed" not in rows["KV cache (benchmarks/generation.py --gpu)"], rows
    assert not rows["HellaSwag, GPT-2 124M"].startswith("failed"), rows  # "not run: ..." where its data is missing
    assert {path.name for path in logs.iterdir()} == {
        "doctor.log",
        "06_scaled_up.log",
        "shakespeare_char.log",
        "pretraining.log",
        "chat_fine-tuning.log",
        "generation.log",
    }
    assert "verdict: OK on CPU" in (logs / "doctor.log").read_text()  # each step's whole output, kept


def test_steps_past_the_budget_say_so_and_the_table_is_still_written(tmp_path: Path, corpus: Path) -> None:
    results = tmp_path / "results.md"
    done = run_script("benchmarks/gpu_targets.py", "--data-path", str(corpus), "--dry-run", "--results", str(results),
                      "--budget", "1")  # fmt: skip
    assert done.returncode == 0, done.stderr
    table = [line for line in results.read_text().splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert len(table) == 6 and all("not run: the --budget of 1 s was spent" in line for line in table), table


def test_a_command_after_the_budget_ran_out_within_a_step_is_not_started(tmp_path: Path, monkeypatch) -> None:
    """A step of several commands (chat fine-tuning: two runs) whose first one used up the budget: the second one is
    reported as not run, instead of being started with a time-out below zero."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))  # for this test only: its modules' names are generic
    from gpu_targets import Runner

    runner = Runner(budget=0, logs=tmp_path)
    assert runner.run("second", [sys.executable, "-c", "open('started', 'w')"], 60) == (runner.spent(), "")
    assert not (ROOT / "started").exists() and not list(tmp_path.iterdir())
