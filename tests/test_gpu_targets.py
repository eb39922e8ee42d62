"""benchmarks/gpu_targets.py --dry-run: on the CPU every step of the GPU check starts and fills its row of the table,
so that the first lent GPU runs it without surprises."""

from pathlib import Path

import pytest
from conftest import run_script


@pytest.mark.slow  # the doctor, two training runs and the generation benchmark, each a process: about a minute
def test_the_dry_run_starts_every_step_and_writes_one_table(tmp_path: Path, corpus: Path) -> None:
    results = tmp_path / "results.md"
    done = run_script("benchmarks/gpu_targets.py", "--data-path", str(corpus), "--dry-run", "--results", str(results))
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
    assert "failed" not in rows["KV cache (benchmarks/generation.py --gpu)"], rows
    assert not rows["HellaSwag, GPT-2 124M"].startswith("failed"), rows  # "not run: ..." where its data is missing
