"""Scale: DDP and FSDP across processes equal one process with the same global batch, the global batch sets the gradient
accumulation, compiled and plain checkpoints load into each other, throughput reaches TensorBoard, and runs the
machine cannot do are refused in one line."""

import os
import shutil
from pathlib import Path

import pytest
import torch
from conftest import train
from test_bad_input import assert_one_error_line
from test_train import events

from tinygpt_pl.errors import UsageError
from tinygpt_pl.load import load_checkpoint
from tinygpt_pl.training.cli import Machine, accumulation, check_precision, check_strategy, count_devices
from tinygpt_pl.training.module import GPTModule
from tinygpt_pl.training.throughput import peak_flops

# train/loss at every step, a validation every 2 steps (at indices 1, 3, 5, 7), one schedule for 8 steps
EVERY_STEP = ["--trainer.log_every_n_steps", "1", "--trainer.val_check_interval", "2", "--model.lr_decay_steps", "8",
              "--model.sample_tokens", "0", "--data.global_batch_size", "16"]  # fmt: skip
DDP = ["--trainer.devices", "2", "--trainer.strategy", "ddp"]
FSDP = ["--trainer.devices", "2", "--trainer.strategy", "fsdp"]


def scalars(root: Path, tag: str, version: int = 0) -> dict[int, float]:
    return {e.step: e.value for e in events(root, version).Scalars(tag)}


def assert_close(a: dict[int, float], b: dict[int, float]) -> None:
    assert a.keys() == b.keys()
    for step in a:
        assert a[step] == pytest.approx(b[step], abs=1e-5), step


@pytest.fixture(scope="module")
def one_process(tmp_path_factory: pytest.TempPathFactory, small_corpus: Path) -> Path:
    """8 steps in one process, the global batch of 16 as 2 accumulated micro-batches of 8: the reference run."""
    root = tmp_path_factory.mktemp("one")
    result = train(root, small_corpus, *EVERY_STEP, "--trainer.max_steps", "8")
    assert result.returncode == 0, result.stderr
    assert "global batch: 16 sequences = 1 devices x 8 x 2 accumulated" in result.stderr
    return root


def assert_same_run(run: Path, one: Path, steps: int) -> None:
    """train/loss and grad_norm at every step, and val/loss every 2 steps, as the one-process run logged them."""
    for tag in ("train/loss", "grad_norm"):
        logged = scalars(run, tag)
        assert sorted(logged) == list(range(steps)), tag
        assert_close(logged, {s: v for s, v in scalars(one, tag).items() if s < steps})
    # validation after the same optimizer steps (the accumulation does not move it), with the same loss
    val = scalars(run, "val/loss")
    assert sorted(val) == list(range(1, steps, 2))
    assert_close(val, {s: v for s, v in scalars(one, "val/loss").items() if s < steps})


def assert_resumes(run: Path, one: Path, corpus: Path, *args: str, ckpt: str = "last", version: int = 1) -> str:
    """The run's checkpoint (last.ckpt, or the file ckpt) resumed in one process (accumulating 2 micro-batches) to
    step 8 trains, validates, logs and saves the remaining steps as the uninterrupted one-process run did, under the
    same step indices. Returns what the resumed run printed."""
    path = run / "checkpoints" / "last.ckpt" if ckpt == "last" else Path(ckpt)
    saved_at = torch.load(path, weights_only=False)["global_step"]
    resumed = train(run, corpus, *EVERY_STEP, *args, "--trainer.max_steps", "8", "--ckpt_path", ckpt)
    assert resumed.returncode == 0, resumed.stderr
    assert_no_lightning_warnings(resumed.stderr)
    for tag in ("train/loss", "val/loss"):
        assert_close(scalars(run, tag, version), {s: v for s, v in scalars(one, tag).items() if s >= saved_at})
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 8
    assert not list((run / "checkpoints").glob("last-v*.ckpt"))  # last.ckpt itself went on
    return resumed.stderr


def assert_no_lightning_warnings(stderr: str) -> None:
    """Lightning warns of what it cannot know about this project's runs (a val/loss that torchmetrics already summed
    across ranks, a resumed run's own checkpoints in its folder, a loader that resumes by the step): none of that
    reaches the user."""
    assert not [line for line in stderr.splitlines() if "site-packages" in line or "Warning" in line], stderr


def test_ddp_on_two_processes_equals_one_process_and_resumes_in_one(
    tmp_path: Path, small_corpus: Path, one_process: Path
) -> None:
    two = train(tmp_path, small_corpus, *EVERY_STEP, *DDP, "--trainer.max_steps", "6")
    assert two.returncode == 0, two.stderr
    assert "global batch: 16 sequences = 2 devices x 8 x 1 accumulated" in two.stderr
    assert_no_lightning_warnings(two.stderr)
    assert_same_run(tmp_path, one_process, steps=6)
    assert "--checkpoint settings differ" not in assert_resumes(tmp_path, one_process, small_corpus)


@pytest.mark.slow  # test_interrupt resumes step-end saves, with accumulation, every step compared
def test_resumes_from_checkpoints_written_at_a_step_end_and_at_the_run_end(
    tmp_path: Path, small_corpus: Path, one_process: Path
) -> None:
    """A run of 7 steps validating every 2 steps: --checkpoint.every_n_train_steps 3 writes a checkpoint at the end
    of step 6 (before its validation), and last.ckpt holds step 7, written when the run ended. The resumed runs
    change the --checkpoint settings, which makes Lightning forget the run's checkpoints."""
    keep_all = ("--checkpoint.every_n_train_steps", "3", "--checkpoint.save_top_k", "-1")
    assert train(tmp_path, small_corpus, *EVERY_STEP, *keep_all, "--trainer.max_steps", "7").returncode == 0
    (step_end,) = (tmp_path / "checkpoints").glob("best-step6-*.ckpt")
    step_end = shutil.copy(step_end, step_end.with_name("step6.ckpt"))  # the resumed run keeps only its best one
    assert torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 7
    changed = "note: the --checkpoint settings differ from the checkpoint's: last.ckpt goes on, and the best"
    assert changed in assert_resumes(tmp_path, one_process, small_corpus, version=1)
    assert changed in assert_resumes(tmp_path, one_process, small_corpus, ckpt=str(step_end), version=2)


def test_fsdp_on_two_processes_equals_one_process_and_resumes_anywhere(
    tmp_path: Path, small_corpus: Path, one_process: Path
) -> None:
    """Sharded over 2 CPU processes (each Block its own FSDP unit), with gradient clipping over the shards; its
    checkpoint resumes with FSDP and in one process as the uninterrupted run goes on, and loads into a plain GPT."""
    run = tmp_path / "run"
    fsdp = train(run, small_corpus, *EVERY_STEP, *FSDP, "--trainer.max_steps", "6")
    assert fsdp.returncode == 0, fsdp.stderr
    assert_same_run(run, one_process, steps=6)
    model, _ = load_checkpoint(run / "checkpoints" / "last.ckpt")  # full tensors, strictly into a plain GPT
    assert model.num_params() == load_checkpoint(one_process / "checkpoints" / "last.ckpt")[0].num_params()
    shutil.copytree(run, tmp_path / "copy")
    assert_resumes(run, one_process, small_corpus)
    assert_resumes(tmp_path / "copy", one_process, small_corpus, *FSDP)


def test_fsdp_refuses_to_resume_a_checkpoint_saved_without_it(small_corpus: Path, one_process: Path) -> None:
    resumed = train(one_process, small_corpus, *EVERY_STEP, *FSDP, "--trainer.max_steps", "8", "--ckpt_path", "last")
    assert_one_error_line(resumed, "was not saved by an FSDP run", "resume it with the strategy it was saved with")


def test_val_loss_is_the_same_on_any_number_of_processes(tmp_path: Path, small_corpus: Path) -> None:
    """Validation alone (no training step): the same weights give the same val/loss on 1 and 2 processes."""
    no_training = ["--trainer.max_steps", "1", "--model.learning_rate", "1e-30", "--model.min_lr", "1e-30",
                   "--trainer.val_check_interval", "1", "--model.sample_tokens", "0"]  # fmt: skip
    one = train(tmp_path / "one", small_corpus, *no_training)
    two = train(tmp_path / "two", small_corpus, *no_training, *DDP)
    assert one.returncode == 0 and two.returncode == 0, one.stderr + two.stderr
    assert scalars(tmp_path / "one", "val/loss")[0] == pytest.approx(scalars(tmp_path / "two", "val/loss")[0], rel=1e-6)


@pytest.mark.slow  # torch.compile on 2 CPU cores: about a minute
def test_compiled_and_plain_checkpoints_resume_into_each_other(tmp_path: Path, small_corpus: Path) -> None:
    """An uncompiled run resumed compiled, then that checkpoint resumed uncompiled, ends where an uncompiled run
    of the same steps ends; no checkpoint holds torch.compile's "_orig_mod." keys."""
    quick = ["--model.sample_tokens", "0", "--trainer.val_check_interval", "2", "--model.lr_decay_steps", "6"]
    root = tmp_path / "switched"
    for max_steps, flags in (("2", []), ("4", ["--ckpt_path", "last", "--model.compile", "true"]),
                             ("6", ["--ckpt_path", "last"])):  # fmt: skip
        result = train(root, small_corpus, *quick, "--trainer.max_steps", max_steps, *flags)
        assert result.returncode == 0, result.stderr
        ckpt = torch.load(root / "checkpoints" / "last.ckpt", weights_only=True)
        assert ckpt["global_step"] == int(max_steps)
        assert ckpt["hyper_parameters"]["compile"] is (max_steps == "4")
        assert not any("_orig_mod" in key for key in ckpt["state_dict"])

    result = train(tmp_path / "plain", small_corpus, *quick, "--trainer.max_steps", "6")
    assert result.returncode == 0, result.stderr
    plain = torch.load(tmp_path / "plain" / "checkpoints" / "last.ckpt", weights_only=True)
    switched = torch.load(root / "checkpoints" / "last.ckpt", weights_only=True)
    for key, value in plain["state_dict"].items():
        torch.testing.assert_close(switched["state_dict"][key], value, rtol=0, atol=1e-4)
    load_checkpoint(root / "checkpoints" / "last.ckpt")  # into a plain GPT, strictly


def test_compile_switch_compiles_the_model_in_place() -> None:
    shape = dict(n_layer=1, n_head=2, n_embd=16, block_size=8)
    plain, compiled = GPTModule(**shape), GPTModule(**shape, compile=True)
    assert plain.model._compiled_call_impl is None and compiled.model._compiled_call_impl is not None
    assert plain.state_dict().keys() == compiled.state_dict().keys()


def test_throughput_and_grad_norm_in_tensorboard(debug_run: Path) -> None:
    """Logged every log_every_n_steps (5) steps only, at the same step indices as train/loss."""
    tokens = scalars(debug_run, "throughput/tokens_per_sec")
    assert sorted(tokens) == sorted(scalars(debug_run, "train/loss")) == [4, 9, 14, 19]
    assert sorted(scalars(debug_run, "grad_norm")) == [4, 9, 14, 19]
    assert tokens == scalars(debug_run, "throughput/device/tokens_per_sec")  # one device: all = device
    flops = scalars(debug_run, "throughput/device/flops_per_sec")
    model, _ = load_checkpoint(debug_run / "checkpoints" / "last.ckpt")
    for step, value in tokens.items():
        assert value > 0 and flops[step] / value == pytest.approx(model.flops_per_token(), rel=1e-5)
    assert "throughput/device/mfu" not in events(debug_run).Tags()["scalars"]  # no FLOP/s peak known for CPUs


@pytest.mark.parametrize(
    ("name", "precision", "expected"),
    [("NVIDIA H200", "bf16-mixed", 989.4e12), ("NVIDIA H200 NVL", "bf16-true", 989.4e12),
     ("NVIDIA H200", "32-true", 66.9e12), ("NVIDIA H100 80GB HBM3", "bf16-mixed", 989.4e12)],  # fp32: "highest"
)  # fmt: skip
def test_mfu_is_against_the_dense_peak_also_on_an_h200(monkeypatch, name, precision, expected) -> None:
    """CUDA names the H200 "NVIDIA H200", which Lightning's table misses (MFU would not be logged at all); its rows
    hold the with-sparsity figures. Seen on the first lent H200: the doctor's MFU rests on this."""
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    assert peak_flops(torch.device("cuda", 0), precision) == pytest.approx(expected)


@pytest.mark.parametrize(
    ("global_batch", "world_size", "batch_size", "accumulate", "expected"),
    [(None, 8, 4, 3, 3), (512, 8, 16, 1, 4), (512, 1, 16, 1, 32), (512, 16, 32, 1, 1), (64, 2, 8, 4, 4)],
)
def test_accumulation_comes_from_the_global_batch(global_batch, world_size, batch_size, accumulate, expected) -> None:
    assert accumulation(global_batch, world_size, batch_size, accumulate) == expected


GPU_NODE = Machine(gpus=8, cpus=64, gpu_bf16=True)


@pytest.mark.parametrize(
    ("accelerator", "devices", "expected"),
    [("auto", "auto", 8), ("gpu", -1, 8), ("cuda", "0,1,2", 3), ("gpu", [4, 5], 2), ("gpu", "8", 8), ("cpu", 4, 4)],
)
def test_device_count_as_lightning_reads_the_flag(accelerator, devices, expected) -> None:
    assert count_devices(accelerator, devices, GPU_NODE) == expected


def test_more_gpus_than_the_machine_has() -> None:
    with pytest.raises(Exception, match="this machine has only 8 GPUs: pass --trainer.devices 8 or fewer"):
        count_devices("gpu", 16, GPU_NODE)


def test_bf16_on_a_gpu_without_it() -> None:
    old_gpu = Machine(gpus=4, cpus=32, gpu_bf16=False)
    with pytest.raises(Exception, match="no bfloat16 support .* pass --trainer.precision 16-mixed or 32-true"):
        check_precision("bf16-mixed", gpu=True, machine=old_gpu)
    check_precision("16-mixed", gpu=True, machine=old_gpu)
    check_precision("bf16-true", gpu=False, machine=old_gpu)  # CPUs compute bf16 in software


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_distributed_strategy_on_a_torch_build_without_it(strategy: str, monkeypatch: pytest.MonkeyPatch) -> None:
    check_strategy(strategy)
    monkeypatch.setattr(torch.distributed, "is_available", lambda: False)  # as on builds made without distributed
    with pytest.raises(UsageError, match=f"--trainer.strategy {strategy}: this torch build has no torch.distributed"):
        check_strategy(strategy)
    check_strategy("auto")


@pytest.mark.parametrize(
    ("args", "fragments"),
    [
        (["--trainer.accelerator", "gpu"], ["this machine has no CUDA GPU", "--trainer.accelerator cpu"]),
        (["--trainer.devices", str(len(os.sched_getaffinity(0)) + 1)], ["this machine has only", "CPU core"]),
        (["--data.global_batch_size", "20"], ["--data.global_batch_size 20 is not a multiple of", "= 8"]),
        (["--data.global_batch_size", "32", "--trainer.accumulate_grad_batches", "2"], ["set only one"]),
    ],
    ids=["no-gpu", "too-many-devices", "global-batch-not-divisible", "accumulation-contradicts"],
)
def test_runs_the_machine_cannot_do(tmp_path: Path, corpus: Path, args: list[str], fragments: list[str]) -> None:
    result = train(tmp_path / "run", corpus, *args)
    assert_one_error_line(result, *fragments)
    assert not (tmp_path / "run").exists()  # refused before any work
