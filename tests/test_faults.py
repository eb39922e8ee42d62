"""Faults during a run lose nothing: a diverging loss, a full disk, a deleted checkpoint folder, a damaged last.ckpt, a
read-only run folder, and a second train.py in a live run's folder each end with one line and a non-zero exit, and
never leave a checkpoint worse than the one before."""

import math
import os
import shlex
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ROOT, train
from test_bad_input import assert_one_error_line, digests
from test_interrupt import finish, saved_step, start, wait_for_training
from test_train import events

from tinygpt_pl.training.safety.nonfinite import NonFiniteGuard

DIVERGES = ["--model.learning_rate", "1000", "--trainer.gradient_clip_val", "null"]


def assert_error_line(result, *fragments: str) -> str:
    """One `error:` line with fragments, exit status 1, no traceback; the line."""
    assert result.returncode == 1, result.stderr
    (line,) = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in line, line
    return line


def all_finite(path: Path) -> bool:
    state = torch.load(path, weights_only=True)["state_dict"]
    return all(t.isfinite().all() for t in state.values())


def test_guard_counts_skips_and_runs_of_them_on_the_device() -> None:
    guard = NonFiniteGuard(skip=True, max_skips_in_a_row=3)
    guard.reset(torch.device("cpu"))
    flags = []
    for step, norm in enumerate([1.0, math.inf, 2.0, math.nan, math.nan, 3.0], start=1):
        flags.append(float(guard.observe_step(torch.tensor(norm), step)))
    assert flags == [0, 1, 0, 1, 1, 0]
    assert int(guard.first_bad) == 2 and int(guard.skipped_steps()) == 3 and int(guard.most_in_a_row) == 2


def test_a_skipped_step_leaves_weights_and_optimizer_state_as_they_were() -> None:
    """The fused AdamW step that skip_nonfinite_steps uses does nothing where found_inf is 1, on the CPU too."""
    weight = torch.nn.Parameter(torch.ones(4))
    optimizer = torch.optim.AdamW([weight], lr=0.1, fused=True)
    weight.grad = torch.ones(4)
    optimizer.step()
    before = weight.detach().clone(), {k: v.clone() for k, v in optimizer.state[weight].items()}
    weight.grad = torch.full((4,), math.nan)
    optimizer.found_inf = torch.tensor(1.0)
    optimizer.step()
    assert torch.equal(weight.detach(), before[0])
    for key, value in before[1].items():
        assert torch.equal(optimizer.state[weight][key], value), key


@pytest.mark.slow  # the run diverging after checkpoints below takes the same path
def test_a_diverging_run_stops_in_one_line_and_writes_no_nonfinite_checkpoint(tmp_path, small_corpus) -> None:
    """The debug run at lr 1000 without clipping (which crashed in the text sample at its first validation) stops
    at the first check after its loss went non-finite, with one line naming the step; no checkpoint was written."""
    result = train(tmp_path, small_corpus, *DIVERGES)
    line = assert_error_line(result, "the loss or gradient norm became non-finite at step", "start again")
    step = int(line.split("non-finite at step ")[1].split(";")[0])
    assert 1 <= step <= 10 and not (tmp_path / "checkpoints").exists()


def test_a_run_diverging_after_checkpoints_names_the_newest_finite_one(tmp_path: Path, small_corpus: Path) -> None:
    """With a validation and checkpoints every 2 steps, the run is stopped at the first validation after its loss
    went non-finite: last.ckpt keeps the validation before, and every checkpoint left has finite weights."""
    every_2 = ["--trainer.val_check_interval", "2", "--trainer.limit_val_batches", "4"]
    result = train(tmp_path, small_corpus, *DIVERGES, *every_2)
    last = tmp_path / "checkpoints" / "last.ckpt"
    line = assert_error_line(result, f"the newest checkpoint, with finite weights, is {last} (step ")
    step = int(line.split("non-finite at step ")[1].split(";")[0])
    assert saved_step(last.parents[1]) == 2 * ((step - 1) // 2) >= 2
    assert all(all_finite(path) for path in last.parent.glob("*.ckpt"))


def test_skipping_nonfinite_steps_counts_them_and_keeps_the_weights_finite(tmp_path: Path, small_corpus: Path) -> None:
    result = train(tmp_path / "skips", small_corpus, *DIVERGES, "--model.skip_nonfinite_steps", "true",
                   "--model.max_skips_in_a_row", "1000")  # fmt: skip
    assert result.returncode == 0, result.stderr
    skipped = {e.step: e.value for e in events(tmp_path / "skips").Scalars("train/skipped_steps")}
    assert sorted(skipped) == [4, 9, 14, 19] and 0 < skipped[4] <= skipped[19] <= 20
    assert all_finite(tmp_path / "skips" / "checkpoints" / "last.ckpt")
    assert (
        torch.load(tmp_path / "skips" / "checkpoints" / "last.ckpt", weights_only=True)["skipped_steps"]
        == (skipped[19])
    )

    too_many = train(tmp_path / "stops", small_corpus, *DIVERGES, "--model.skip_nonfinite_steps", "true",
                     "--model.max_skips_in_a_row", "3")  # fmt: skip
    assert_error_line(too_many, "3 steps in a row had non-finite gradients (skipped)")


def in_mount_namespace(mount: str, command: list[str], after: str = "") -> subprocess.CompletedProcess:
    """command in a private mount namespace where the shell line `mount` ran first, then `after`; as root, else as
    a user namespace's root (where the kernel lets unprivileged users have one)."""
    if not shutil.which("unshare"):
        pytest.skip("needs unshare(1) (util-linux) for a private mount namespace")
    script = f"set -e; {mount}; set +e; {shlex.join(command)}; code=$?; {after or ':'}; exit $code"
    flags = ["-m"] if os.geteuid() == 0 else ["-r", "-m"]
    probe = subprocess.run(["unshare", *flags, "true"], capture_output=True)
    if probe.returncode:
        pytest.skip(f"this machine gives no private mount namespace ({probe.stderr.decode().strip()})")
    command = ["unshare", *flags, "sh", "-c", script]
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)


def train_command(root: Path, corpus: Path, *args: str) -> list[str]:
    return [sys.executable, str(ROOT / "train.py"), "--config", "configs/debug.yaml", "--data.path", str(corpus),
            "--trainer.default_root_dir", str(root), "--trainer.enable_progress_bar", "false", *args]  # fmt: skip


def test_a_full_disk_ends_the_run_in_one_line_and_keeps_the_last_checkpoint(tmp_path: Path, small_corpus: Path) -> None:
    """The checkpoint folder on a 900 KB filesystem: the best and last checkpoints of step 10 (356 KB each) fit, the
    best one of step 20 does not (ENOSPC while it is written)."""
    folder, kept = tmp_path / "small-disk", tmp_path / "kept"
    folder.mkdir()
    command = train_command(tmp_path / "run", small_corpus, "--checkpoint.dirpath", str(folder))
    result = in_mount_namespace(f"mount -t tmpfs -o size=900k tmpfs {folder}", command, f"cp -a {folder} {kept}")
    line = assert_error_line(result, f"could not write the checkpoint {folder / 'best-step20-'}",
                             "(No space left on device)", f"{folder / 'last.ckpt'} (step 10) is intact",
                             "resume with --ckpt_path last")  # fmt: skip
    names = sorted(p.name for p in kept.iterdir())  # no temporary file left
    assert len(names) == 2 and names[0].startswith("best-step10-") and names[1] == "last.ckpt", (names, line)
    assert torch.load(kept / "last.ckpt", weights_only=True)["global_step"] == 10


def test_a_read_only_run_folder_is_refused_before_any_work(tmp_path: Path, small_corpus: Path) -> None:
    folder = tmp_path / "read-only"
    folder.mkdir()
    result = in_mount_namespace(f"mount -t tmpfs -o ro tmpfs {folder}", train_command(folder / "run", small_corpus))
    assert_one_error_line(result, f"cannot write to the run folder {folder / 'run'} (Read-only file system)",
                          "pass a writable --trainer.default_root_dir")  # fmt: skip


def test_a_checkpoint_folder_deleted_during_the_run_is_written_again_and_the_run_stops(tmp_path, small_corpus) -> None:
    root = tmp_path / "run"
    proc = start(root, small_corpus)
    wait_for_training(proc, root)
    shutil.rmtree(root / "checkpoints")
    stderr = finish(proc)
    assert proc.returncode == 1, stderr
    (line,) = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert f"the checkpoint folder {root / 'checkpoints'} was deleted during the run" in line
    assert "resume with --ckpt_path last" in line and "Traceback" not in stderr
    assert saved_step(root) > 10  # the work since the deletion is saved


def test_a_truncated_last_checkpoint_is_refused_naming_the_newest_intact_one(tmp_path, corpus, debug_run) -> None:
    run = tmp_path / "run"
    shutil.copytree(debug_run, run)
    last = run / "checkpoints" / "last.ckpt"
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])
    (best,) = run.glob("checkpoints/best-*.ckpt")
    before = digests(run / "checkpoints")
    result = train(run, corpus, "--trainer.max_steps", "30", "--model.lr_decay_steps", "20", "--ckpt_path", "last")
    intact = f"the newest intact checkpoint of this run is {best} (step 20)"
    assert_one_error_line(result, f"{last} is damaged (truncated or not a checkpoint)", intact, f"--ckpt_path {best}")
    assert digests(run / "checkpoints") == before
    resumed = train(run, corpus, "--trainer.max_steps", "30", "--model.lr_decay_steps", "20", "--ckpt_path", str(best))
    assert resumed.returncode == 0, resumed.stderr
    assert saved_step(run) == 30


def test_a_second_run_in_a_live_runs_folder_is_refused_and_a_killed_runs_lock_never_blocks(
    tmp_path, small_corpus
) -> None:
    root = tmp_path / "run"
    first = start(root, small_corpus)
    wait_for_training(first, root)
    second = train(root, small_corpus, "--ckpt_path", "last")
    assert_one_error_line(second, f"another train.py is running in {root}", "wait for it to end")
    assert [p.name for p in (root / "lightning_logs").iterdir()] == ["version_0"]  # the second one wrote nothing
    first.send_signal(signal.SIGKILL)
    finish(first)
    resumed = train(root, small_corpus, "--trainer.max_steps", "30", "--model.lr_decay_steps", "60", "--ckpt_path",
                    "last")  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr


@pytest.mark.slow  # the lock's refusal is tested against a live run above
def test_two_runs_started_together_in_one_folder_one_runs_and_one_is_refused(tmp_path, small_corpus) -> None:
    command = train_command(tmp_path, small_corpus, "--model.sample_tokens", "0")
    both = [subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            for _ in range(2)]  # fmt: skip
    results = sorted((p.wait(timeout=600), p.stderr.read()) for p in both)
    assert [code for code, _ in results] == [0, 2], results
    assert "error: another train.py is running in" in results[1][1] and "Traceback" not in results[1][1]
