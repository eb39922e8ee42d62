import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED_CORPUS = ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"  # a copy beside the project, if any


def find_tiny_shakespeare(shared: Path = SHARED_CORPUS, cache_dir: Path | None = None) -> Path:
    """Tiny Shakespeare, sha256-checked, so the tests run from any clone: the shared copy if it is there and intact
    (offline), else the project's cache (default_cache_dir()), which downloads it once. Fails the test in one line
    when neither works."""
    # Imported here, not at the top: torch and Lightning load only for the tests that need the corpus.
    from tinygpt_pl.data.cache import sha256_of
    from tinygpt_pl.data.datamodule import TINY_SHAKESPEARE_SHA256, default_cache_dir, fetch_tiny_shakespeare
    from tinygpt_pl.errors import UsageError

    if shared.is_file() and sha256_of(shared) == TINY_SHAKESPEARE_SHA256:
        return shared
    cache_dir = default_cache_dir() if cache_dir is None else cache_dir
    try:
        return fetch_tiny_shakespeare(cache_dir)
    except UsageError as e:
        pytest.fail(
            f"tiny Shakespeare for the tests: no intact copy at {shared} or in {cache_dir}, and no download "
            f"({e.__cause__ or e}); put tinyshakespeare.txt in either place",
            pytrace=False,
        )


@pytest.fixture(scope="session")
def corpus() -> Path:
    """Tiny Shakespeare, wherever find_tiny_shakespeare finds it."""
    return find_tiny_shakespeare()


@pytest.fixture(scope="session")
def small_corpus(tmp_path_factory: pytest.TempPathFactory, corpus: Path) -> Path:
    """The first 60k characters of tiny Shakespeare: a val split that validates in a blink."""
    path = tmp_path_factory.mktemp("corpus") / "small.txt"
    path.write_text(corpus.read_text()[:60_000])
    return path


STARTED: list[subprocess.Popen] = []  # processes a test started and left running (see test_interrupt.start)


@pytest.fixture(autouse=True)
def no_process_left_running():
    """A test that fails before its train.py ends kills it, so that it does not train on beside the next tests."""
    yield
    while STARTED:
        proc = STARTED.pop()
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.fixture
def one_thread():
    """Tiny models gain nothing from a second thread; on a loaded machine its synchronisation costs seconds."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


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


@pytest.fixture(scope="session")
def gpt2_standin(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A stand-in for GPT-2 on the hub, which the tests cannot download: a randomly initialised, tiny
    GPT2LMHeadModel (GPT-2's vocabulary, 128 positions) and GPT-2's own BPE tokenizer, as save_pretrained writes
    them."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from tinygpt_pl.data.tokenizer import get_tokenizer
    from tinygpt_pl.hf.tokenizer import hf_tokenizer

    folder = tmp_path_factory.mktemp("gpt2-standin")
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(n_layer=2, n_head=4, n_embd=64, n_positions=128)).save_pretrained(folder)
    hf_tokenizer(get_tokenizer("gpt2")).save_pretrained(folder)
    return folder
