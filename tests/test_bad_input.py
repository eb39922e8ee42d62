"""Bad input to train.py and sample.py: one line saying what was wrong and what to do, exit status 2, and
nothing of an earlier run overwritten."""

import hashlib
import shutil
from pathlib import Path

import pytest
import torch
from conftest import run_script, train


def digests(root: Path) -> dict[str, str]:
    """sha256 of every file under root, by relative path."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in root.rglob("*.*")}


def assert_one_error_line(result, *fragments: str) -> None:
    assert result.returncode == 2, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr
    assert "Traceback" not in result.stderr and "usage:" not in result.stderr
    for fragment in fragments:
        assert fragment in errors[0]


@pytest.fixture
def run_copy(debug_run: Path, tmp_path: Path) -> Path:
    """A private copy of the finished debug run, for tests that try to damage it."""
    shutil.copytree(debug_run, tmp_path / "run")
    return tmp_path / "run"


@pytest.mark.parametrize(
    ("content", "fragments"),
    [
        (None, ["does not exist", "--data.path"]),
        (b"", ["is empty", "--data.path"]),
        (b"To be, or not to be: that is the question.", ["too few for one block", "--data.block_size"]),
        (b"caf\xe9 au lait\n" * 100, ["not UTF-8", "byte 0xe9 at offset 3"]),
    ],
    ids=["missing", "empty", "too-short", "not-utf8"],
)
def test_bad_corpus(tmp_path: Path, content: bytes | None, fragments: list[str]) -> None:
    path = tmp_path / "corpus.txt"
    if content is not None:
        path.write_bytes(content)
    result = train(tmp_path / "run", path)
    assert_one_error_line(result, *fragments)
    assert not (tmp_path / "run").exists()  # failed before writing anything


@pytest.mark.parametrize(
    ("args", "fragments"),
    [
        (["--model.n_layr", "3"], ["unrecognized arguments: --model.n_layr", "--help"]),
        (["--model.n_layer", "three"], ["model.n_layer", "Expected a <class 'int'>", "three"]),
    ],
    ids=["unknown-key", "wrong-type"],
)
def test_bad_option(tmp_path: Path, corpus: Path, args: list[str], fragments: list[str]) -> None:
    assert_one_error_line(train(tmp_path / "run", corpus, *args), *fragments)


def test_unknown_key_in_a_config_file(tmp_path: Path, corpus: Path) -> None:
    config = tmp_path / "bad.yaml"
    config.write_text("model:\n  n_layr: 3\n")
    result = train(tmp_path / "run", corpus, "--config", str(config))
    assert_one_error_line(result, "'model' does not accept option 'n_layr'")


def test_resume_with_nothing_to_resume(tmp_path: Path, corpus: Path) -> None:
    result = train(tmp_path / "run", corpus, "--ckpt_path", "last")
    assert_one_error_line(result, "--ckpt_path last: there is no", "drop --ckpt_path to start a new run")


def test_a_new_run_never_overwrites_an_old_one(run_copy: Path, corpus: Path) -> None:
    before = digests(run_copy)
    result = train(run_copy, corpus)
    assert_one_error_line(result, "already holds the checkpoints of an earlier run", "--ckpt_path last")
    assert digests(run_copy) == before


def test_resuming_a_checkpoint_in_another_runs_folder_is_refused(run_copy: Path, corpus: Path, tmp_path) -> None:
    elsewhere = shutil.copy(run_copy / "checkpoints" / "last.ckpt", tmp_path / "elsewhere.ckpt")
    before = digests(run_copy)
    result = train(run_copy, corpus, "--ckpt_path", str(elsewhere), "--trainer.max_steps", "30")
    assert_one_error_line(result, "holds the checkpoints of another run", "in a new --trainer.default_root_dir")
    assert digests(run_copy) == before


def test_resume_into_a_model_of_another_shape(run_copy: Path, corpus: Path) -> None:
    before = digests(run_copy / "checkpoints")
    result = train(run_copy, corpus, "--ckpt_path", "last", "--trainer.max_steps", "30", "--model.n_embd", "48")
    assert_one_error_line(result, "another shape", "n_embd=32 (this run: 48)", "config.yaml")
    assert digests(run_copy / "checkpoints") == before


def test_resume_with_another_vocabulary(run_copy: Path, tmp_path: Path, corpus: Path) -> None:
    other = tmp_path / "other.txt"
    other.write_text(corpus.read_text().replace("z", "~"))  # as many characters, one of them different
    before = digests(run_copy / "checkpoints")
    result = train(run_copy, other, "--ckpt_path", "last", "--trainer.max_steps", "30")
    assert_one_error_line(result, "another tokenizer/vocabulary", "same --data settings")
    assert digests(run_copy / "checkpoints") == before


def test_sample_with_characters_outside_the_vocabulary(debug_run: Path) -> None:
    result = run_script("sample.py", "--ckpt_path", str(debug_run / "checkpoints" / "last.ckpt"), "--prompt", "héllo")
    assert_one_error_line(result, "'é' are not in the model's vocabulary", "training corpus")


def test_sample_from_a_missing_or_foreign_checkpoint(tmp_path: Path) -> None:
    assert_one_error_line(run_script("sample.py", "--ckpt_path", str(tmp_path / "no.ckpt")), "does not exist")
    (tmp_path / "junk.ckpt").write_bytes(b"not a checkpoint")
    assert_one_error_line(run_script("sample.py", "--ckpt_path", str(tmp_path / "junk.ckpt")), "not a readable")


def test_resume_from_a_junk_or_foreign_checkpoint(tmp_path: Path, corpus: Path) -> None:
    (tmp_path / "junk.ckpt").write_bytes(b"not a checkpoint")
    result = train(tmp_path / "run", corpus, "--ckpt_path", str(tmp_path / "junk.ckpt"))
    assert_one_error_line(result, "junk.ckpt' is not a readable checkpoint", "pass a .ckpt written by train.py")
    torch.save({"state_dict": {}}, tmp_path / "foreign.ckpt")
    result = train(tmp_path / "run", corpus, "--ckpt_path", str(tmp_path / "foreign.ckpt"))
    assert_one_error_line(result, "foreign.ckpt is not a checkpoint of a train.py run", "pass a .ckpt that one wrote")
    assert not (tmp_path / "run").exists()  # refused before any work
