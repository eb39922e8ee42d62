"""benchmarks/results.py: each benchmark's section written in place in results.md, the run it replaces kept in
history.md, and the stamp under each heading."""

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def results():
    """benchmarks/results.py, imported as the benchmark scripts import it (benchmarks/ is no package)."""
    spec = importlib.util.spec_from_file_location("results", ROOT / "benchmarks" / "results.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_record_replaces_in_place_and_keeps_the_old_run_in_history(results, tmp_path: Path) -> None:
    path = tmp_path / "results.md"
    results.record("Alpha (benchmarks/alpha.py)", "alpha, first run\n\n| a |\n|---|\n| 1 |", path)
    assert path.read_text().startswith(results.HEADER)
    results.record("Beta (benchmarks/beta.py)", "beta's only run", path)
    results.record("Gamma (benchmarks/gamma.py)", "gamma's only run", path)
    before = path.read_text()
    assert not (tmp_path / "history.md").exists()  # appending a new benchmark moves nothing

    results.record("Alpha (benchmarks/alpha.py)", "alpha, second run", path)
    text = path.read_text()
    assert re.findall(r"^## .*$", text, re.M) == [
        "## Alpha (benchmarks/alpha.py)",
        "## Beta (benchmarks/beta.py)",
        "## Gamma (benchmarks/gamma.py)",
    ]  # replaced where it stood, one section per title
    assert "alpha, second run" in text and "alpha, first run" not in text
    assert text.split("## Beta")[1] == before.split("## Beta")[1]  # the sections after it, byte for byte
    assert text.startswith(results.HEADER)
    history = (tmp_path / "history.md").read_text()
    assert history.startswith("# Earlier benchmark runs\n")
    assert "## Alpha (benchmarks/alpha.py)\n\nalpha, first run\n\n| a |\n|---|\n| 1 |\n" in history

    results.record("Alpha (benchmarks/alpha.py)", "alpha, third run", path)
    history = (tmp_path / "history.md").read_text()
    assert history.index("alpha, first run") < history.index("alpha, second run")  # oldest first
    assert path.read_text().count("## Alpha") == 1 and "alpha, third run" in path.read_text()


def test_stamp_names_command_date_commit_and_machine(results, monkeypatch: pytest.MonkeyPatch) -> None:
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    monkeypatch.setattr(sys, "argv", [str(ROOT / "benchmarks" / "alpha.py"), "--data-path", "a b.txt"])
    stamp = results.stamp()
    match = re.fullmatch(r"`(.*)`  \n\d{4}-\d\d-\d\d \d\d:\d\d UTC, commit (\S+), (.*)\n", stamp)
    assert match, stamp
    assert match[1] == "python benchmarks/alpha.py --data-path 'a b.txt'"  # as typed in the repository root
    assert match[2].rstrip("+") == (head.stdout.strip() or "unknown")
    assert re.fullmatch(r"\d+ cores \(nproc\), .+", match[3])
    assert results.stamp("python x.py --gpu", where="NVIDIA H100").endswith(", NVIDIA H100\n")
