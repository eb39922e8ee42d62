"""python -m tinygpt_pl.doctor on a machine without GPUs: its CPU part, a failing check, and its worker processes."""

import multiprocessing
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from jsonargparse import auto_cli

from tinygpt_pl import doctor
from tinygpt_pl.doctor import FAIL, NOT_RUN, OK, Result
from tinygpt_pl.errors import exit_on_bad_input


def test_cpu_report(tmp_path: Path) -> None:
    """The whole CPU part, as a user runs it."""
    ckpt, cache = tmp_path / "ckpt", tmp_path / "cache"
    ckpt.mkdir()
    # one thread: on a small machine that other processes share, a multithreaded CPU step can run 20x slower
    env = {**os.environ, "TINYGPT_PL_CACHE": str(cache), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "tinygpt_pl.doctor", "--steps", "2", "--write_mb", "16", "--ckpt_dir", str(ckpt)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    lines = report_lines(result.stdout)
    assert lines["torch"] == torch.__version__
    assert lines["python"] == sys.version.split()[0]
    assert {"CUDA", "NCCL", "lightning"} <= lines.keys()
    assert lines["GPUs"].startswith("none found: GPU checks (bf16 step, flash attention, NCCL all-reduce) not run")
    assert float(re.search(r"([\d,]+) tokens/s", lines["cpu step"])[1].replace(",", "")) > 0
    assert float(re.search(r"^gloo, 2 ranks, .* bus bandwidth ([\d.]+) GB/s$", lines["all-reduce"])[1]) > 0
    diff = re.search(r"over 2 ranks: losses .* within (\S+) \(fp32 tolerance 1e-05\)$", lines["DDP = one process"])
    assert float(diff[1]) <= 1e-5
    for name, folder in (("cache write", cache), ("checkpoint write", ckpt)):
        assert re.fullmatch(rf"{re.escape(str(folder))}: 16 MiB with fsync in .* MiB/s, .* GB free", lines[name])
    assert not cache.exists() and not any(ckpt.iterdir())  # the test files are deleted, a created folder too
    verdicts = [line for line in result.stdout.splitlines() if line.startswith("verdict")]
    assert verdicts == ["verdict: OK on CPU (no GPU found: GPU checks not run)"]
    assert result.stdout.splitlines()[-1] == verdicts[0]


def report_lines(stdout: str) -> dict[str, str]:
    """The report's lines by check name (the text before the first colon)."""
    return {line.split(":")[0]: line.split(":", 1)[1].strip() for line in stdout.splitlines()}


def test_unwritable_checkpoint_folder_fails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """A folder that cannot be written (its parent is a regular file: chmod would not stop root, who may run the
    tests) fails its check with the reason, the others still run, the verdict names it and the exit status is 1.
    The slow checks, which the test above runs, are stubbed out."""
    monkeypatch.setenv("TINYGPT_PL_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(doctor, "cpu_step", lambda steps: "stub")
    monkeypatch.setattr(doctor, "collective_checks", lambda gpus: [Result("all-reduce", OK, "stub")])
    (tmp_path / "a_file").write_text("")
    args = ["--ckpt_dir", str(tmp_path / "a_file" / "ckpt"), "--write_mb", "1"]
    status = exit_on_bad_input(auto_cli)(doctor.doctor, args=args, exit_on_error=False)
    out, err = capsys.readouterr()
    assert status == 1
    assert "Traceback" not in out + err
    lines = report_lines(out)
    assert lines["checkpoint write"].startswith("FAIL: NotADirectoryError: [Errno 20] Not a directory")
    assert "MiB/s" in lines["cache write"] and lines["all-reduce"] == "stub"
    verdicts = [line for line in out.splitlines() if line.startswith("verdict")]
    assert verdicts == ["verdict: PROBLEMS: checkpoint write (no GPU found: GPU checks not run)"]


def misbehaving_worker(rank: int, world: int, port: int) -> Iterator[Result]:
    """Rank 0 reports one result and hangs; rank 1 dies without reporting."""
    yield Result("first", OK, "fine")
    if rank == 0:
        time.sleep(600)
    os._exit(3)


@pytest.mark.slow  # waits out a 15 s time-out
def test_workers_that_hang_or_die_fail_and_are_reaped() -> None:
    """A worker that dies, or hangs past the deadline (then it is killed), fails the checks it did not report;
    no process is left behind."""
    start = time.monotonic()
    found = doctor.run_ranks(misbehaving_worker, 2, lambda rank: ["first", "second"], 15)
    assert time.monotonic() - start < 25
    assert found[0]["first"] == Result("first", OK, "fine")
    assert found[0]["second"] == Result("second", FAIL, "timed out after 15 s")
    assert found[1]["second"] == Result("second", FAIL, "process exit code 3")
    assert multiprocessing.active_children() == []
    assert doctor.merge_ranks("second", found).text == "rank 0: timed out after 15 s"


def test_kernel_reasons_pick_the_asked_kernels_warnings() -> None:
    """torch warns why each attention kernel was not used, a header warning then its reasons."""
    messages = [
        "Memory efficient kernel not used because: (Triggered internally at sdp_utils.cpp:1.)",
        "Memory Efficient attention has been runtime disabled. (Triggered internally at sdp_utils_cpp.h:2.)",
        "Flash attention kernel not used because: (Triggered internally at sdp_utils.cpp:3.)",
        "Flash attention only supports gpu architectures in the range [sm80, sm90]. (Triggered internally at x.)",
        "CuDNN attention kernel not used because:",
        "cuDNN is not available",
    ]
    assert doctor.kernel_reasons(messages, "Flash attention") == [
        "Flash attention only supports gpu architectures in the range [sm80, sm90]."
    ]
    efficient = doctor.kernel_reasons(messages, "Memory efficient")
    assert efficient == ["Memory Efficient attention has been runtime disabled."]


def test_verdicts() -> None:
    ok, failed, not_run = Result("a", OK, ""), Result("gpu 3 step", FAIL, "x"), Result("all-reduce", NOT_RUN, "")
    assert doctor.verdict([ok], gpus=8) == "verdict: OK: 8 GPUs, every check passed"
    assert doctor.verdict([ok, not_run], gpus=1) == "verdict: OK: 1 GPU, every check passed (not run: all-reduce)"
    assert doctor.verdict([ok, failed], gpus=8) == "verdict: PROBLEMS: gpu 3 step"
