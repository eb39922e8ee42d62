"""Evaluation (issue 17) against lm-evaluation-harness: agreement, speed, and its cost during training.

- Agreement: evaluate and `lm_eval --model hf` on the exported folder (fp32, CPU) over the same made-up documents in
  the hub's format (tests/task_fixtures.py), every task: acc and acc_norm, and the largest difference between their
  log-likelihoods of one choice (target 1e-4). Two models: the CPU recipe's char model and a GPT-2-tokenizer one.
- Speed: both commands as whole processes, alternated, on made-up HellaSwag documents with the CPU recipe's model,
  the same batch size (target: evaluate at least 3x faster, medians).
- During training: one validation of GPTModule with eval_tasks on (trainer.validate, the real hooks): the time of its
  evaluation against that of its validation pass over as many tokens (target at most 1.3x).

    python benchmarks/evaluation.py --data-path /path/to/tinyshakespeare.txt [--repeats 3]

The model is a short train.py run of configs/shakespeare_char_cpu.yaml (--steps, default 100), not the full recipe:
the costs do not depend on the weights. OMP_NUM_THREADS=1 (set unless given) keeps torch's threads from waiting on
each other on a busy machine; the section records it and the load.
"""

import argparse
import math
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from importlib.metadata import version
from pathlib import Path

from cpu_recipe import DEFAULT_CONFIG, run_timed
from results import REPO, RESULTS, record, stamp

sys.path[:0] = [str(REPO), str(REPO / "tests")]  # this checkout's package; the tests' documents and lm-eval run
from task_fixtures import OFFLINE, agreement, lm_eval_command, run_lm_eval, write_documents  # noqa: E402

TITLE = "Evaluation against lm-evaluation-harness (benchmarks/evaluation.py)"
TASKS = ("hellaswag", "arc_easy", "piqa", "lambada_openai")


def train_and_export(work: Path, data_path: str, steps: int) -> tuple[Path, Path]:
    """The CPU recipe's model after `steps` steps of train.py: its checkpoint, and its export."""
    run_timed([sys.executable, "train.py", "--config", str(DEFAULT_CONFIG), "--data.path", data_path,
               "--trainer.default_root_dir", str(work / "run"), "--trainer.max_steps", str(steps),
               "--trainer.val_check_interval", str(steps), "--trainer.enable_progress_bar", "false"],
              work / "train.log")  # fmt: skip
    ckpt = work / "run" / "checkpoints" / "last.ckpt"
    run_timed([sys.executable, "-m", "tinygpt_pl.export", "--ckpt_path", str(ckpt), "--out", str(work / "hf")],
              work / "export.log")  # fmt: skip
    return ckpt, work / "hf"


def gpt2_standin(folder: Path) -> Path:
    """A random tiny GPT2LMHeadModel with GPT-2's BPE (the tests' stand-in for GPT-2), exported through ours."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from tinygpt_pl.data.tokenizer import get_tokenizer
    from tinygpt_pl.hf.tokenizer import hf_tokenizer

    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(n_layer=2, n_head=4, n_embd=64, n_positions=128)).save_pretrained(folder)
    hf_tokenizer(get_tokenizer("gpt2")).save_pretrained(folder)
    return folder


def agreement_rows(name: str, source: str, model_dir: Path, text: str, n: int, work: Path) -> list[str]:
    from tinygpt_pl.evaluate import evaluate

    work.mkdir()
    data = {task: write_documents(work, task, text, n, seed=2) for task in TASKS}
    theirs = run_lm_eval(model_dir, data, work, batch_size=32)
    ours = evaluate(ckpt_path=source, tasks=",".join(TASKS), task_data=",".join(f"{t}={p}" for t, p in data.items()),
                    batch_size=32, progress=False)  # fmt: skip
    rows = []
    for task, figures in agreement(ours, theirs).items():
        metrics = ", ".join(f"{m} {a:.4f} / {b:.4f}" for m, (a, b) in figures["metrics"].items())
        equal = "yes" if all(a == b for a, b in figures["metrics"].values()) else "**no**"
        rows.append(f"| {name} | {task} | {figures['examples']} ({ours['tasks'][task]['cropped']} cropped) "
                    f"| {figures['choices']} | {metrics} | {equal} | {figures['max_difference']:.1e} |")  # fmt: skip
    return rows


def speed(ckpt: Path, model_dir: Path, text: str, n: int, batch_size: int, repeats: int, work: Path) -> dict:
    """Whole-process wall times of lm_eval and evaluate on n HellaSwag documents, alternated."""
    work.mkdir()
    data = write_documents(work, "hellaswag", text, n, seed=3)
    lm_eval = lm_eval_command(model_dir, {"hellaswag": data}, work, batch_size)
    ours = [sys.executable, "-m", "tinygpt_pl.evaluate", "--ckpt_path", str(ckpt), "--tasks", "hellaswag",
            "--task_data", f"hellaswag={data}", "--batch_size", str(batch_size), "--progress", "false"]  # fmt: skip
    times = {"lm_eval": [], "evaluate": []}
    for i in range(repeats):
        for name, cmd in (("lm_eval", lm_eval), ("evaluate", ours)):
            log = work / f"{name}{i}.log"
            start = time.perf_counter()
            proc = subprocess.run(cmd, cwd=REPO, stdout=log.open("w"), stderr=subprocess.STDOUT, env=OFFLINE)
            times[name].append(time.perf_counter() - start)
            if proc.returncode != 0:
                sys.exit(f"{shlex.join(cmd)} failed ({proc.returncode}):\n{log.read_text()[-3000:]}")
    return {"times": times, "lm_eval": lm_eval, "evaluate": ours}


def in_training(ckpt: Path, data_path: str, text: str, n: int, repeats: int, work: Path) -> dict:
    """trainer.validate of the checkpoint's GPTModule with hellaswag (n examples) on: the validation pass (over as
    many val tokens as the evaluation feeds the model) and the evaluation after it, timed by a callback."""
    import lightning as L
    import yaml

    from tinygpt_pl.data.datamodule import TextDataModule
    from tinygpt_pl.load import read_checkpoint
    from tinygpt_pl.training.module import GPTModule

    work.mkdir()
    data_file = write_documents(work, "hellaswag", text, n, seed=4)
    checkpoint = read_checkpoint(ckpt)
    hparams = {k: v for k, v in checkpoint["hyper_parameters"].items() if not k.startswith("_")}
    module = GPTModule(**{**hparams, "sample_tokens": 0, "eval_tasks": ["hellaswag"], "eval_limit": n,
                          "eval_task_data": {"hellaswag": str(data_file)}})  # fmt: skip
    module.load_state_dict(checkpoint["state_dict"])
    config = yaml.safe_load(DEFAULT_CONFIG.read_text())
    datamodule = TextDataModule(path=data_path, **config["data"])
    datamodule.setup("validate")
    module.evaluation.prepare(datamodule.tokenizer, module.hparams.block_size)
    requests = module.evaluation.prepared[0].encoded.requests
    tokens = sum(len(r.context) + sum(map(len, r.continuations)) for r in requests)
    per_batch = datamodule.batch_size * datamodule.block_size
    batches = math.ceil(tokens / per_batch)

    class Clock(L.Callback):
        def on_validation_epoch_start(self, trainer, pl_module) -> None:
            self.start = time.perf_counter()

        def on_validation_epoch_end(self, trainer, pl_module) -> None:  # before the module's: the evaluation
            self.validated = time.perf_counter()

        def on_validation_end(self, trainer, pl_module) -> None:
            self.end = time.perf_counter()

    ratios, val_s, eval_s = [], [], []
    for _ in range(repeats):
        clock = Clock()
        trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, callbacks=[clock],
                            enable_model_summary=False, limit_val_batches=batches)  # fmt: skip
        trainer.validate(module, datamodule=datamodule, verbose=False)
        val_s.append(clock.validated - clock.start)
        eval_s.append(clock.end - clock.validated)
        ratios.append(eval_s[-1] / val_s[-1])
    return {"tokens": tokens, "batches": batches, "per_batch": per_batch, "val": val_s, "eval": eval_s,
            "ratios": ratios, "requests": len(requests)}  # fmt: skip


def shown(cmd: list[str]) -> str:
    return shlex.join(["python" if cmd[0] == sys.executable else cmd[0], *cmd[1:]])


def load() -> str:
    return "load average " + " ".join(f"{x:.1f}" for x in os.getloadavg()) + f" on {os.cpu_count()} CPUs"


def benchmark(args: argparse.Namespace) -> None:
    data_path = str(Path(args.data_path).resolve())
    text = Path(data_path).read_text()
    loads = [load()]
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        ckpt, model_dir = train_and_export(work, data_path, args.steps)
        standin = gpt2_standin(work / "gpt2-standin")
        from tinygpt_pl.export import main as export

        export(["--ckpt_path", str(standin), "--out", str(work / "gpt2-export")])
        rows = agreement_rows("char, CPU recipe", str(ckpt), model_dir, text, args.agreement_examples, work / "a1")
        rows += agreement_rows("GPT-2 BPE, random", str(standin), work / "gpt2-export", text,
                               args.agreement_examples, work / "a2")  # fmt: skip
        loads.append(load())
        fast = speed(ckpt, model_dir, text, args.examples, args.batch_size, args.repeats, work / "speed")
        loads.append(load())
        cost = in_training(ckpt, data_path, text, args.eval_examples, args.repeats, work / "training")
        loads.append(load())
    times = fast["times"]
    lm, ours = statistics.median(times["lm_eval"]), statistics.median(times["evaluate"])
    ratio = statistics.median(cost["ratios"])
    body = "\n".join([
        stamp(),
        f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}; torch {version('torch')}, lm-eval "
        f"{version('lm_eval')}, transformers {version('transformers')}. Machine shared with other work while it ran "
        f"({'; '.join(loads)}): absolute times are inflated, the ratios come from alternated side-by-side runs.",
        "",
        f"Model: configs/shakespeare_char_cpu.yaml's (4 layers, 128 wide, 64-character context) after a {args.steps}-"
        "step train.py run, exported with `python -m tinygpt_pl.export`; and a random tiny GPT2LMHeadModel with "
        "GPT-2's BPE (2 layers, 64 wide, 128 positions) loaded by evaluate from its folder and exported through ours. "
        "Documents: made up in the hub's format from tiny Shakespeare (tests/task_fixtures.py).",
        "",
        "### Agreement (target: acc, acc_norm equal; every choice's log-likelihood within 1e-4)",
        "",
        "`lm_eval --model hf --model_args pretrained=EXPORT,dtype=float32 --device cpu --batch_size 32 --log_samples` "
        "on local copies of the tasks, against `evaluate(... --batch_size 32)` on the checkpoint (or folder).",
        "",
        "| model | task | examples | choices | evaluate / lm-eval | equal | max log-likelihood difference |",
        "|---|---|---|---|---|---|---|",
        *rows,
        "",
        f"### Speed on {args.examples} HellaSwag documents (target: evaluate >= 3x faster)",
        "",
        f"Whole processes, alternated, {args.repeats} each, batch size {args.batch_size}:  ",
        f"`{shown(fast['lm_eval'])}`  ",
        f"`{shown(fast['evaluate'])}`",
        "",
        "| command | runs (s) | median (s) |",
        "|---|---|---|",
        f"| lm_eval --model hf | {', '.join(f'{t:.1f}' for t in times['lm_eval'])} | {lm:.1f} |",
        f"| tinygpt_pl.evaluate | {', '.join(f'{t:.1f}' for t in times['evaluate'])} | {ours:.1f} |",
        "",
        f"evaluate is **{lm / ours:.2f}x** faster (median against median). It scores more: lm-eval runs each of the "
        "4 choices' requests (acc, acc_norm); evaluate runs those and build-nanogpt's rendering of each example for "
        "acc_token_mean, twice the contexts.",
        "",
        "### During training (target: evaluation <= 1.3x a validation pass over as many tokens)",
        "",
        f"trainer.validate of the checkpoint's GPTModule with `eval_tasks [hellaswag]`, `eval_limit "
        f"{args.eval_examples}` (eval_batch_size 32): {cost['requests']} requests, {cost['tokens']:,} tokens of text "
        "(each context once, every continuation: what one pass of the model over them costs); the validation pass "
        f"before it over {cost['batches']} "
        f"batches of {cost['per_batch']} tokens; timed by a callback, {args.repeats} runs.",
        "",
        "| run | validation pass (s) | evaluation (s) | ratio |",
        "|---|---|---|---|",
        *(f"| {i + 1} | {v:.2f} | {e:.2f} | {r:.2f} |"
          for i, (v, e, r) in enumerate(zip(cost["val"], cost["eval"], cost["ratios"], strict=True))),
        "",
        f"Median ratio **{ratio:.2f}x**.",
    ])  # fmt: skip
    record(TITLE, body, args.results)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-path", required=True, help="tiny Shakespeare: the model's training text and documents")
    parser.add_argument("--steps", type=int, default=100, help="train.py steps of the CPU recipe's model")
    parser.add_argument("--agreement-examples", type=int, default=200, help="documents per task for agreement")
    parser.add_argument("--examples", type=int, default=1000, help="HellaSwag documents for the speed comparison")
    parser.add_argument("--eval-examples", type=int, default=200, help="HellaSwag documents evaluated in training")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--results", type=Path, default=RESULTS, help="the Markdown file to write the section into")
    args = parser.parse_args()
    benchmark(args)


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
