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


def test_a_model_that_is_not_a_chat_model_gets_a_400_on_the_chat_endpoint(url):
    status, _, body = post(url.replace("/v1/completions", "/v1/chat/completions"),
                           {"messages": [{"role": "user", "content": "Hi"}]})  # fmt: skip
    assert status == 400 and "is not a chat model" in json.loads(body)["detail"]


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
