"""serve.py as a user runs it: a real server process on a free port, asked over HTTP with OpenAI's completions API;
and sample.py's --stream. The model is the debug run's checkpoint (char tokenizer)."""

import asyncio
import contextlib
import http.client
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import pytest
import served
import torch
from conftest import ROOT, run_script
from test_bad_input import assert_one_error_line

from tinygpt_pl.generation.generate import Completion, Sampling
from tinygpt_pl.generation.server import cancel_if_left
from tinygpt_pl.load import load_model

ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1"}  # a tiny model: a second thread only costs on a loaded machine


@pytest.fixture(scope="module")
def ckpt(debug_run: Path) -> Path:
    return debug_run / "checkpoints" / "last.ckpt"


@contextmanager
def serving(ckpt: Path, *args: str) -> Iterator[tuple[subprocess.Popen, str]]:
    """A serve.py process on a free port, in a session of its own, and its completions URL once it is ready; killed
    (with its workers) at the end."""
    server, port = served.start(ckpt, *args, env=ONE_THREAD, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True)  # fmt: skip
    try:
        assert f"http://127.0.0.1:{port}/v1/completions" in server.stdout.readline()  # says where, at once
        served.wait_until_ready(server, port)
        yield server, f"http://127.0.0.1:{port}/v1/completions"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(server.pid, signal.SIGKILL)  # the server and the worker processes it started
        server.wait()


@pytest.fixture(scope="module")
def url(ckpt: Path) -> Iterator[str]:
    """The completions URL of a serve.py process, killed (with its workers) after the module."""
    with serving(ckpt) as (_, url):
        yield url


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


def test_max_tokens_beyond_the_limit_is_refused_with_openais_error(url):
    status, content_type, body = post(url, {"prompt": "a", "max_tokens": 1_000_000})
    assert status == 400 and content_type == "application/json", body
    error = json.loads(body)["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == "max_tokens" and error["code"] is None
    assert error["message"].startswith("max_tokens is 1000000, more than this server allows (4096, ")


def session_stats(session: int) -> dict[int, list[str]]:
    """The /proc/PID/stat fields after the command name (state, ppid, pgrp, session, ...) of each process of a session
    that has not ended (zombies, which have, aside)."""
    found = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if int(fields[3]) == session and fields[0] != "Z":
                found[int(stat.parent.name)] = fields
    return found


def alive(session: int) -> list[int]:
    return list(session_stats(session))


@pytest.mark.parametrize(
    "signum", [signal.SIGTERM, pytest.param(signal.SIGINT, marks=pytest.mark.slow)], ids=lambda s: s.name
)  # (the same handler)
def test_a_signal_to_serve_py_ends_every_process_it_started(ckpt, signum):
    """During a long streamed generation: the client's stream ends, and no process of the server is left after 10 s."""
    with serving(ckpt, "--max_tokens_limit", "1000000") as (server, url):
        assert len(alive(server.pid)) >= 3  # serve.py, its HTTP server and its inference worker
        request = urllib.request.Request(url, json.dumps({"prompt": "a", "max_tokens": 1_000_000, "stream": True})
                                         .encode(), {"Content-Type": "application/json"})  # fmt: skip
        response = urllib.request.urlopen(request, timeout=60)
        assert response.readline().startswith(b"data: ")  # generating
        ended = threading.Event()

        def read_to_the_end() -> None:
            with contextlib.suppress(OSError, http.client.HTTPException):
                response.read()
            ended.set()

        threading.Thread(target=read_to_the_end, daemon=True).start()
        server.send_signal(signum)
        deadline = time.monotonic() + 10
        while alive(server.pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not alive(server.pid), alive(server.pid)
        assert server.wait(timeout=1) == 128 + signum
        assert ended.wait(timeout=5)  # the client's stream ended (cut off) rather than hanging


def test_concurrent_requests_are_generated_together_with_the_texts_they_get_alone(url, ckpt):
    """Eight requests at once, greedy and sampled with seeds, with and without stop strings: each gets the text that
    Completion gives alone."""
    names = "ROMEO JULIET KING QUEEN".split() * 2
    bodies = [{"prompt": f"{name}:", "max_tokens": 40 + 5 * i, "temperature": 0.9 * (i % 2), "top_p": 0.95,
               "seed": i, "stop": ["\n\n"] if i % 3 == 0 else None} for i, name in enumerate(names)]  # fmt: skip
    with ThreadPoolExecutor(len(bodies)) as pool:
        answers = list(pool.map(lambda body: post(url, body), bodies))
    model, tokenizer = load_model(str(ckpt))
    for i, body in enumerate(bodies):
        alone = Completion(model, tokenizer, body["prompt"], body["max_tokens"],
                           Sampling(body["temperature"], top_p=body["top_p"]), body["stop"] or (),
                           generator=torch.Generator().manual_seed(i)).result()  # fmt: skip
        status, _, text = answers[i]
        assert status == 200, text
        [choice] = json.loads(text)["choices"]
        assert (choice["text"], choice["finish_reason"]) == (alone.text, alone.finish_reason), i


def cpu_seconds(session: int) -> float:
    """CPU time (user and system) the processes of a session have used so far."""
    ticks = sum(int(fields[11]) + int(fields[12]) for fields in session_stats(session).values())  # utime, stime
    return ticks / os.sysconf("SC_CLK_TCK")


def test_a_client_that_goes_mid_stream_frees_its_slot_at_once(ckpt):
    """With one slot, a stream of a million tokens holds it until its client disconnects; then a short request is
    answered at once. The server, idle again, uses no CPU (LitServe's loop alone would keep a core busy)."""
    with serving(ckpt, "--max_batch_size", "1", "--max_tokens_limit", "1000000") as (server, url):
        request = urllib.request.Request(url, json.dumps({"prompt": "a", "max_tokens": 1_000_000, "stream": True})
                                         .encode(), {"Content-Type": "application/json"})  # fmt: skip
        response = urllib.request.urlopen(request, timeout=60)
        assert response.readline().startswith(b"data: ")
        response.close()
        start = time.monotonic()
        assert post(url, {"prompt": "a", "max_tokens": 5})[0] == 200
        assert time.monotonic() - start < 30  # generating the million tokens would take minutes
        time.sleep(0.5)
        before = cpu_seconds(server.pid)
        time.sleep(2)
        assert cpu_seconds(server.pid) - before < 0.2


def test_a_request_past_the_time_limit_ends_and_the_worker_goes_on(ckpt):
    """--request_timeout 1: a plain request for 100,000 tokens gets a 504, a streamed one ends with finish_reason
    "length" after the text so far; a short request is then answered as usual."""
    with serving(ckpt, "--request_timeout", "1", "--max_tokens_limit", "100000") as (_, url):
        status, _, body = post(url, {"prompt": "a", "max_tokens": 100_000})
        assert status == 504 and "longer than the server's limit of 1 s (serve.py --request_timeout)" in body, body
        status, _, body = post(url, {"prompt": "a", "max_tokens": 100_000, "stream": True})
        chunks = [json.loads(e.removeprefix("data: ")) for e in body.split("\n\n")[:-2]]
        assert status == 200 and chunks[-1]["choices"][0]["finish_reason"] == "length" and len(chunks) > 2
        assert post(url, {"prompt": "a", "max_tokens": 5})[0] == 200


def test_a_stream_left_before_its_end_cancels_its_completion():
    """What both endpoints' streams (completions and chat) do when their client goes: the server closes the stream's
    iterator early, and the completion is cancelled; a stream read to its end cancels nothing."""

    async def events():
        for i in range(3):
            yield f"data: {i}\n\n"

    async def read(n: int | None) -> list[str]:
        cancelled = []
        stream = cancel_if_left(events(), lambda: cancelled.append(True))
        got = [event async for event in stream] if n is None else [await anext(stream) for _ in range(n)]
        await stream.aclose()
        return got, cancelled

    assert asyncio.run(read(None)) == (["data: 0\n\n", "data: 1\n\n", "data: 2\n\n"], [])
    assert asyncio.run(read(1)) == (["data: 0\n\n"], [True])


def test_keep_freed_memory_serves_a_large_block_again_from_the_heap() -> None:
    """A 40 MiB block, over the largest mmap threshold glibc adapts to by itself (32 MiB), allocated, written and freed
    again and again: fresh pages from the system each time (10,240 faults), unless keep_freed_memory keeps it in the
    heap. (glibc's own malloc: torch's aligned allocations fragment the heap in ways that depend on what else lives
    there, which the worker test below meets.)"""
    probe = """if 1:
        import ctypes, resource, sys
        from tinygpt_pl.generation.server import keep_freed_memory
        if sys.argv[1] == "keep":
            keep_freed_memory()
        libc = ctypes.CDLL("libc.so.6")
        libc.malloc.restype, libc.free.argtypes = ctypes.c_void_p, [ctypes.c_void_p]
        faults = []
        for _ in range(3):
            before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            block = libc.malloc(40 << 20)
            ctypes.memset(block, 1, 40 << 20)
            libc.free(block)
            faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
        print(faults[-1])
    """
    run = {how: subprocess.run([sys.executable, "-c", probe, how], capture_output=True, text=True, check=True)
           for how in ("keep", "default")}  # fmt: skip
    assert int(run["keep"].stdout) < 100 < 10_000 < int(run["default"].stdout), run


def test_the_worker_keeps_freed_memory_for_the_next_step(gpt2_standin) -> None:
    """A decode step's logits over GPT-2's vocabulary (3 MiB for 16 completions) and their copies, freed and allocated
    again at every step, stay in the worker's heap instead of coming back as fresh pages from the system: a page
    fault each 4 KiB, which took a quarter of the time of 16 completions together in benchmarks/serving.py. A round
    whose batches take a shape not seen before (it depends on when the requests arrive) may still grow the heap once
    (87,000 faults seen under load), so the test looks for a round that needed no new memory."""
    bodies = [{"prompt": f"To be or not {i}", "max_tokens": 60, "temperature": 0.8 * (i % 2), "seed": i}
              for i in range(16)]  # fmt: skip
    with serving(gpt2_standin) as (server, url), ThreadPoolExecutor(16) as pool:
        [worker] = [pid for pid, fields in session_stats(server.pid).items() if pid != server.pid and
                    "spawn_main" in Path(f"/proc/{pid}/cmdline").read_text()]  # fmt: skip
        faults = []
        for _ in range(5):
            before = int(session_stats(server.pid)[worker][7])  # minflt
            assert all(status == 200 for status, _, _ in pool.map(lambda body: post(url, body), bodies))
            faults.append(int(session_stats(server.pid)[worker][7]) - before)
    assert min(faults[1:]) < 5000, faults  # 16 x 60 tokens: 0 to 400 here; 36,000 to 105,000 without keep_freed_memory
