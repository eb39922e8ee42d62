"""serve.py as a user runs it: a real server process on a free port, asked over HTTP with OpenAI's completions API;
and sample.py's --stream. The model is the debug run's checkpoint (char tokenizer)."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from conftest import ROOT, run_script
from test_bad_input import assert_one_error_line

from tinygpt_pl.generation.generate import Completion, Sampling
from tinygpt_pl.load import load_model

ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1"}  # a tiny model: a second thread only costs on a loaded machine


@pytest.fixture(scope="module")
def ckpt(debug_run: Path) -> Path:
    return debug_run / "checkpoints" / "last.ckpt"


@pytest.fixture(scope="module")
def url(ckpt: Path) -> Iterator[str]:
    """The completions URL of a serve.py process on a free port, killed (with its workers) after the module."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([sys.executable, str(ROOT / "serve.py"), "--ckpt_path", str(ckpt), "--port", str(port)],
                              cwd=ROOT, env=ONE_THREAD, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, start_new_session=True)  # fmt: skip
    try:
        assert f"http://127.0.0.1:{port}/v1/completions" in server.stdout.readline()  # says where, at once
        deadline = time.monotonic() + 300
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as response:
                    if response.read() == b"ok":
                        break
            except OSError:
                pass
            assert server.poll() is None and time.monotonic() < deadline, server.stdout.read()
            time.sleep(0.2)
        yield f"http://127.0.0.1:{port}/v1/completions"
    finally:
        os.killpg(server.pid, signal.SIGKILL)  # the server and the worker processes it started
        server.wait()


def post(url: str, body: dict | bytes) -> tuple[int, str, str]:
    """The status, content type and body of a POST."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(url, data, {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, response.headers["Content-Type"], response.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.headers["Content-Type"], e.read().decode()


def test_completion_is_openais_json_with_the_models_text(url, ckpt):
    status, _, body = post(url, {"prompt": "ROMEO:", "max_tokens": 30, "temperature": 0})
    assert status == 200, body
    response = json.loads(body)
    assert response["id"].startswith("cmpl-") and response["object"] == "text_completion"
    assert abs(response["created"] - time.time()) < 300 and response["model"] == str(ckpt)
    [choice] = response["choices"]
    model, tokenizer = load_model(str(ckpt))
    expected = Completion(model, tokenizer, "ROMEO:", 30, Sampling(temperature=0)).result().text
    assert choice == {"text": expected, "index": 0, "logprobs": None, "finish_reason": "length"}
    assert response["usage"] == {"prompt_tokens": 6, "completion_tokens": 30, "total_tokens": 36}

    stop = expected[12:14]
    status, _, body = post(url, {"prompt": "ROMEO:", "max_tokens": 30, "temperature": 0, "stop": [stop, "\x00"]})
    [choice] = json.loads(body)["choices"]
    assert choice["text"] == expected[: expected.find(stop)] and choice["finish_reason"] == "stop"


def test_stream_sends_the_same_text_as_server_sent_events(url):
    request = {"prompt": "ROMEO:", "max_tokens": 25, "temperature": 1.0, "top_p": 0.9, "seed": 7}
    whole = json.loads(post(url, request)[2])
    status, content_type, body = post(url, {**request, "stream": True})
    assert status == 200 and content_type.startswith("text/event-stream")
    events = body.split("\n\n")
    assert events[-2:] == ["data: [DONE]", ""] and all(e.startswith("data: ") for e in events[:-1])
    chunks = [json.loads(e.removeprefix("data: ")) for e in events[:-2]]
    assert all(c["object"] == "text_completion" and c["id"] == chunks[0]["id"] for c in chunks)
    assert [c["choices"][0]["finish_reason"] for c in chunks] == [None] * (len(chunks) - 1) + ["length"]
    assert "".join(c["choices"][0]["text"] for c in chunks) == whole["choices"][0]["text"]
    assert len(chunks) == 26  # one per token, then the finish
    assert json.loads(post(url, {**request, "seed": 8})[2])["choices"][0]["text"] != whole["choices"][0]["text"]


@pytest.mark.parametrize(
    ("body", "status", "message"),
    [
        ({"max_tokens": 5}, 422, "Field required"),
        ({"prompt": 3}, 422, "valid string"),
        ({"prompt": "a", "max_tokens": 0}, 422, "greater than or equal to 1"),
        ({"prompt": "a", "max_tokens": "5"}, 422, "valid integer"),
        ({"prompt": "a", "temperature": "hot"}, 422, "valid number"),
        ({"prompt": "a", "stop": [1]}, 422, "valid string"),
        ({"prompt": "a", "stream": "yes"}, 422, "valid boolean"),
        (b"{not json", 422, "JSON decode error"),
        ({"prompt": "a", "temperature": -1}, 400, "temperature must be >= 0"),
        ({"prompt": "a", "top_p": 0}, 400, "top_p must be in (0, 1]"),
        ({"prompt": "a", "top_p": 1.5, "stream": True}, 400, "top_p must be in (0, 1]"),
        ({"prompt": "héllo"}, 400, "'é' are not in the model's vocabulary"),
        ({"prompt": "a", "stop": ""}, 400, "stop string is empty"),
    ],
)
def test_a_bad_request_gets_a_4xx_and_the_server_goes_on(url, body, status, message):
    answer = post(url, body)
    assert answer[0] == status and message in answer[2], answer
    assert post(url, {"prompt": "a", "max_tokens": 2})[0] == 200


def test_sample_streams_the_text_it_prints_whole(ckpt):
    command = [sys.executable, str(ROOT / "sample.py"), "--ckpt_path", str(ckpt), "--prompt", "JULIET:",
               "--max_new_tokens", "40", "--top_p", "0.8", "--seed", "5", "--stream", "true"]  # fmt: skip
    result = subprocess.run(command, env=ONE_THREAD, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    model, tokenizer = load_model(str(ckpt))
    completion = Completion(model, tokenizer, "JULIET:", 40, Sampling(0.8, 200, 0.8),
                            generator=torch.Generator().manual_seed(5))  # fmt: skip
    assert result.stdout == "JULIET:" + completion.result().text + "\n"


def test_serve_refuses_a_missing_checkpoint_in_one_line(tmp_path):
    result = run_script("serve.py", "--ckpt_path", str(tmp_path / "no.ckpt"), "--port", "1")
    assert_one_error_line(result, "no.ckpt")


def plain_logprobs(model, ids: list[int]) -> torch.Tensor:
    """Each token's log-probability after the ones before it, from one forward pass (ids within the context)."""
    with torch.no_grad():
        logits, _ = model(torch.tensor([ids[:-1]]))
    return torch.log_softmax(logits[0], dim=-1).gather(1, torch.tensor(ids[1:])[:, None])[:, 0]


def test_logprobs_and_echo_as_openais_legacy_completions(url, ckpt):
    model, tokenizer = load_model(str(ckpt))
    status, _, body = post(url, {"prompt": "ROMEO:", "max_tokens": 4, "temperature": 0, "logprobs": 2, "echo": True})
    assert status == 200, body
    [choice] = json.loads(body)["choices"]
    text = choice["text"]
    expected = Completion(model, tokenizer, "ROMEO:", 4, Sampling(temperature=0)).result().text
    assert text == "ROMEO:" + expected
    logprobs = choice["logprobs"]
    assert logprobs["tokens"] == list(text) and logprobs["text_offset"] == list(range(len(text)))
    assert logprobs["token_logprobs"][0] is None and logprobs["top_logprobs"][0] is None
    torch.testing.assert_close(
        torch.tensor(logprobs["token_logprobs"][1:]), plain_logprobs(model, tokenizer.encode(text))
    )
    for token_logprob, top in zip(logprobs["token_logprobs"][7:], logprobs["top_logprobs"][7:], strict=True):
        assert len(top) == 2 and token_logprob == max(top.values())  # greedy: each token is the most likely

    ids = [tokenizer.encode("JULIET:"), tokenizer.encode("To be")]  # several prompts, as token ids: a choice each
    status, _, body = post(url, {"prompt": ids, "max_tokens": 3, "temperature": 0, "logprobs": 0})
    response = json.loads(body)
    assert [c["index"] for c in response["choices"]] == [0, 1] and response["usage"]["total_tokens"] == 18
    for prompt, choice in zip(ids, response["choices"], strict=True):
        logprobs = choice["logprobs"]
        assert logprobs["tokens"] == list(choice["text"]) and logprobs["text_offset"] == [0, 1, 2]
        whole = prompt + tokenizer.encode(choice["text"])
        torch.testing.assert_close(torch.tensor(logprobs["token_logprobs"]), plain_logprobs(model, whole)[-3:])
        assert logprobs["top_logprobs"] == [{}, {}, {}]
    assert post(url, {"prompt": "a", "logprobs": 1, "stream": True})[0] == 400
    assert post(url, {"prompt": "a", "logprobs": 6})[0] == 422


def test_openai_client_reads_logprobs(url, ckpt):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=url.removesuffix("/completions"), api_key="none")
    response = client.completions.create(model="any", prompt="ROMEO:", max_tokens=3, temperature=0, logprobs=1,
                                         echo=True)  # fmt: skip
    logprobs = response.choices[0].logprobs
    assert response.choices[0].text.startswith("ROMEO:") and logprobs.tokens[:6] == list("ROMEO:")
    model, tokenizer = load_model(str(ckpt))
    ids = tokenizer.encode(response.choices[0].text)
    torch.testing.assert_close(torch.tensor(logprobs.token_logprobs[1:]), plain_logprobs(model, ids))


def test_lm_eval_local_completions_scores_as_in_process(url, ckpt, tmp_path):
    """lm-eval's local-completions model on the served model, with the exported tokenizer and max_length
    block_size + 2 (lm-eval keeps one position for a generated token), gives the log-likelihoods evaluate computes."""
    from lm_eval.api.instance import Instance
    from lm_eval.models.openai_completions import LocalCompletionsAPI

    from tinygpt_pl.evaluation.scoring import Request, score_batch
    from tinygpt_pl.export import main as export

    export(["--ckpt_path", str(ckpt), "--out", str(tmp_path / "hf")])
    model, tokenizer = load_model(str(ckpt))
    lm = LocalCompletionsAPI(base_url=url, model="debug", tokenizer_backend="huggingface",
                             tokenizer=str(tmp_path / "hf"), max_length=model.config.block_size + 2)  # fmt: skip
    pairs = [("Question: what say you?\nAnswer:", " Nothing"), ("ROMEO:", " O, speak again, bright angel!"),
             ("To be, or not to be, that is the question: whether 'tis nobler", " in the mind")]  # fmt: skip
    served = lm.loglikelihood([Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(pairs)])
    for (context, continuation), (ll, greedy) in zip(pairs, served, strict=True):
        window = (tokenizer.encode(context) + tokenizer.encode(continuation))[-(model.config.block_size + 1) :]
        n = len(continuation)
        [[ours]] = score_batch(model, [Request(0, (0,), window[:-n], [window[-n:]])], tokenizer.vocab_size)
        assert ll == pytest.approx(ours.loglikelihood, abs=1e-4) and greedy == ours.greedy
