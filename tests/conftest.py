import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"


@pytest.fixture(scope="session")
def corpus() -> Path:
    if not CORPUS.is_file():
        pytest.fail(f"tiny Shakespeare is expected at {CORPUS} (the project's shared data)")
    return CORPUS


def run_script(script: str, *args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    """Run one of the project's scripts as a user would, capturing its output."""
    return subprocess.run(
        [sys.executable, str(ROOT / script), *args], cwd=cwd, capture_output=True, text=True, timeout=600
    )


def train(root: Path, corpus: Path, *args: str) -> subprocess.CompletedProcess:
    """train.py on the debug config, writing everything under root."""
    return run_script(
        "train.py", "--config", "configs/debug.yaml", "--data.path", str(corpus),
        "--trainer.default_root_dir", str(root), "--trainer.enable_progress_bar", "false", *args,
    )  # fmt: skip


@pytest.fixture(scope="session")
def debug_run(tmp_path_factory: pytest.TempPathFactory, corpus: Path) -> Path:
    """The root folder of one finished debug run (20 steps), shared by the tests that only read it."""
    root = tmp_path_factory.mktemp("debug")
    result = train(root, corpus)
    assert result.returncode == 0, result.stderr
    return root
