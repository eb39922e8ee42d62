"""Evaluation (tinygpt_pl/evaluation, python -m tinygpt_pl.evaluate): log-likelihoods against a plain forward pass per
continuation (lm-eval's definition), metrics and their stderr against lm-eval's own functions, ranks' counts summed,
the command's table and JSON, and each bad input in one line."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from lm_eval.api.metrics import mean_stderr
from task_fixtures import documents, write_documents
from torch.nn import functional as F

from tinygpt_pl.data.tokenizer import CharTokenizer, get_tokenizer
from tinygpt_pl.evaluate import main as evaluate
from tinygpt_pl.evaluate import number
from tinygpt_pl.evaluation.evaluator import evaluate_task, prepare
from tinygpt_pl.evaluation.metrics import TaskCounts
from tinygpt_pl.evaluation.scoring import Score, encode, encode_pair, score
from tinygpt_pl.evaluation.tasks import TASKS, Example
from tinygpt_pl.model import GPT, GPTConfig

TASK_NAMES = ",".join(TASKS)


@pytest.fixture(scope="module")
def text(corpus: Path) -> str:
    return corpus.read_text()


@pytest.fixture(scope="module")
def model_and_tokenizer(text: str) -> tuple[GPT, CharTokenizer]:
    """A random GPT with a short context (16), so that some examples fit it and others are cropped."""
    torch.manual_seed(0)
    tokenizer = CharTokenizer.from_text(text)
    return GPT(
        GPTConfig(vocab_size=tokenizer.vocab_size, block_size=16, n_layer=2, n_head=2, n_embd=16)
    ).eval(), tokenizer


def plain_loglikelihood(model: GPT, context: list[int], continuation: list[int]) -> tuple[float, bool]:
    """lm-eval's HFLM: (context + continuation)[-(block_size + 1):][:-1] in one forward pass, the continuation's
    log-probabilities summed."""
    window = (context + continuation)[-(model.config.block_size + 1) :]
    with torch.no_grad():
        logits, _ = model(torch.tensor([window[:-1]]))
    logprobs = F.log_softmax(logits[0, -len(continuation) :], dim=-1)
    target = torch.tensor(continuation)
    return logprobs.gather(1, target[:, None]).sum().item(), bool((logprobs.argmax(-1) == target).all())


@pytest.mark.parametrize("pos_emb", ["learned", "rotary"])
def test_scores_are_those_of_a_forward_pass_per_continuation(model_and_tokenizer, pos_emb) -> None:
    """Each continuation packed after its context in one row, at the positions it has alone, scores as lm-eval's
    forward pass of context + continuation does; with rotary positions too."""
    model, tokenizer = model_and_tokenizer
    if pos_emb == "rotary":
        torch.manual_seed(0)
        model = GPT(GPTConfig(**{**vars(model.config), "pos_emb": "rotary"})).eval()
    examples = [Example("To be", [" or", " not to be", "!"], ["or", "not to be", "!"], 0),
                Example("Once more unto the breach, dear friends", [" once", " more"], ["once", "more"], 1),
                Example("A horse,", [" a horse! my kin", " m"], ["", ""], 0),
                Example("Now is the winter  ", ["of", "our discontent"], ["", ""], 0),
                Example("Now is", [" the wint", " of our d", " made glo"], ["", "", ""], 2)]  # fmt: skip
    encoded = encode(examples, tokenizer, model.config.block_size)
    assert encoded.cropped == {1, 2, 3}  # longer than 16 + 1 tokens with one of their continuations
    assert len(encoded.requests[-1].continuations) == 3  # one row of 30 tokens, past the 16 positions: each at its own
    for batch_size in (1, 3, 64):
        scores = score(model, encoded, len(examples), tokenizer.vocab_size, batch_size)
        for example, example_scores in zip(examples, scores, strict=True):
            for continuation, got in zip(example.continuations, example_scores, strict=True):
                context, cont = encode_pair(tokenizer, example.context, continuation)
                ll, greedy = plain_loglikelihood(model, context, cont)
                assert got.loglikelihood == pytest.approx(ll, abs=1e-5) and got.greedy == greedy
                assert got.tokens == len(cont)
    # the context's trailing spaces belong to the continuation, as in lm-eval
    assert encode_pair(tokenizer, "winter  ", "of") == (tokenizer.encode("winter"), tokenizer.encode("  of"))


def test_each_context_is_fed_once_for_all_its_continuations(model_and_tokenizer, monkeypatch) -> None:
    model, tokenizer = model_and_tokenizer
    examples = [Example("To be", [" or", " not to be", "!"], ["or", "not to be", "!"], 0),
                Example("Now", [" is", " was"], ["", ""], 1)]  # fmt: skip
    encoded = encode(examples, tokenizer, model.config.block_size)
    fed = []
    hidden_states = model.hidden_states
    monkeypatch.setattr(model, "hidden_states", lambda idx, **kw: fed.append(idx.shape) or hidden_states(idx, **kw))
    score(model, encoded, len(examples), tokenizer.vocab_size, batch_size=64)
    row = len("To be") + len(" or") - 1 + len(" not to be") - 1 + len("!") - 1  # the last token of each: never fed
    assert fed == [torch.Size([2, row])]  # one pass, a row per context; the shorter row padded


def test_bpe_continuation_is_what_follows_the_contexts_own_tokens() -> None:
    """lm-eval splits the encoding of the whole text after the context's own tokens, which BPE may merge across."""
    gpt2 = get_tokenizer("gpt2")
    context, continuation = encode_pair(gpt2, "The answer is ", "42.")
    assert context == gpt2.encode("The answer is") and context + continuation == gpt2.encode("The answer is 42.")


def build_nanogpt_mean_losses(model: GPT, tokenizer, doc: dict) -> list[float]:
    """build-nanogpt's hellaswag.py: the raw ctx and " " + each raw ending, encoded apart, padded into one batch; the
    mean cross-entropy over each ending's tokens."""
    ctx = tokenizer.encode(doc["ctx"])
    ends = [tokenizer.encode(" " + ending) for ending in doc["endings"]]
    width = max(len(ctx) + len(end) for end in ends)
    tokens = torch.tensor([ctx + end + [0] * (width - len(ctx) - len(end)) for end in ends])
    mask = torch.tensor([[0] * len(ctx) + [1] * len(end) + [0] * (width - len(ctx) - len(end)) for end in ends])
    with torch.no_grad():
        logits, _ = model(tokens)
    losses = F.cross_entropy(logits[:, :-1].flatten(0, 1), tokens[:, 1:].flatten(), reduction="none")
    losses = losses.view(len(ends), -1) * mask[:, 1:]
    return (losses.sum(1) / mask[:, 1:].sum(1)).tolist()


def test_acc_token_mean_is_build_nanogpts_on_hellaswag(text) -> None:
    """HellaSwag's acc_token_mean scores build-nanogpt's rendering (raw ctx, raw endings, BPE-encoded apart), while
    acc and acc_norm keep lm-eval's prompt; the model is GPT-2's vocabulary, untrained."""
    gpt2 = get_tokenizer("gpt2")
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=gpt2.vocab_size, block_size=64, n_layer=2, n_head=2, n_embd=16)).eval()
    docs = documents("hellaswag", text, 40)
    docs[1] = {**docs[1], "endings": [" ".join(e.split()) + ",  " for e in docs[1]["endings"]]}  # raw: spaces kept
    examples = [TASKS["hellaswag"].example(doc) for doc in docs]
    assert examples[0].context.startswith(docs[0]["activity_label"].split(" ")[0] + ". :")  # lm-eval's prompt
    encoded = encode(examples, gpt2, 64)
    assert not encoded.cropped and len(encoded.requests) == 2 * len(docs)  # lm-eval's context, and the raw ctx
    scores = score(model, encoded, len(docs), gpt2.vocab_size, batch_size=7)
    counts = TaskCounts("multiple_choice")
    right = 0
    for doc, example, example_scores in zip(docs, examples, scores, strict=True):
        assert len(example_scores) == 8
        counts.add_example(example, example_scores)
        theirs = build_nanogpt_mean_losses(model, gpt2, doc)
        assert [-s.loglikelihood / s.tokens for s in example_scores[4:]] == pytest.approx(theirs, abs=1e-5)
        right += min(range(4), key=theirs.__getitem__) == int(doc["label"])
        lm_eval_lls = [plain_loglikelihood(model, *encode_pair(gpt2, example.context, c))[0]
                       for c in example.continuations]  # fmt: skip
        assert [s.loglikelihood for s in example_scores[:4]] == pytest.approx(lm_eval_lls, abs=1e-5)
    assert counts["acc_token_mean"] == right


def test_metrics_and_stderr_as_lm_eval_computes_them() -> None:
    lls = [[-1.0, -2.0, -0.5], [-3.0, -1.0, -1.2], [-2.0, -2.0, -9.0], [-4.0, -0.1, -3.0]]
    choices = [["a", "bb", "cccccc"], ["aaaa", "b", "cc"], ["a", "b", "c"], ["aa", "b", "ccc"]]
    tokens = [[1, 4, 1], [1, 1, 2], [2, 1, 1], [2, 1, 3]]
    golds = [2, 1, 0, 0]
    counts = TaskCounts("multiple_choice")
    for ll, ch, tok, gold in zip(lls, choices, tokens, golds, strict=True):
        counts.add_example(Example("", ch, ch, gold), [Score(x, False, t) for x, t in zip(ll, tok, strict=True)])
    counts.add_example(Example("", [], [], 0), None)  # skipped: not counted
    acc = [1, 1, 1, 0]  # highest log-likelihood (the first of equals)
    acc_norm = [0, 1, 1, 0]  # per character: -1, -1, -0.083; -0.75, -1, -0.6; ...; -2, -0.1, -1
    acc_token_mean = [0, 1, 0, 0]  # per token: -1, -0.5, -0.5; -3, -1, -0.6; -1, -2, -9; -2, -0.1, -1
    results = counts.results()
    for metric, values in (("acc", acc), ("acc_norm", acc_norm), ("acc_token_mean", acc_token_mean)):
        assert results[metric]["value"] == sum(values) / 4
        assert results[metric]["stderr"] == pytest.approx(mean_stderr(values))
    assert counts["examples"] == 4 and counts["skipped"] == 1

    lambada = TaskCounts("last_word")
    for ll, greedy in ((-2.0, True), (-0.5, False), (-4.5, True)):
        lambada.add_example(Example("", [], [], 0), [Score(ll, greedy, 2)])
    results = lambada.results()
    assert results["acc"]["value"] == pytest.approx(2 / 3)
    assert results["perplexity"]["value"] == pytest.approx(math.exp(7 / 3))
    assert results["perplexity"]["stderr"] == pytest.approx(math.exp(7 / 3) * mean_stderr([-2.0, -0.5, -4.5]))


def test_ranks_counts_add_up_to_the_whole(model_and_tokenizer, text, tmp_path) -> None:
    _, tokenizer = model_and_tokenizer
    model = GPT(GPTConfig(vocab_size=tokenizer.vocab_size, block_size=32, n_layer=2, n_head=2, n_embd=16)).eval()
    for task in ("hellaswag", "lambada_openai"):
        prepared = prepare(TASKS[task], tokenizer, 32, str(write_documents(tmp_path, task, text, 25)))
        whole, _ = evaluate_task(model, prepared, tokenizer.vocab_size, batch_size=8)
        shares = [evaluate_task(model, prepared, tokenizer.vocab_size, 5, rank, 3)[0].counts for rank in range(3)]
        summed = TaskCounts(prepared.task.kind, sum(shares))
        assert summed["examples"] == whole["examples"] == 25
        for name in ("acc", "acc_norm", "acc_token_mean", "cropped"):
            assert summed[name] == whole[name]
        assert summed["loglikelihood"] == pytest.approx(whole["loglikelihood"], abs=1e-4)


@pytest.fixture(scope="module")
def task_files(tmp_path_factory, text) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("tasks")
    return {task: write_documents(folder, task, text, 20) for task in TASKS}


def task_data(files: dict[str, Path]) -> str:
    return ",".join(f"{task}={path}" for task, path in files.items())


def test_evaluate_prints_a_table_and_writes_json(debug_run, task_files, tmp_path, capsys) -> None:
    ckpt = debug_run / "checkpoints" / "last.ckpt"
    out = tmp_path / "results.json"
    evaluate(["--ckpt_path", str(ckpt), "--tasks", TASK_NAMES, "--task_data", task_data(task_files),
              "--limit", "12", "--batch_size", "5", "--out", str(out), "--progress", "false"])  # fmt: skip
    printed = capsys.readouterr().out.splitlines()
    results = json.loads(out.read_text())
    assert printed[0].split() == ["task", "metric", "value", "stderr", "examples"]
    rows = {tuple(line.split()[:2]): line.split()[2:] for line in printed[1:12]}
    for task, result in results["tasks"].items():
        assert result["examples"] == 12 and len(result["loglikelihoods"]) == 12
        for metric, figure in result["metrics"].items():
            assert rows[task, metric] == [number(figure["value"]), number(figure["stderr"]), "12"]
    assert set(results["tasks"]["hellaswag"]["metrics"]) == {"acc", "acc_norm", "acc_token_mean"}
    assert set(results["tasks"]["lambada_openai"]["metrics"]) == {"acc", "perplexity"}
    cropped = results["tasks"]["hellaswag"]["cropped"]  # the debug model's context is 32 characters
    note = f"hellaswag: {cropped} examples longer than the model's context (32 tokens) were cropped from the left"
    assert cropped > 0 and any(line.startswith(note) for line in printed)


def error_line(capsys, args: list[str]) -> str:
    with pytest.raises(SystemExit) as exit:
        evaluate([*args, "--progress", "false"])
    assert exit.value.code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1
    return errors[0]


def test_bad_input_gets_one_line(debug_run, task_files, tmp_path, capsys, text) -> None:
    ckpt = ["--ckpt_path", str(debug_run / "checkpoints" / "last.ckpt")]
    unknown = error_line(capsys, [*ckpt, "--tasks", "hellaswag,mmlu"])
    assert "unknown task 'mmlu': choose from hellaswag, arc_easy, piqa, lambada_openai" in unknown

    docs = documents("piqa", text, 5)
    del docs[3]["sol2"]
    bad = tmp_path / "piqa.jsonl"
    bad.write_text("".join(json.dumps(doc) + "\n" for doc in docs))
    missing = error_line(capsys, [*ckpt, "--tasks", "piqa", "--task_data", f"piqa={bad}"])
    assert f"{bad} line 4: no field 'sol2'" in missing
    bad.write_text('{"goal": "a", "sol1": "b", "sol2": "c", "label": 0}\nnot json\n')
    assert f"{bad} line 2: not a JSON object" in error_line(
        capsys, [*ckpt, "--tasks", "piqa", "--task_data", f"piqa={bad}"]
    )

    docs = documents("hellaswag", text, 6)
    docs[4]["endings"][1] = "café ☕"
    unseen = tmp_path / "hellaswag.jsonl"
    unseen.write_text("".join(json.dumps(doc) + "\n" for doc in docs))
    args = [*ckpt, "--tasks", "hellaswag", "--task_data", f"hellaswag={unseen}"]
    line = error_line(capsys, args)
    assert "example 4: characters 'é☕' are not in the model's vocabulary" in line and "--skip_unencodable" in line
    evaluate([*args, "--skip_unencodable", "true", "--progress", "false"])
    printed = capsys.readouterr().out
    assert "hellaswag: skipped 1 examples the tokenizer cannot encode: 4 (characters 'é☕'" in printed
    assert "hellaswag       acc" in printed and printed.split("\n")[1].split()[-1] == "5"

    out = tmp_path / "exists.json"
    out.write_text("{}")
    assert "exists: pass a new file" in error_line(capsys, [*args, "--out", str(out)])
    assert out.read_text() == "{}"
    assert "give TASK=PATH" in error_line(capsys, [*ckpt, "--tasks", "piqa", "--task_data", str(bad)])
    assert "no such file or folder" in error_line(capsys, [*ckpt, "--tasks", "piqa", "--task_data", "piqa=nope.jsonl"])
    assert "--limit must be >= 1" in error_line(capsys, [*ckpt, "--tasks", "piqa", "--limit", "0"])


def test_the_commands_that_load_a_model_start_without_lightning() -> None:
    """evaluate, sample.py and serve.py load models through load.py, which needs neither Lightning nor the training
    code: importing Lightning alone takes seconds, a third of a small evaluation's time."""
    code = ("import sys, tinygpt_pl.evaluate, tinygpt_pl.load, tinygpt_pl.generation.server; "
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'lightning', 'pytorch_lightning'}))")  # fmt: skip
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"
