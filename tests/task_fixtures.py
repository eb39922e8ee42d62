"""Made-up task documents in the Hugging Face hub's format of each benchmark (hellaswag, arc_easy, piqa,
lambada_openai), cut from tiny Shakespeare so that a char model can encode them; lm-eval task configs that read
them from disk (lm-eval's own task definitions with `dataset_path: json`); and lm-eval's `--model hf` run on them, as
a user runs it, with its results set beside evaluate's, for agreement checks offline (tests and
benchmarks/evaluation.py)."""

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import lm_eval

LM_EVAL_TASKS = Path(lm_eval.__file__).parent / "tasks"
LM_EVAL_YAML = {"hellaswag": "hellaswag/hellaswag.yaml", "arc_easy": "arc/arc_easy.yaml", "piqa": "piqa/piqa.yaml",
                "lambada_openai": "lambada/lambada_openai.yaml"}  # fmt: skip
SPLIT = {"hellaswag": "validation", "arc_easy": "test", "piqa": "validation", "lambada_openai": "test"}


def phrases(corpus: str) -> list[str]:
    return [s for line in corpus.splitlines() if len(s := line.strip()) > 12 and ":" not in s and " " in s]


def documents(task: str, corpus: str, n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    lines = phrases(corpus)
    docs = []
    for i in range(n):
        line, *others = rng.sample(lines, 5)
        words = line.split(" ")
        cut = rng.randrange(1, len(words))
        head, tail = " ".join(words[:cut])[-40:].lstrip(), " ".join(words[cut:])[:20].rstrip()
        label = rng.randrange(4)
        if task == "hellaswag":
            endings = [o[: rng.randrange(5, 20)] for o in others[:3]]
            endings.insert(label, tail)
            # WikiHow's bracketed artifacts, which lm-eval's prompt strips, in the label: `ctx` stays encodable
            extra = " [title]" if i % 3 == 0 else " [header] aside" if i % 3 == 1 else ""
            ctx_a, ctx_b = head, others[3].lower()[:12] if i % 4 else ""
            docs.append({"ind": i, "activity_label": others[3].split(" ")[0].strip(",.;!?") + extra, "ctx_a": ctx_a,
                         "ctx_b": ctx_b, "ctx": f"{ctx_a} {ctx_b}" if ctx_b else ctx_a, "endings": endings,
                         "label": str(label), "split": "val", "source_id": f"made-up~{i}"})  # fmt: skip
        elif task == "arc_easy":
            k = rng.choice((3, 4, 5))
            texts = [o[: rng.randrange(3, 20)] for o in others[: k - 1]]
            texts.insert(label % k, tail)
            keys = "ABCDE"[:k] if i % 2 else "12345"[:k]
            docs.append({"id": f"made-up-{i}", "question": head + "?", "choices": {"text": texts, "label": list(keys)},
                         "answerKey": keys[label % k]})  # fmt: skip
        elif task == "piqa":
            sols = [tail, others[0][: rng.randrange(5, 20)]]
            docs.append({"goal": head, "sol1": sols[label % 2], "sol2": sols[1 - label % 2], "label": label % 2})
        else:
            docs.append({"text": line[:60]})
    return docs


def write_documents(folder: Path, task: str, corpus: str, n: int, seed: int = 0) -> Path:
    path = folder / f"{task}.jsonl"
    path.write_text("".join(json.dumps(doc) + "\n" for doc in documents(task, corpus, n, seed)))
    return path


def lm_eval_task(folder: Path, task: str, data: Path) -> str:
    """lm-eval's task reading the documents in data from disk: its config in folder (for --include_path), its name."""
    name = f"{task}_local"
    (folder / f"{name}.yaml").write_text(
        f"include: {LM_EVAL_TASKS / LM_EVAL_YAML[task]}\ntask: {name}\ntag: []\ndataset_path: json\n"
        f"dataset_name: null\ndataset_kwargs:\n  data_files:\n    {SPLIT[task]}: {data}\ntraining_split: null\n"
        + ("validation_split: null\n" if SPLIT[task] == "test" else "")
    )
    return name


def lm_eval_command(model_dir: Path, data: dict[str, Path], folder: Path, batch_size: int) -> list[str]:
    """lm_eval --model hf on an exported folder (fp32, CPU) over local copies of the tasks (configs written in folder),
    its samples logged under folder/lm_eval."""
    names = [lm_eval_task(folder, task, path) for task, path in data.items()]
    return [sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args", f"pretrained={model_dir},dtype=float32",
            "--tasks", ",".join(names), "--include_path", str(folder), "--device", "cpu", "--batch_size",
            str(batch_size), "--output_path", str(folder / "lm_eval"), "--log_samples"]  # fmt: skip


OFFLINE = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


def run_lm_eval(model_dir: Path, data: dict[str, Path], folder: Path, batch_size: int = 8) -> dict[str, dict]:
    """lm-eval's results for each task (by our name): its metrics and every example's logged choices'
    log-likelihoods, in document order."""
    proc = subprocess.run(lm_eval_command(model_dir, data, folder, batch_size), capture_output=True, text=True,
                          env=OFFLINE, timeout=1800)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    (results,) = (folder / "lm_eval").rglob("results_*.json")
    out = {}
    for task in data:
        (samples,) = (folder / "lm_eval").rglob(f"samples_{task}_local_*.jsonl")
        docs = sorted((json.loads(line) for line in samples.read_text().splitlines()), key=lambda d: d["doc_id"])
        metrics = json.loads(results.read_text())["results"][f"{task}_local"]
        out[task] = {"metrics": {k.removesuffix(",none"): v for k, v in metrics.items() if k.endswith(",none")},
                     "loglikelihoods": [[float(ll) for ll, _ in doc["filtered_resps"]] for doc in docs]}  # fmt: skip
    return out


def agreement(ours: dict, theirs: dict) -> dict[str, dict]:
    """Per task: evaluate's and lm-eval's acc and acc_norm, and the largest difference between their log-likelihoods
    of one choice."""
    out = {}
    for task, result in theirs.items():
        mine = ours["tasks"][task]
        lls = [(a, b) for x, y in zip(mine["loglikelihoods"], result["loglikelihoods"], strict=True)
               for a, b in zip(x, y, strict=True)]  # fmt: skip
        out[task] = {"examples": len(result["loglikelihoods"]), "choices": len(lls),
                     "max_difference": max(abs(a - b) for a, b in lls),
                     "metrics": {m: (mine["metrics"][m]["value"], result["metrics"][m])
                                 for m in ("acc", "acc_norm") if m in result["metrics"]}}  # fmt: skip
    return out
