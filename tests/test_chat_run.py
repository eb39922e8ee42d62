"""Chat fine-tuning end to end, as a user runs it: train.py --data.format chat from the debug run's checkpoint
(--model.init_from), then sample.py --chat true in a pseudo-terminal, serve.py's /v1/chat/completions through the
openai client, and the export's chat_template through transformers."""

import json
import os
import pty
import random
import select
import subprocess
import sys
from pathlib import Path

import openai
import pytest
import torch
from conftest import ROOT, run_script, train
from test_bad_input import assert_one_error_line
from test_serve import ONE_THREAD, url  # noqa: F401 (the server fixture, here serving the chat model)

from tinygpt_pl.data.chat import ChatTokenizer
from tinygpt_pl.generation.chat import Chat
from tinygpt_pl.generation.generate import Sampling
from tinygpt_pl.load import load_model
from tinygpt_pl.training.cli import main
from tinygpt_pl.training.init_from import init_from_state

GREEDY = ["--temperature", "0", "--max_new_tokens", "12"]


def reversals(path: Path, n: int, seed: int = 0) -> Path:
    """n conversations in tiny Shakespeare's alphabet: a word, and the word reversed."""
    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(n):
            word = "".join(rng.choice("abcdefghij") for _ in range(rng.randint(3, 6)))
            messages = [{"role": "user", "content": word}, {"role": "assistant", "content": word[::-1]}]
            f.write(json.dumps({"messages": messages}) + "\n")
    return path


def sft_args(root: Path, base: Path, *args: str) -> list[str]:
    return ["--model.init_from", str(base / "checkpoints" / "last.ckpt"), "--data.format", "chat",
            "--data.num_proc", "1", "--data.cache_dir", str(root.parent / "cache"), "--model.sample_tokens", "0",
            "--trainer.max_steps", "10", "--trainer.val_check_interval", "5", *args]  # fmt: skip


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory: pytest.TempPathFactory, debug_run: Path) -> Path:
    """The debug run fine-tuned for 10 steps on reversals with train.py: a (tiny) chat model."""
    root = tmp_path_factory.mktemp("sft") / "run"
    data = reversals(root.parent / "reversals.jsonl", 200)
    result = train(root, data, *sft_args(root, debug_run))
    assert result.returncode == 0, result.stderr
    return root


@pytest.fixture(scope="module")
def ckpt(sft_run: Path) -> Path:
    return sft_run / "checkpoints" / "last.ckpt"


def test_init_from_a_checkpoint_is_a_new_run_with_its_weights_and_tokenizer(sft_run, debug_run, ckpt):
    base = torch.load(debug_run / "checkpoints" / "last.ckpt", weights_only=True)
    sft = torch.load(ckpt, weights_only=True)
    assert base["global_step"] == 20 and sft["global_step"] == 10  # from step 0, not resumed at 20
    assert sft["hyper_parameters"]["vocab_size"] == 71  # 65 characters and the template's 6 tokens
    tokenizer = sft["TextDataModule"]["tokenizer"]
    assert tokenizer["chars"] == base["TextDataModule"]["tokenizer"]["chars"] and "chat_template" in tokenizer
    wte = "model.transformer.wte.weight"
    torch.testing.assert_close(sft["state_dict"][wte][:65], base["state_dict"][wte], atol=0.02, rtol=0)  # 10 steps on
    assert list((sft_run / "lightning_logs").iterdir()) == [sft_run / "lightning_logs" / "version_0"]  # its own run
    # the special tokens' rows start at the mean of the characters' embeddings
    start = init_from_state(str(debug_run / "checkpoints" / "last.ckpt"), 32, 71, 71)[wte.removeprefix("model.")]
    torch.testing.assert_close(start[:65], base["state_dict"][wte])
    torch.testing.assert_close(start[65:], base["state_dict"][wte].mean(0).expand(6, -1))


def replies(ckpt: Path, turns: list[str]) -> list[str]:
    """What the model answers, greedily, to each turn of one conversation (in this process)."""
    model, tokenizer = load_model(str(ckpt))
    chat = Chat(model, tokenizer, Sampling(temperature=0), max_new_tokens=12)
    return [chat.reply([{"role": "user", "content": turn}]).result().text for turn in turns]


def test_chat_repl_in_a_terminal_talks_clears_and_leaves_at_ctrl_d(ckpt):
    first, second = replies(ckpt, ["abc", "hij"])
    controller, terminal = pty.openpty()
    proc = subprocess.Popen([sys.executable, str(ROOT / "sample.py"), "--ckpt_path", str(ckpt), "--chat", "true",
                             *GREEDY], stdin=terminal, stdout=terminal, stderr=terminal, cwd=ROOT,
                            env=ONE_THREAD)  # fmt: skip
    os.close(terminal)

    def until_prompt() -> str:
        out = b""
        while not out.endswith(b"> "):
            ready, _, _ = select.select([controller], [], [], 120)
            assert ready, out
            out += os.read(controller, 4096)
        return out.decode().replace("\r\n", "\n")

    try:
        assert "/clear starts over, Ctrl-D leaves" in until_prompt()
        os.write(controller, b"abc\n")
        assert until_prompt() == f"abc\n{first}\n> "
        os.write(controller, b"hij\n")
        assert until_prompt() == f"hij\n{second}\n> "  # the second turn of the same conversation
        os.write(controller, b"/clear\n")
        assert until_prompt() == "/clear\n(a new conversation)\n> "
        os.write(controller, b"hij\n")
        assert until_prompt() == f"hij\n{replies(ckpt, ['hij'])[0]}\n> "  # a new conversation's first turn
        os.write(controller, b"\x04")  # Ctrl-D
        assert proc.wait(timeout=60) == 0
    finally:
        proc.kill()
        os.close(controller)


def test_a_model_that_is_not_a_chat_model_cannot_chat(debug_run):
    result = run_script("sample.py", "--ckpt_path", str(debug_run / "checkpoints" / "last.ckpt"), "--chat", "true")
    assert_one_error_line(result, "is not a chat model", "--data.format chat")


def test_chat_completions_with_the_openai_client(url, ckpt):  # noqa: F811
    client = openai.OpenAI(base_url=url.removesuffix("/completions"), api_key="unused", max_retries=0)
    conversation = [{"role": "user", "content": "abc"}, {"role": "assistant", "content": "cba"},
                    {"role": "user", "content": "hij"}]  # fmt: skip
    model, tokenizer = load_model(str(ckpt))
    expected = Chat(model, tokenizer, Sampling(temperature=0), max_new_tokens=12).reply(conversation).result()
    response = client.chat.completions.create(model="tiny", messages=conversation, temperature=0, max_tokens=12)
    assert response.object == "chat.completion" and response.choices[0].message.role == "assistant"
    assert response.choices[0].message.content == expected.text
    assert response.choices[0].finish_reason == expected.finish_reason
    assert response.usage.prompt_tokens == len(expected.prompt_ids)
    assert response.usage.completion_tokens == expected.completion_tokens
    stream = client.chat.completions.create(model="tiny", messages=conversation, temperature=0, max_tokens=12,
                                            stream=True)  # fmt: skip
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == expected.text
    assert chunks[0].choices[0].delta.role == "assistant" and chunks[-1].choices[0].finish_reason
    refused_requests = [([{"role": "robot", "content": "abc"}], "unknown role 'robot'"), ([], "messages"),
                        ([{"role": "user", "content": "{}"}], "not in the model's vocab")]  # fmt: skip
    for messages, fragment in refused_requests:
        with pytest.raises(openai.APIStatusError) as refused:
            client.chat.completions.create(model="tiny", messages=messages)
        assert refused.value.status_code in (400, 422) and fragment in json.dumps(refused.value.body)
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(model="tiny", messages=conversation, temperature=-1, stream=True)
    assert "temperature must be >= 0" in refused.value.body["detail"]
    assert client.chat.completions.create(model="tiny", messages=conversation, max_tokens=2).choices[0].message


def test_export_carries_the_template_that_transformers_applies(ckpt, tmp_path):
    from transformers import AutoTokenizer

    result = subprocess.run([sys.executable, "-m", "tinygpt_pl.export", "--ckpt_path", str(ckpt), "--out",
                             str(tmp_path / "hf")], cwd=ROOT, capture_output=True, text=True, timeout=600)  # fmt: skip
    assert result.returncode == 0, result.stderr
    hf_tok = AutoTokenizer.from_pretrained(tmp_path / "hf")
    _, ours = load_model(str(ckpt))
    conversation = [{"role": "system", "content": "Reverse the word."}, {"role": "user", "content": "abc"},
                    {"role": "assistant", "content": "cba"}, {"role": "user", "content": "hij"}]  # fmt: skip
    prompt = hf_tok.apply_chat_template(conversation, add_generation_prompt=True)["input_ids"]
    assert prompt == ours.prompt(conversation)
    assert hf_tok.apply_chat_template(conversation[:3])["input_ids"] == ours.render(conversation[:3])[0]
    _, reloaded = load_model(str(tmp_path / "hf"))
    assert isinstance(reloaded, ChatTokenizer) and reloaded.state_dict() == ours.state_dict()


def test_strict_chat_data_refuses_a_bad_row_in_one_line_and_writes_nothing(debug_run, tmp_path, capsys):
    data = reversals(tmp_path / "bad.jsonl", 20)
    with open(data, "a") as f:
        f.write(json.dumps({"messages": [{"role": "user", "content": "abc"}]}) + "\n")
    with pytest.raises(SystemExit) as exit:
        main(["--config", str(ROOT / "configs" / "debug.yaml"), "--data.path", str(data),
              "--trainer.default_root_dir", str(tmp_path / "run"), *sft_args(tmp_path / "run", debug_run),
              "--data.strict", "true"])  # fmt: skip
    assert exit.value.code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "row 20 of" in errors[0] and "no assistant message" in errors[0], errors
    assert not (tmp_path / "run").exists()
    assert not [p for p in (tmp_path / "cache" / "chat").rglob("*") if p.is_file()]  # no token cache


def test_init_from_a_checkpoint_refuses_data_of_another_tokenizer(debug_run, tmp_path, capsys):
    data = reversals(tmp_path / "chat.jsonl", 20)
    with pytest.raises(SystemExit) as exit:
        main(["--config", str(ROOT / "configs" / "debug.yaml"), "--data.path", str(data), "--data.tokenizer", "gpt2",
              "--trainer.default_root_dir", str(tmp_path / "run"), *sft_args(tmp_path / "run", debug_run)])  # fmt: skip
    assert exit.value.code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "read the tokens of the char tokenizer, not those of the gpt2" in errors[0], errors
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.slow
def test_an_sft_run_resumes_exactly(debug_run, tmp_path):
    data = reversals(tmp_path / "chat.jsonl", 200)
    whole = train(tmp_path / "whole", data, *sft_args(tmp_path / "whole", debug_run, "--model.lr_decay_steps", "10"))
    assert whole.returncode == 0, whole.stderr
    half_args = sft_args(tmp_path / "half", debug_run, "--model.lr_decay_steps", "10")
    half = train(tmp_path / "half", data, *half_args, "--trainer.max_steps", "5")
    assert half.returncode == 0, half.stderr
    resumed = train(tmp_path / "half", data, *half_args, "--ckpt_path", "last")
    assert resumed.returncode == 0, resumed.stderr
    a, b = (torch.load(tmp_path / r / "checkpoints" / "last.ckpt", weights_only=True) for r in ("whole", "half"))
    assert a["global_step"] == b["global_step"] == 10
    for name, tensor in a["state_dict"].items():
        torch.testing.assert_close(b["state_dict"][name], tensor, atol=1e-6, rtol=0)
