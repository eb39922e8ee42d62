"""Generation (issue 10): the key/value cache against the plain path, and serve.py against generating in process.

(a) 1000 tokens sampled from a GPT-2-shaped model (random weights; 4 layers x 256, 4 heads, context 1024, GPT-2's BPE
    vocabulary padded to 50304) on the CPU, after a one-token prompt, with the cache and without it (each step a
    forward pass of the whole context); --repeats runs of each, alternated, the medians and their ratio.
(b) a 100-token greedy completion of a GPT-2 of the same shape (random weights, saved by transformers'
    save_pretrained, as the tests' stand-in for the hub) from serve.py, a real server process, timed by an HTTP client
    from request to response; against the same Completion generated in this process. --repeats of each, alternated,
    after one warm-up each; the medians and their ratio.

With --gpu, (a) alone, on the GPU, for the lecture's model instead (configs/lecture/06_scaled_up.yaml: 6 layers x 384,
6 heads, context 256, 65 characters; random weights): 255 tokens (all within its context) and --sample-tokens (past
it, each step runs the whole window again on either path, so the cache gains little there).

It prints a table and writes it into benchmarks/results.md in place of its earlier section (which moves to
history.md), the CPU and the GPU sections each under its own heading.

    python benchmarks/generation.py [--repeats 3] [--gpu]
"""

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from importlib.metadata import version
from pathlib import Path

import torch
from results import REPO, RESULTS, record, stamp

sys.path.append(str(REPO / "tests"))  # serve.py started as the tests start it
import served  # noqa: E402

from tinygpt_pl.generation.generate import Completion, Sampling, stream_ids
from tinygpt_pl.load import load_model
from tinygpt_pl.model import GPT, GPTConfig

SHAPE = dict(n_layer=4, n_head=4, n_embd=256, block_size=1024)
LECTURE_SHAPE = dict(n_layer=6, n_head=6, n_embd=384, block_size=256)  # configs/lecture/06_scaled_up.yaml
TITLE = "Generation: KV cache and serving (benchmarks/generation.py)"
GPU_TITLE = "Generation on a GPU: KV cache, the lecture's model (benchmarks/generation.py --gpu)"


def timed(run: Callable[..., object], *args: object) -> float:
    """Seconds that run(*args) takes."""
    start = time.perf_counter()
    run(*args)
    return time.perf_counter() - start


def cache_vs_plain(tokens: int, repeats: int, device: str = "cpu", lecture: bool = False) -> dict[str, float]:
    """Seconds (medians) to sample `tokens` tokens with and without the cache, from a GPT-2-shaped model (BPE) or the
    lecture's (characters)."""
    torch.manual_seed(0)
    shape, vocab_size, vocab_limit = (LECTURE_SHAPE, 65, 65) if lecture else (SHAPE, 50304, 50257)
    model = GPT(GPTConfig(vocab_size=vocab_size, dropout=0.0, **shape)).to(device).eval()
    start = torch.tensor([[0 if lecture else 50256]], device=device)  # "\n" / <|endoftext|>: a document's start

    def sample(kv_cache: bool) -> None:
        generator = torch.Generator(device).manual_seed(0)
        ids = list(stream_ids(model, start, tokens, vocab_limit=vocab_limit, kv_cache=kv_cache, generator=generator))
        assert len(ids) == tokens
        if device != "cpu":
            torch.cuda.synchronize()

    sample(True)  # warm-up: the GPU's kernels load on first use
    times = {True: [], False: []}
    for _ in range(repeats):
        for kv_cache in times:
            times[kv_cache].append(timed(sample, kv_cache))
            print(f"  {tokens} tokens, kv_cache={kv_cache}: {times[kv_cache][-1]:.2f} s", flush=True)
    return {"cache": statistics.median(times[True]), "plain": statistics.median(times[False])}


def gpu_table(tokens: int, repeats: int) -> str:
    """The cache against the plain path for the lecture's model on the GPU."""
    rows = []
    for n in (LECTURE_SHAPE["block_size"] - 1, tokens):
        result = cache_vs_plain(n, repeats, "cuda", lecture=True)
        plain, cache = result["plain"], result["cache"]
        rows.append(f"| {n} | {plain:.2f} s | {cache:.2f} s | {plain / cache:.1f}x |")
    return "\n".join(["| tokens | plain path | KV cache | speed-up (target >= 5x) |", "|---|---|---|---|", *rows])


def gpt2_folder(path: Path) -> None:
    """A randomly initialised transformers GPT-2 of SHAPE, as save_pretrained writes it."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(n_layer=SHAPE["n_layer"], n_head=SHAPE["n_head"], n_embd=SHAPE["n_embd"],
                        n_positions=SHAPE["block_size"])  # fmt: skip
    GPT2LMHeadModel(config).save_pretrained(path)


def post(url: str, body: dict) -> dict:
    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=600) as response:
        return json.loads(response.read())


def server_vs_in_process(folder: Path, tokens: int, repeats: int) -> dict[str, float]:
    """Seconds (medians) for a greedy completion of `tokens` tokens from serve.py and in this process."""
    server, port = served.start(folder, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        served.wait_until_ready(server, port)
        url = f"http://127.0.0.1:{port}/v1/completions"
        prompt = "First Citizen:\nBefore we proceed any further, hear me speak."
        request = {"prompt": prompt, "max_tokens": tokens, "temperature": 0}
        model, tokenizer = load_model(str(folder))
        expected = Completion(model, tokenizer, prompt, tokens, Sampling(temperature=0)).result()
        answer = post(url, request)  # warm-up
        assert answer["choices"][0]["text"] == expected.text and expected.completion_tokens == tokens
        times = {"server": [], "in process": []}
        for _ in range(repeats):
            times["server"].append(timed(post, url, request))
            times["in process"].append(timed(lambda: Completion(model, tokenizer, prompt, tokens,
                                                                Sampling(temperature=0)).result()))  # fmt: skip
            print(f"  {tokens}-token completion: server {times['server'][-1]:.3f} s, "
                  f"in process {times['in process'][-1]:.3f} s", flush=True)  # fmt: skip
    finally:
        os.killpg(server.pid, signal.SIGKILL)  # the server and its worker processes
        server.wait()
    return {key: statistics.median(values) for key, values in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3, help="runs of each, alternated; the medians count")
    parser.add_argument("--sample-tokens", type=int, default=1000)
    parser.add_argument("--completion-tokens", type=int, default=100)
    parser.add_argument("--results", type=Path, default=RESULTS, help="the Markdown file to write the section into")
    parser.add_argument("--gpu", action="store_true", help="(a) on the GPU, for the lecture's model")
    args = parser.parse_args()

    if args.gpu:
        table = gpu_table(args.sample_tokens, args.repeats)
        body = f"{stamp(where=torch.cuda.get_device_name())}\ntorch {version('torch')}.\n\n{table}"
        record(GPU_TITLE, body, args.results)
        return
    load = Path("/proc/loadavg").read_text().split()[0]
    print(f"(a) sampling, {args.repeats} runs each:", flush=True)
    sampling = cache_vs_plain(args.sample_tokens, args.repeats)
    print(f"(b) serving, {args.repeats} runs each:", flush=True)
    with tempfile.TemporaryDirectory(prefix="generation-") as tmp:
        gpt2_folder(Path(tmp))
        serving = server_vs_in_process(Path(tmp), args.completion_tokens, args.repeats)
    load_after = Path("/proc/loadavg").read_text().split()[0]

    rows = [
        (f"(a) {args.sample_tokens} tokens sampled, plain path (no cache)", f"{sampling['plain']:.2f} s", ""),
        (f"(a) {args.sample_tokens} tokens sampled, KV cache", f"{sampling['cache']:.2f} s",
         f"{sampling['plain'] / sampling['cache']:.1f}x faster (target >= 5x)"),
        (f"(b) {args.completion_tokens}-token completion, in process", f"{serving['in process']:.3f} s", ""),
        (f"(b) {args.completion_tokens}-token completion, serve.py over HTTP", f"{serving['server']:.3f} s",
         f"{serving['server'] / serving['in process'] - 1:+.1%} (target: at most 10% slower)"),
    ]  # fmt: skip
    table = "\n".join(["| | median | |", "|---|---|---|", *(f"| {a} | {b} | {c} |" for a, b, c in rows)])
    body = "\n".join([
        stamp(),
        f"torch {version('torch')} ({torch.get_num_threads()} threads), "
        f"litserve {version('litserve')}. Load average {load} before, {load_after} after (this benchmark's own work "
        f"included); other jobs on the machine slow both sides of each comparison. {args.repeats} alternated runs "
        "each, medians.",
        "",
        table,
    ])  # fmt: skip
    record(TITLE, body, args.results)


if __name__ == "__main__":
    main()
