"""The data benchmark: tokenizing a large corpus into the token cache, a cache hit, and serving batches from it.

For each corpus size, a .jsonl corpus of ~4 KB documents (pieces of tiny Shakespeare) is written to a temp folder,
then, each in a fresh subprocess so that peak memory is its own:
- raw: tiktoken's gpt2 encode_ordinary_batch over the same documents in a pool of --num-proc processes, timed
  from the pool's start with the encoding loaded and the documents in memory;
- prepare: TextDataModule(tokenizer="gpt2").prepare_data() and setup() into an empty cache (read the files,
  tokenize, write, hash), timed from the same point: the data module built, so the encoding loaded,
  with its peak memory: the largest resident set of the process or any worker (which counts the mapped file
  pages it read), and the peak anonymous memory of the process and its workers together (what it really holds);
  raw and prepare alternate --repeats times and the fastest run of each counts (the peak memory: the largest);
- cache hit: the data module built, prepare_data() and setup() again, on the finished cache.
Then one DataLoader worker serves 16 x 1024 training batches from the memory-mapped tokens.

    python benchmarks/data_throughput.py --data-path /path/to/tinyshakespeare.txt --sizes-mb 100 400
"""

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from importlib.metadata import version
from multiprocessing import Pool
from pathlib import Path

from results import REPO, RESULTS, record, stamp

from tinygpt_pl.data.tokenizer import get_tokenizer

TITLE = "Data: tokenizing, cache hit, serving (benchmarks/data_throughput.py)"
DOC_CHARS = 4096
ENCODING = None


def write_corpus(path: Path, text: str, size_mb: float) -> int:
    """A .jsonl file of about size_mb MB of documents cut from text at shifting offsets; returns its bytes."""
    with open(path, "w") as f:
        i = 0
        while f.tell() < size_mb * 1e6:
            start = (i * 7919) % (len(text) - DOC_CHARS)
            f.write(json.dumps({"text": text[start : start + DOC_CHARS]}) + "\n")
            i += 1
    return path.stat().st_size


def peak_rss_mb() -> float:
    """The largest resident set of this process or any of its finished children, in MB. It counts the pages of
    memory-mapped files (Arrow tables, token files) that were read, which the kernel reclaims at will."""
    return max(resource.getrusage(who).ru_maxrss for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)) / 1024


def anon_mb(pids: list[int]) -> float:
    """The anonymous memory (heap, not file pages) that the processes pids hold now, in MB (Linux)."""
    total = 0
    for pid in pids:
        try:
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:  # the process just ended
            continue
        total += next((int(line.split()[1]) for line in status.splitlines() if line.startswith("RssAnon:")), 0)
    return total / 1024


class PeakAnonMemory(threading.Thread):
    """Samples the anonymous memory of this process and its children every 20 ms; .peak is the largest sum."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.peak, self.running = 0.0, True

    def run(self) -> None:
        while self.running:
            children = Path(f"/proc/{os.getpid()}/task/{os.getpid()}/children").read_text().split()
            self.peak = max(self.peak, anon_mb([os.getpid(), *map(int, children)]))
            time.sleep(0.02)


def count_tokens(docs: list[str]) -> int:
    return sum(map(len, ENCODING.encode_ordinary_batch(docs)))


def raw_tiktoken(corpus: str, num_proc: int) -> dict:
    """tiktoken alone: the documents in chunks of 1000 over a pool of num_proc processes (reading not timed)."""
    with open(corpus) as f:
        docs = [json.loads(line)["text"] for line in f]
    chunks = [docs[i : i + 1000] for i in range(0, len(docs), 1000)]
    global ENCODING
    ENCODING = get_tokenizer("gpt2").encoding  # tiktoken's own gpt2 Encoding (offline too), inherited by the pool
    start = time.perf_counter()  # the pool's start-up counts, as that of prepare's pool does
    with Pool(num_proc) as pool:
        tokens = sum(pool.imap(count_tokens, chunks))
    return {"seconds": time.perf_counter() - start, "tokens": tokens}


def prepare(corpus: str, cache: str, num_proc: int) -> dict:
    from tinygpt_pl.data.datamodule import TextDataModule

    sampler = PeakAnonMemory()
    sampler.start()
    start = time.perf_counter()
    dm = TextDataModule(path=corpus, tokenizer="gpt2", cache_dir=cache, num_proc=num_proc, block_size=1024)
    loaded = time.perf_counter()  # the encoding is loaded: raw tiktoken's clock starts here too
    dm.prepare_data()
    dm.setup("fit")
    end = time.perf_counter()
    sampler.running = False
    tokens = len(dm.train_tokens) + len(dm.val_tokens)
    return {"seconds": end - loaded, "with_init_seconds": end - start, "tokens": tokens, "peak_mb": peak_rss_mb(),
            "peak_anon_mb": sampler.peak}  # fmt: skip


def serve(corpus: str, cache: str, batches: int) -> dict:
    """Tokens/s of one DataLoader worker making 16 x 1024 training batches from the memmap."""
    from tinygpt_pl.data.batches import IndexedBatches, TrainBatchMaker
    from tinygpt_pl.data.datamodule import TextDataModule

    dm = TextDataModule(path=corpus, tokenizer="gpt2", cache_dir=cache, block_size=1024, batch_size=16, num_workers=1)
    dm.setup("fit")
    maker = TrainBatchMaker(dm.train_tokens, 1024, 16, seed=0, accumulate=1, world_size=1, rank=0)
    loader = dm._loader(IndexedBatches(maker, range(batches + 10)))
    it = iter(loader)
    for _ in range(10):  # worker start-up and page cache warm-up
        next(it)
    start = time.perf_counter()
    for _ in range(batches):
        next(it)
    return {"tokens_per_s": batches * 16 * 1024 / (time.perf_counter() - start)}


def in_subprocess(job: str, *args) -> dict:
    """Run job(*args) of this script in a fresh interpreter; its result comes back as JSON."""
    cmd = [sys.executable, __file__, "--job", job, "--job-args", json.dumps(args)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"{job} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-path", help="UTF-8 text to build the corpora from; default tiny Shakespeare")
    parser.add_argument("--sizes-mb", type=float, nargs="+", default=[100, 400])
    parser.add_argument("--num-proc", type=int, default=os.cpu_count())
    parser.add_argument("--batches", type=int, default=500, help="batches timed when serving")
    parser.add_argument("--repeats", type=int, default=2, help="raw and prepare runs per size; the fastest counts")
    parser.add_argument("--results", type=Path, default=RESULTS, help="the Markdown file to write the section into")
    parser.add_argument("--job", help=argparse.SUPPRESS)
    parser.add_argument("--job-args", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.job:
        job = {"raw": raw_tiktoken, "prepare": prepare, "serve": serve}[args.job]
        print(json.dumps(job(*json.loads(args.job_args))))
        return

    from tinygpt_pl.data.datamodule import default_cache_dir, fetch_tiny_shakespeare

    text = Path(args.data_path or fetch_tiny_shakespeare(default_cache_dir())).read_text()
    rows = []
    with tempfile.TemporaryDirectory(prefix="tinygpt-data-bench-") as tmp:
        for size in args.sizes_mb:
            corpus, cache = str(Path(tmp) / f"corpus{size:g}.jsonl"), str(Path(tmp) / f"cache{size:g}")
            mb = write_corpus(Path(corpus), text, size) / 1e6
            raws, colds = [], []
            for _ in range(args.repeats):  # alternated, the fastest of each: other load on the machine hits both
                shutil.rmtree(cache, ignore_errors=True)
                raws.append(in_subprocess("raw", corpus, args.num_proc))
                colds.append(in_subprocess("prepare", corpus, cache, args.num_proc))
            raw, cold = (min(runs, key=lambda run: run["seconds"]) for runs in (raws, colds))
            cold["peak_mb"], cold["peak_anon_mb"] = (max(run[k] for run in colds) for k in ("peak_mb", "peak_anon_mb"))
            hit = in_subprocess("prepare", corpus, cache, args.num_proc)
            served = in_subprocess("serve", corpus, cache, args.batches)
            rows.append({
                "corpus MB": f"{mb:.0f}",
                "tokens": f"{cold['tokens']:,}",
                "raw tiktoken MB/s": f"{mb / raw['seconds']:.1f}",
                "prepare MB/s": f"{mb / cold['seconds']:.1f}",
                "prepare / raw": f"{raw['seconds'] / cold['seconds']:.0%}",
                "cache hit s": f"{hit['with_init_seconds']:.2f}",
                "prepare peak RSS MB": f"{cold['peak_mb']:.0f}",
                "prepare peak anon MB": f"{cold['peak_anon_mb']:.0f}",
                "serving tokens/s per worker": f"{served['tokens_per_s'] / 1e6:.1f}M",
            })  # fmt: skip
            shutil.rmtree(cache)  # keeps the temp folder at one corpus's cache at a time

    header = list(rows[0])
    table = "\n".join(
        ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        + ["| " + " | ".join(row[h] for h in header) + " |" for row in rows]
    )
    body = (
        f"{stamp()}\n--num-proc {args.num_proc} of {os.cpu_count()} CPUs; Python {platform.python_version()}, "
        f"tiktoken {version('tiktoken')}, datasets {version('datasets')}, numpy {version('numpy')}, "
        f"torch {version('torch')}.\n\n{table}\n"
    )
    record(TITLE, body, args.results)


if __name__ == "__main__":
    main()
