"""Serving under load (issue 20): serve.py, a real server process, asked by real HTTP clients, on a GPT-2-shaped model
(random weights; 4 layers x 256, GPT-2's BPE vocabulary, context 1024; generation.py's stand-in) on the CPU.

(a) 16 completions of 100 tokens (half greedy, half sampled with a seed), one after another and all at once;
    --repeats of each, alternated, the medians and their ratio; the texts must be identical. Twice: one prompt for
    all 16 (n samples of a prompt) and 16 prompts of different lengths (each completion at its own position).
(b) a request for 1,000,000 tokens: the time to its 400 (median of 5).
(c) a 5-token request while a 4000-token one streams: the time to its answer (median of --repeats).

    python benchmarks/serving.py [--repeats 3]
"""

import argparse
import contextlib
import json
import os
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from results import REPO, record, stamp

sys.path.append(str(REPO / "tests"))  # serve.py started as the tests start it
import served  # noqa: E402
from generation import gpt2_folder, timed  # noqa: E402

PROMPTS = ["First Citizen:", "ROMEO:", "JULIET:\nO Romeo,", "KING HENRY:", "The quality of mercy", "To be, or not",
           "Now is the winter", "Friends, Romans,", "All the world's", "If music be", "Once more unto", "O, beware",
           "What light through", "Some are born great", "Lord, what fools", "The lady doth"]  # fmt: skip


def post(url: str, body: dict) -> tuple[int, dict]:
    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=600) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def start_server(folder: Path) -> tuple[subprocess.Popen, str]:
    server, port = served.start(folder, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    served.wait_until_ready(server, port)
    return server, f"http://127.0.0.1:{port}/v1/completions"


def texts(url: str, bodies: list[dict], together: bool) -> list[str]:
    if together:
        with ThreadPoolExecutor(len(bodies)) as pool:
            answers = list(pool.map(lambda body: post(url, body), bodies))
    else:
        answers = [post(url, body) for body in bodies]
    assert all(status == 200 for status, _ in answers), answers
    return [answer["choices"][0]["text"] for _, answer in answers]


def short_while_long_runs(url: str) -> float:
    """Seconds to answer a 5-token request while a 4000-token stream is under way."""
    body = json.dumps({"prompt": "a", "max_tokens": 4000, "stream": True}).encode()
    response = urllib.request.urlopen(urllib.request.Request(url, body, {"Content-Type": "application/json"}))
    assert response.readline().startswith(b"data: ")  # the long one is generating
    done = threading.Event()

    def read_to_the_end() -> None:
        with contextlib.suppress(OSError, AttributeError):  # (closed below, while it reads)
            response.read()
            done.set()

    threading.Thread(target=read_to_the_end, daemon=True).start()
    seconds = timed(post, url, {"prompt": "b", "max_tokens": 5})
    assert not done.is_set(), "the long request ended first: measure with a longer one"
    response.close()
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3, help="runs of each, alternated; the medians count")
    parser.add_argument("--results", type=Path, help="the Markdown file to write into (default benchmarks/results.md)")
    args = parser.parse_args()
    load = Path("/proc/loadavg").read_text().split()[0]
    workloads = {
        "one prompt": [{"prompt": PROMPTS[0], "max_tokens": 100, "temperature": 0.8 * (i % 2), "seed": i}
                       for i in range(16)],
        "16 prompts": [{"prompt": p, "max_tokens": 100, "temperature": 0.8 * (i % 2), "seed": i}
                       for i, p in enumerate(PROMPTS)],
    }  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        gpt2_folder(Path(tmp))
        server, url = start_server(Path(tmp))
        try:
            post(url, workloads["one prompt"][0])  # warm-up
            times: dict[tuple[str, bool], list[float]] = {(w, t): [] for w in workloads for t in (False, True)}
            for _ in range(args.repeats):
                for workload, bodies in workloads.items():
                    start = time.perf_counter()
                    alone = texts(url, bodies, together=False)
                    times[workload, False].append(time.perf_counter() - start)
                    start = time.perf_counter()
                    together = texts(url, bodies, together=True)
                    times[workload, True].append(time.perf_counter() - start)
                    identical = sum(a == b for a, b in zip(alone, together, strict=True))
                    print(f"  {workload}, 16 x 100 tokens: {times[workload, False][-1]:.2f} s one after another, "
                          f"{times[workload, True][-1]:.2f} s at once, {identical}/16 same", flush=True)  # fmt: skip
                    assert identical == 16, [(a, b) for a, b in zip(alone, together, strict=True) if a != b]
            refusals = []
            for _ in range(5):
                start = time.perf_counter()
                status, _ = post(url, {"prompt": "a", "max_tokens": 1_000_000})
                refusals.append(time.perf_counter() - start)
                assert status == 400
            short = [short_while_long_runs(url) for _ in range(args.repeats)]
        finally:
            os.killpg(server.pid, signal.SIGKILL)
    median = {key: statistics.median(values) for key, values in times.items()}
    refused, answered = statistics.median(refusals), statistics.median(short)
    rows = []
    for workload in workloads:
        one, many = median[workload, False], median[workload, True]
        rows += [f"| (a) {workload}, 16 x 100 tokens, one after another | {one:.2f} s | |",
                 f"| (a) {workload}, 16 x 100 tokens, all at once (16/16 texts identical) | {many:.2f} s | "
                 f"**{one / many:.1f}x** faster (target >= 4x) |"]  # fmt: skip
    table = "\n".join([
        "| | median | target |",
        "|---|---|---|",
        *rows,
        f"| (b) 1,000,000 tokens asked: the 400 | {refused * 1000:.0f} ms | < 100 ms |",
        f"| (c) 5 tokens while a 4000-token stream runs | {answered:.2f} s | < 2 s |",
    ])  # fmt: skip
    command = shlex.join(["python", "benchmarks/serving.py", *sys.argv[1:]])
    note = (
        f"{args.repeats} repeats, alternated; load average {load} at the start (other jobs share this machine: "
        "times are noisy, the ratio less so)."
    )
    record("Serving: continuous batching (benchmarks/serving.py)", f"{stamp(command)}\n{table}\n\n{note}",
           *([args.results] if args.results else []))  # fmt: skip


if __name__ == "__main__":
    main()
