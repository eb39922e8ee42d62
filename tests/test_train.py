"""train.py and sample.py end to end, as a user runs them, on the debug config."""

import json
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ROOT, STARTED, run_script, train
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from tinygpt_pl.training.cli import TrainCLI
from tinygpt_pl.training.module import cosine_lr


def events(root: Path, version: int = 0) -> EventAccumulator:
    (path,) = (root / "lightning_logs" / f"version_{version}").glob("events.out.tfevents.*")
    return EventAccumulator(str(path)).Reload()


def test_debug_config_trains_end_to_end(debug_run):
    assert (debug_run / "checkpoints" / "last.ckpt").is_file()
    assert len(list((debug_run / "checkpoints").glob("best-step*-loss*.ckpt"))) == 1
    assert (debug_run / "lightning_logs" / "version_0" / "config.yaml").is_file()
    ea = events(debug_run)
    scalars = ea.Tags()["scalars"]
    assert {"train/loss", "val/loss", "val/ppl", "lr"} <= set(scalars)
    assert not {"epoch", "hp_metric"} & set(scalars)  # no placeholder cards
    assert "custom_scalars__config__" in ea.Tags()["tensors"]  # train and val loss on one chart
    val = ea.Scalars("val/loss")
    # Lightning logs at the 0-based index of the last optimizer step: validation after 10 steps lands on 9
    assert [e.step for e in val] == [9, 19] and val[1].value < val[0].value < 4.2
    assert "sample/text_summary" in ea.Tags()["tensors"]
    checkpoint = torch.load(debug_run / "checkpoints" / "last.ckpt", weights_only=True)
    assert checkpoint["global_step"] == 20


def test_a_moved_run_resumes_and_goes_on_managing_its_checkpoints(tmp_path, corpus, debug_run):
    """A run folder moved elsewhere (here: copied) resumes with --ckpt_path last and writes its checkpoints where
    they were: last.ckpt advances (no last-v1.ckpt beside it) and the best checkpoint is replaced, not added to."""
    moved = tmp_path / "moved"
    shutil.copytree(debug_run, moved)
    resumed = train(moved, corpus, "--trainer.max_steps", "30", "--model.lr_decay_steps", "20", "--ckpt_path", "last")
    assert resumed.returncode == 0, resumed.stderr
    names = sorted(p.name for p in (moved / "checkpoints").iterdir())
    assert names[1:] == ["last.ckpt"] and names[0].startswith("best-step30-"), names
    assert torch.load(moved / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 30


@pytest.mark.slow  # test_interrupt resumes a run stopped mid-way and compares every step
def test_resume_continues_exactly_like_an_uninterrupted_run(tmp_path, corpus):
    schedule = ["--model.lr_decay_steps", "20"]
    assert train(tmp_path / "whole", corpus, *schedule).returncode == 0
    first = train(tmp_path / "split", corpus, *schedule, "--trainer.max_steps", "10")
    assert first.returncode == 0, first.stderr
    resumed = train(tmp_path / "split", corpus, *schedule, "--ckpt_path", "last")
    assert resumed.returncode == 0, resumed.stderr

    whole = torch.load(tmp_path / "whole" / "checkpoints" / "last.ckpt", weights_only=True)
    split = torch.load(tmp_path / "split" / "checkpoints" / "last.ckpt", weights_only=True)
    assert split["global_step"] == whole["global_step"] == 20
    for key, value in whole["state_dict"].items():
        torch.testing.assert_close(split["state_dict"][key], value, rtol=0, atol=1e-6)

    lr = {e.step: e.value for e in events(tmp_path / "split", version=1).Scalars("lr")}
    assert min(lr) >= 10  # the resumed run starts at step 10, not 0
    for step, value in lr.items():
        assert value == pytest.approx(cosine_lr(step, 1e-3, 1e-4, 5, 20), rel=1e-5)


def test_sample_prints_text_from_the_checkpoint_alone(debug_run, tmp_path):
    ckpt = debug_run / "checkpoints" / "last.ckpt"
    result = run_script("sample.py", "--ckpt_path", str(ckpt), "--prompt", "ROMEO:", "--max_new_tokens", "40",
                        "--num_samples", "2", cwd=tmp_path)  # fmt: skip
    assert result.returncode == 0, result.stderr
    samples = result.stdout.split("---------------\n")
    assert len(samples) == 2
    assert all(s.startswith("ROMEO:") and len(s.rstrip("\n")) >= 40 for s in samples)
    again = run_script("sample.py", "--ckpt_path", str(ckpt), "--prompt", "ROMEO:", "--max_new_tokens", "40",
                       "--num_samples", "2", cwd=tmp_path)  # fmt: skip
    assert again.stdout == result.stdout  # --seed fixes the samples


def test_print_config_shows_resolved_values(corpus):
    result = run_script("train.py", "--config", "configs/shakespeare_char.yaml", "--model.n_layer", "4",
                        "--print_config")  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "n_layer: 4" in result.stdout and "block_size: 256" in result.stdout


@pytest.mark.parametrize(("args", "data_seed"), [(["--seed_everything", "5"], 5), (["--data.seed", "7"], 7)])
def test_seed_everything_fixes_the_data_order_too(tmp_path, corpus, args, data_seed):
    cli = TrainCLI(["--config", str(ROOT / "configs" / "debug.yaml"), "--data.path", str(corpus),
                    "--trainer.default_root_dir", str(tmp_path), *args])  # fmt: skip
    assert cli.datamodule.seed == data_seed


def test_a_checkpoint_from_before_nanogpts_order_resumes_exactly(tmp_path, corpus):
    """A checkpoint written while the GPT created its position embedding after the Blocks (tests/fixtures, from commit
    a47ff2f) numbers its optimizer state in that order; resumed now, each parameter gets its own state back and the
    run logs the losses that commit's resume logged."""
    fixture = ROOT / "tests" / "fixtures" / "ckpt_a47ff2f_learned_pos_last.ckpt"
    expected = json.loads(fixture.with_suffix(".json").read_text())
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    shutil.copy(fixture, tmp_path / "run" / "checkpoints" / "last.ckpt")
    text = tmp_path / "corpus.txt"
    text.write_text(corpus.read_text()[:20_000])
    result = train(tmp_path / "run", text, "--ckpt_path", "last", "--trainer.max_steps", "8",
                   "--trainer.val_check_interval", "4", "--trainer.log_every_n_steps", "1", "--model.n_layer", "1",
                   "--model.n_embd", "16", "--data.block_size", "8", "--data.batch_size", "4",
                   "--model.sample_tokens", "0", "--data.cache_dir", str(tmp_path / "cache"))  # fmt: skip
    assert result.returncode == 0, result.stderr
    ea = events(tmp_path / "run")
    for tag, key in (("train/loss", "train_loss"), ("val/loss", "val_loss")):
        logged = {str(e.step): e.value for e in ea.Scalars(tag)}
        assert logged.keys() == expected[key].keys()
        for step, value in expected[key].items():
            assert logged[step] == pytest.approx(value, abs=1e-5), (tag, step)


def test_the_first_screen_says_what_trains_where_and_warns_of_a_run_too_long_for_the_machine(tmp_path, small_corpus):
    """Four lines before the first step (what trains on what, the global batch, where the run writes, how to watch it),
    no warning about our own code, and after the first steps one line saying the run cannot finish in reasonable time
    on this CPU, with the config that suits it."""
    args = [
        "--config",
        "configs/debug.yaml",
        "--data.path",
        str(small_corpus),
        "--trainer.default_root_dir",
        str(tmp_path / "run"),
        "--trainer.max_steps",
        "10000000",
        "--trainer.val_check_interval",
        "1000000",
    ]
    proc = subprocess.Popen([sys.executable, "train.py", *args], cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip
    STARTED.append(proc)
    lines = []
    for line in proc.stderr:
        lines.append(line.rstrip("\n"))
        if line.startswith(("warning:", "estimate:")):
            break
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=60)
    assert lines[0].startswith("training a GPT (2 layers x 32, 2 heads, 0.03M parameters) on small.txt (char tokenizer")
    assert lines[1].startswith(
        "global batch: 8 sequences = 1 devices x 8 x 1 accumulated, of 32 tokens; 10000000 steps"
    )
    assert lines[2].startswith(f"writing to {tmp_path / 'run'}: checkpoints in {tmp_path / 'run' / 'checkpoints'}")
    assert lines[3] == f"watch it: tensorboard --logdir {tmp_path / 'run'}"
    assert len(lines) == 5 and lines[4].startswith("warning: ") and "configs/shakespeare_char_cpu.yaml" in lines[4]
