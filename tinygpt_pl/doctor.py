"""First-run check of a node: python -m tinygpt_pl.doctor [--ckpt_dir out] [--cache_dir DIR] [--steps 10]

Run it on a freshly rented machine before a long training run. In a few minutes it prints one line per check:

- the versions of Python, torch, CUDA, NCCL and Lightning;
- each GPU: name, memory, bf16 support;
- on each GPU at once, a compiled bf16 training step of GPT-2 124M (fused AdamW): tokens/s and MFU;
- on each GPU, whether the flash (and memory-efficient) attention kernels run;
- an NCCL all-reduce over all GPUs with its bus bandwidth (the nccl-tests figure, comparable to the link's speed);
- a few DDP steps over all GPUs whose losses must equal the same steps in one process;
- the write speed (with fsync) and free space of the token cache folder and of the checkpoint folder;

and ends with one verdict line: `verdict: OK ...`, or `verdict: PROBLEMS: <the checks that failed>` and exit
status 1. A check that fails says why in one line and the others still run. Without a GPU it runs the CPU part
(a small model's training step, a gloo all-reduce and DDP over 2 CPU processes, the write speeds) in well under a
minute, and the verdict says that the GPUs were not checked.

Imports that pull in Lightning are made where they are used, so the worker processes start in seconds.
"""

import contextlib
import importlib.metadata
import math
import os
import queue
import shutil
import socket
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from multiprocessing.process import BaseProcess
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn import functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.parallel import DistributedDataParallel

from tinygpt_pl.errors import UsageError
from tinygpt_pl.model import GPT, GPTConfig

OK, FAIL, NOT_RUN = "ok", "FAIL", "not run"
LABEL_WIDTH = 24
GPT2_124M = GPTConfig(vocab_size=50304, block_size=1024, n_layer=12, n_head=12, n_embd=768, dropout=0.0, bias=True)
GPU_BATCH = 8  # sequences per step on each GPU, halved until it fits
CPU_MODEL = GPTConfig(vocab_size=65, block_size=128, n_layer=4, n_head=4, n_embd=128, dropout=0.0, bias=True)
CPU_BATCH = 8
GPU_WARMUP_STEPS = 3  # the first compiles
CPU_SECONDS = 5  # the CPU step times the --steps steps that start within this many seconds
DDP_MODEL = GPTConfig(vocab_size=64, block_size=32, n_layer=2, n_head=2, n_embd=32, dropout=0.0, bias=True)
DDP_STEPS, DDP_ROWS_PER_RANK, DDP_TOLERANCE = 3, 2, 1e-5  # fp32: only the order of float sums differs
ALL_REDUCE_BYTES = {"cuda": 256 * 2**20, "cpu": 16 * 2**20}  # fp32 tensors
ALL_REDUCE_ITERS = {"cuda": 10, "cpu": 5}
CPU_RANKS = 2  # processes for the gloo checks on a machine without GPUs
GROUP_TIMEOUT_S = 60  # a collective (or the rendezvous) that takes longer fails
GPU_WORKERS_TIMEOUT_S = 240  # compiling GPT-2 on every GPU at once
COLLECTIVE_WORKERS_TIMEOUT_S = 150
GPU_CHECKS = "GPU checks (bf16 step, flash attention, NCCL all-reduce)"


class CheckFailed(Exception):
    """A check ran and found a problem; the message says which."""


@dataclass(frozen=True)
class Result:
    """One line of the report."""

    label: str
    status: str  # OK, FAIL or NOT_RUN
    text: str  # a NOT_RUN text says so itself

    def line(self) -> str:
        text = f"FAIL: {self.text}" if self.status == FAIL else self.text
        return f"{self.label + ':':<{LABEL_WIDTH}} {text}"


def reason(error: BaseException) -> str:
    """One line for an exception: its root cause (compile errors wrap the real one), without a traceback."""
    while error.__cause__ is not None:
        error = error.__cause__
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    message = lines[0] if lines else "no message"
    message = message if isinstance(error, CheckFailed) else f"{type(error).__name__}: {message}"
    return message if len(message) <= 300 else message[:297] + "..."


def run_check(label: str, check: Callable[..., str], *args) -> Result:
    """check(*args) as a Result: its text when it returns, FAIL with the reason when it raises."""
    try:
        return Result(label, OK, check(*args))
    except Exception as e:
        return Result(label, FAIL, reason(e))


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --- versions and GPUs ---------------------------------------------------------------------------------------------


def cuda_version() -> str:
    if torch.version.hip:
        return f"none (ROCm {torch.version.hip} build)"
    return torch.version.cuda or "none (CPU-only torch build)"


def nccl_version() -> str:
    if not (dist.is_available() and dist.is_nccl_available()):
        return "not in this torch build"
    return ".".join(str(part) for part in torch.cuda.nccl.version())


def find_gpus() -> tuple[int, str]:
    """The number of CUDA GPUs torch sees, and why none when there are none."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count:
        return count, ""
    if torch.version.cuda is None and torch.version.hip is None:
        return 0, "this torch is a CPU-only build"
    if caught:  # e.g. a driver too old for this torch
        return 0, str(caught[0].message).strip().splitlines()[0]
    return 0, "torch sees no CUDA device: check nvidia-smi and CUDA_VISIBLE_DEVICES"


def has_bf16(device: int | torch.device) -> bool:
    """torch.cuda.is_bf16_supported(including_emulation=False), for any GPU rather than the current one."""
    return bool(torch.version.hip) or torch.cuda.get_device_properties(device).major >= 8


def describe_gpu(index: int) -> str:
    props = torch.cuda.get_device_properties(index)
    return (
        f"{props.name}, {props.total_memory / 2**30:.1f} GiB, compute capability {props.major}.{props.minor}, "
        f"bf16 {'yes' if has_bf16(index) else 'no'}"
    )


# --- training step speed -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Speed:
    """What timed_steps measured."""

    tokens_per_s: float
    steps: int
    warmup_s: float
    flops_per_token: int


def timed_steps(
    config: GPTConfig, device: torch.device, batch_size: int, warmup: int, steps: int, seconds: float = math.inf
) -> Speed:
    """The speed of `steps` training steps (those begun within `seconds`) after `warmup` steps. On a GPU the model is
    compiled, runs under bf16 autocast and steps fused AdamW, as train.py does there; on a CPU it runs eagerly in fp32.
    """
    gpu = device.type == "cuda"
    torch.manual_seed(0)
    model = GPT(config).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4, fused=gpu)
    forward = torch.compile(model) if gpu else model
    tokens = torch.randint(config.vocab_size, (batch_size, config.block_size + 1), device=device)
    inputs, targets = tokens[:, :-1], tokens[:, 1:]

    def step() -> torch.Tensor:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=gpu):
            _, loss = forward(inputs, targets)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    start = time.perf_counter()
    for _ in range(warmup):
        step()
    synchronize(device)
    warmup_s = time.perf_counter() - start
    start, done = time.perf_counter(), 0
    while done < steps and (done == 0 or time.perf_counter() - start < seconds):
        loss = step()
        done += 1
    synchronize(device)
    elapsed = time.perf_counter() - start
    if not torch.isfinite(loss):
        raise CheckFailed(f"the loss is {loss.item()} after {warmup + done} steps")
    return Speed(batch_size * config.block_size * done / elapsed, done, warmup_s, model.flops_per_token())


def describe_speed(speed: Speed, device: torch.device, precision: str) -> str:
    """Tokens/s and MFU as train.py logs them: the model's FLOPs per second over the device's dense peak."""
    from tinygpt_pl.training.throughput import peak_flops  # imports Lightning

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Lightning warns about devices missing from its table
        peak = peak_flops(device, precision)
    mfu = f"MFU {speed.flops_per_token * speed.tokens_per_s / peak:.1%}" if peak else "MFU unknown (no peak FLOP/s)"
    return f"{speed.tokens_per_s:,.0f} tokens/s, {mfu}"


def gpu_step(device: torch.device, steps: int) -> str:
    """The speed of GPT-2 124M training on this GPU, halving the micro-batch until it fits in memory."""
    if not has_bf16(device):
        raise CheckFailed("this GPU has no bf16 support (it needs compute capability 8.0, Ampere, or newer)")
    batch_size = GPU_BATCH
    while True:
        try:
            speed = timed_steps(GPT2_124M, device, batch_size, GPU_WARMUP_STEPS, steps)
            break
        except torch.cuda.OutOfMemoryError:
            if batch_size == 1:
                raise
        batch_size //= 2  # outside the except block: the failed attempt's tensors are freed by now
        torch.compiler.reset()  # drop the compiled graphs (and what they hold) of the failed attempt
        torch.cuda.empty_cache()
    return (
        f"GPT-2 124M, compiled, bf16, batch {batch_size}x{GPT2_124M.block_size}, {speed.steps} steps: "
        f"{describe_speed(speed, device, 'bf16-mixed')}, warmup with compile {speed.warmup_s:.0f} s"
    )


def cpu_step(steps: int) -> str:
    """The speed of a small GPT's training on the CPU (GPT-2 124M would take minutes here)."""
    device = torch.device("cpu")
    speed = timed_steps(CPU_MODEL, device, CPU_BATCH, 1, steps, CPU_SECONDS)
    c = CPU_MODEL
    return (
        f"GPT {c.n_layer} layers x {c.n_embd}, fp32, batch {CPU_BATCH}x{c.block_size}, {speed.steps} steps: "
        f"{describe_speed(speed, device, '32-true')}"
    )


# --- attention kernels ---------------------------------------------------------------------------------------------


def kernel_reasons(messages: list[str], kernel: str) -> list[str]:
    """torch's reasons for not running one kernel: the warnings after its '<kernel> ... not used because:' warning."""
    reasons, ours = [], False
    for message in messages:
        message = message.split(" (Triggered internally")[0].strip()
        if message.endswith("not used because:"):
            ours = message.lower().startswith(kernel.lower())
        elif ours:
            reasons.append(message)
    return reasons


def kernel_runs(backend: SDPBackend, kernel: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> str | None:
    """None when causal scaled_dot_product_attention runs forward and backward with that backend alone, else why not."""
    with warnings.catch_warnings(record=True) as caught, sdpa_kernel(backend):
        warnings.simplefilter("always")
        try:
            F.scaled_dot_product_attention(q, k, v, is_causal=True).sum().backward()
            synchronize(q.device)
            return None
        except RuntimeError as e:
            return "; ".join(kernel_reasons([str(w.message) for w in caught], kernel)) or reason(e)


def flash_attention(device: torch.device) -> str:
    """Whether the flash attention kernel (the one training uses) runs here, and the memory-efficient one."""
    q, k, v = (torch.randn(8, 12, 1024, 64, device=device, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    flash = kernel_runs(SDPBackend.FLASH_ATTENTION, "Flash attention", q, k, v)
    efficient = kernel_runs(SDPBackend.EFFICIENT_ATTENTION, "Memory efficient", q, k, v)
    text = f"flash {'yes' if flash is None else f'no ({flash})'}, "
    text += f"memory-efficient {'yes' if efficient is None else f'no ({efficient})'}"
    if flash is not None:
        raise CheckFailed(text)
    return text


# --- all-reduce and DDP across processes ---------------------------------------------------------------------------


def all_reduce_bandwidth(device: torch.device, world: int) -> str:
    """Median time of an fp32 all-reduce across all ranks, as bus bandwidth (nccl-tests: size / time x 2(n-1)/n,
    what each link carries in a ring), after checking that the first one sums correctly."""
    size, iters = ALL_REDUCE_BYTES[device.type], ALL_REDUCE_ITERS[device.type]
    tensor = torch.full((size // 4,), float(dist.get_rank() + 1), device=device)
    dist.all_reduce(tensor)
    expected = world * (world + 1) / 2
    if not torch.all(tensor == expected):
        low, high = tensor.min().item(), tensor.max().item()
        raise CheckFailed(f"all-reduce summed wrong: expected {expected:g} everywhere, got {low:g} to {high:g}")
    times = torch.zeros(iters, dtype=torch.float64)
    for i in range(iters):
        synchronize(device)
        start = time.perf_counter()
        dist.all_reduce(tensor)
        synchronize(device)
        times[i] = time.perf_counter() - start
    times = times.to(device)
    dist.all_reduce(times, op=dist.ReduceOp.MAX)  # an iteration takes as long as its slowest rank
    median = statistics.median(times.tolist())
    bus = size / median * 2 * (world - 1) / world
    return (
        f"{dist.get_backend()}, {world} ranks, {size // 2**20} MiB fp32, sums right, median of {iters}: "
        f"{median * 1e3:.2f} ms, bus bandwidth {bus / 1e9:.2f} GB/s"
    )


def ddp_matches_one_process(device: torch.device, world: int) -> str:
    """DDP_STEPS steps of a small GPT with DDP, each rank on its share of one global batch, must give the losses of
    the same steps in one process on the whole batch: DDP averages the gradients, so only float rounding differs."""
    rank = dist.get_rank()
    rows = DDP_ROWS_PER_RANK * world
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(DDP_MODEL.vocab_size, (rows, DDP_MODEL.block_size + 1), generator=generator).to(device)
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    mine = slice(rank * DDP_ROWS_PER_RANK, (rank + 1) * DDP_ROWS_PER_RANK)

    def losses(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, mean_over_ranks: bool) -> list[float]:
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        result = []
        for _ in range(DDP_STEPS):
            _, loss = model(x, y)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            loss = loss.detach()
            if mean_over_ranks:
                dist.all_reduce(loss)
                loss /= world
            result.append(loss.item())
        return result

    torch.manual_seed(0)
    model = GPT(DDP_MODEL).to(device)
    initial = {name: t.clone() for name, t in model.state_dict().items()}
    ddp = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    distributed = losses(ddp, inputs[mine], targets[mine], mean_over_ranks=True)
    if rank != 0:
        return "compared on rank 0"
    single = GPT(DDP_MODEL).to(device)
    single.load_state_dict(initial)
    reference = losses(single, inputs, targets, mean_over_ranks=False)
    diff = max(abs(a - b) for a, b in zip(distributed, reference, strict=True))
    text = (
        f"{DDP_STEPS} steps, batch {rows}x{DDP_MODEL.block_size} over {world} ranks: losses "
        f"{', '.join(f'{x:.4f}' for x in distributed)} equal one process's within {diff:.1e} "
        f"(fp32 tolerance {DDP_TOLERANCE:g})"
    )
    if diff > DDP_TOLERANCE:
        raise CheckFailed(text)
    return text


# --- worker processes ----------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def gpu_worker(rank: int, world: int, port: int, steps: int) -> Iterator[Result]:
    """The checks of one GPU, run in its own process while the other GPUs run theirs."""
    device = torch.device("cuda", rank)
    torch.cuda.set_device(device)
    torch.set_float32_matmul_precision("high")  # TF32, as train.py runs on GPUs
    # every GPU compiles at once: share the cores instead of starting min(32, cores) compile workers each
    os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", str(max(1, (os.cpu_count() or 1) // world)))
    yield run_check(f"gpu {rank} flash attention", flash_attention, device)
    yield run_check(f"gpu {rank} step", gpu_step, device, steps)


COLLECTIVE_LABELS = ("all-reduce", "DDP = one process")


def collective_worker(rank: int, world: int, port: int, backend: str) -> Iterator[Result]:
    """One rank of the all-reduce and DDP checks: one process per GPU with NCCL, or CPU processes with gloo."""
    if backend == "nccl":
        device = torch.device("cuda", rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    try:
        dist.init_process_group(
            backend,
            init_method=f"tcp://127.0.0.1:{port}",
            rank=rank,
            world_size=world,
            timeout=timedelta(seconds=GROUP_TIMEOUT_S),
            device_id=device if backend == "nccl" else None,
        )
    except Exception as e:
        for label in COLLECTIVE_LABELS:
            yield Result(label, FAIL, f"no {backend} process group: {reason(e)}")
        return
    try:
        yield run_check(COLLECTIVE_LABELS[0], all_reduce_bandwidth, device, world)
        yield run_check(COLLECTIVE_LABELS[1], ddp_matches_one_process, device, world)
    finally:
        dist.destroy_process_group()


def _rank_main(worker: Callable[..., Iterator[Result]], rank: int, world: int, port: int, results, args) -> None:
    """A worker process: sends each Result as (rank, label, status, text), then (rank, None, None, why it ended)."""
    why = ""
    try:
        for r in worker(rank, world, port, *args):
            results.put((rank, r.label, r.status, r.text))
    except Exception as e:
        why = reason(e)
    results.put((rank, None, None, why))
    results.close()
    results.join_thread()  # everything is sent
    os._exit(0)  # skip the interpreter's teardown: seconds on a small machine, and nothing is left to clean up


def run_ranks(
    worker: Callable[..., Iterator[Result]], world: int, labels: Callable[[int], list[str]], timeout: float, *args
) -> list[dict[str, Result]]:
    """Run worker(rank, world, port, *args) in `world` fresh processes and collect each rank's Results by label.

    A rank that reports nothing for one of labels(rank) (it crashed, hung, or ran out of `timeout` seconds) gets a
    FAIL for it that says so. No process outlives this call: those still running at the deadline are killed.
    """
    context = mp.get_context("spawn")
    results = context.Queue()
    processes: list[BaseProcess] = []
    found: list[dict[str, Result]] = [{} for _ in range(world)]
    ended: dict[int, str] = {}  # rank -> why it ended ("" when all went well)
    deadline = time.monotonic() + timeout
    try:
        port = free_port()
        for rank in range(world):
            processes.append(context.Process(target=_rank_main, args=(worker, rank, world, port, results, args)))
            processes[-1].start()
        while len(ended) < world and time.monotonic() < deadline:
            try:
                rank, label, status, text = results.get(timeout=1.0)
            except queue.Empty:
                if any(p.is_alive() for p in processes):
                    continue
                try:  # every process has ended: read what they left in the queue
                    rank, label, status, text = results.get(timeout=1.0)
                except queue.Empty:
                    break
            if label is None:
                ended[rank] = text
            else:
                found[rank][label] = Result(label, status, text)
        for rank, p in enumerate(processes):
            if rank not in ended:
                ended[rank] = f"timed out after {timeout:.0f} s" if p.is_alive() else f"process exit code {p.exitcode}"
    except Exception as e:  # a process that cannot start, a queue that cannot be read
        for rank in range(world):
            ended.setdefault(rank, f"worker processes failed: {reason(e)}")
    finally:
        for p in processes:
            if p.pid is not None:  # started
                p.join(timeout=max(0.0, min(5.0, deadline - time.monotonic())))  # a hung one is killed at once
                if p.is_alive():
                    p.kill()
                    p.join()
        results.close()
    for rank in range(world):
        for label in labels(rank):
            if label not in found[rank]:
                found[rank][label] = Result(label, FAIL, ended[rank] or "no result")
    return found


def merge_ranks(label: str, per_rank: list[dict[str, Result]]) -> Result:
    """One Result for a check every rank ran: the first rank's failure, else rank 0's result."""
    for rank, results in enumerate(per_rank):
        if results[label].status == FAIL:
            return Result(label, FAIL, f"rank {rank}: {results[label].text}")
    return per_rank[0][label]


# --- disks ---------------------------------------------------------------------------------------------------------


def write_speed(folder: Path, megabytes: int) -> str:
    """Write `megabytes` MiB of random bytes into folder, fsync, and delete the file: the speed a checkpoint or the
    token cache gets. A folder that does not exist is created and removed again."""
    missing = [p for p in (folder, *folder.parents) if not p.exists()]  # deepest first
    chunk = os.urandom(2**20)  # random: a compressing filesystem must not make the disk look faster
    path = None
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, path = tempfile.mkstemp(dir=folder, prefix=".doctor-write-test-")
        start = time.perf_counter()
        with os.fdopen(fd, "wb") as f:
            for _ in range(megabytes):
                f.write(chunk)
            f.flush()
            os.fsync(f.fileno())
        elapsed = time.perf_counter() - start
        free = shutil.disk_usage(folder).free
    finally:
        if path is not None:
            with contextlib.suppress(OSError):
                os.remove(path)
        for p in missing:
            with contextlib.suppress(OSError):
                p.rmdir()
    speed = megabytes / elapsed
    return f"{folder}: {megabytes} MiB with fsync in {elapsed:.2f} s: {speed:,.0f} MiB/s, {free / 1e9:,.0f} GB free"


# --- the report ----------------------------------------------------------------------------------------------------


def gpu_checks(gpus: int, steps: int) -> list[Result]:
    """Every GPU's attention kernels and training speed, each GPU in its own process, all at once."""
    per_gpu = run_ranks(
        gpu_worker, gpus, lambda r: [f"gpu {r} flash attention", f"gpu {r} step"], GPU_WORKERS_TIMEOUT_S, steps
    )
    return [found[f"gpu {i} flash attention"] for i, found in enumerate(per_gpu)] + [
        found[f"gpu {i} step"] for i, found in enumerate(per_gpu)
    ]


def collective_checks(gpus: int) -> list[Result]:
    """The all-reduce and DDP checks: over every GPU with NCCL, or over CPU_RANKS CPU processes with gloo."""
    if gpus == 1:
        return [Result(label, NOT_RUN, "not run: one GPU, nothing to reduce across") for label in COLLECTIVE_LABELS]
    backend, world = ("nccl", gpus) if gpus else ("gloo", CPU_RANKS)
    if not (dist.is_available() and dist.is_backend_available(backend)):
        return [Result(label, FAIL, f"this torch has no {backend}") for label in COLLECTIVE_LABELS]
    per_rank = run_ranks(
        collective_worker, world, lambda r: list(COLLECTIVE_LABELS), COLLECTIVE_WORKERS_TIMEOUT_S, backend
    )
    return [merge_ranks(label, per_rank) for label in COLLECTIVE_LABELS]


def verdict(results: list[Result], gpus: int) -> str:
    failed = [r.label for r in results if r.status == FAIL]
    not_run = [r.label for r in results if r.status == NOT_RUN]
    no_gpu = " (no GPU found: GPU checks not run)" if gpus == 0 else ""
    if failed:
        return f"verdict: PROBLEMS: {', '.join(failed)}{no_gpu}"
    if gpus == 0:
        return f"verdict: OK on CPU{no_gpu}"
    return f"verdict: OK: {gpus} GPU{'s' * (gpus > 1)}, every check passed" + (
        f" (not run: {', '.join(not_run)})" if not_run else ""
    )


def doctor(*, ckpt_dir: str = "out", cache_dir: str | None = None, steps: int = 10, write_mb: int = 256) -> int:
    """Check this machine before training: one line per check, then the verdict (exit status 1: a check failed).

    Versions, GPUs, training speed, attention kernels, all-reduce bandwidth, DDP, disk write speeds.

    Args:
        ckpt_dir: the folder checkpoints will go to (train.py's --trainer.default_root_dir).
        cache_dir: the token cache folder (default: $TINYGPT_PL_CACHE, else ~/.cache/tinygpt_pl).
        steps: timed training steps on each device, after warmup (on a CPU: those that start within 5 s).
        write_mb: MiB written to each folder to measure its write speed.
    """
    from tinygpt_pl.data.datamodule import default_cache_dir  # imports Lightning

    for option, value in (("steps", steps), ("write_mb", write_mb)):
        if value < 1:
            raise UsageError(f"--{option} {value}: it must be at least 1")
    results: list[Result] = []

    def report(result: Result) -> None:
        results.append(result)
        print(result.line(), flush=True)

    report(Result("python", OK, sys.version.split()[0]))
    report(run_check("torch", lambda: torch.__version__))
    report(run_check("CUDA", cuda_version))
    report(run_check("NCCL", nccl_version))
    report(run_check("lightning", lambda: importlib.metadata.version("lightning")))
    gpus, why_none = find_gpus()
    if gpus:
        report(Result("GPUs", OK, f"{gpus} found"))
        for i in range(gpus):
            report(run_check(f"gpu {i}", describe_gpu, i))
        for result in gpu_checks(gpus, steps):
            report(result)
    else:
        report(Result("GPUs", NOT_RUN, f"none found: {GPU_CHECKS} not run; {why_none}"))
        report(run_check("cpu step", cpu_step, steps))
    for result in collective_checks(gpus):
        report(result)
    report(run_check("cache write", write_speed, Path(cache_dir) if cache_dir else default_cache_dir(), write_mb))
    report(run_check("checkpoint write", write_speed, Path(ckpt_dir), write_mb))
    print(verdict(results, gpus), flush=True)
    return 1 if any(r.status == FAIL for r in results) else 0


if __name__ == "__main__":
    from jsonargparse import auto_cli

    from tinygpt_pl.errors import exit_on_bad_input

    sys.exit(exit_on_bad_input(auto_cli)(doctor, exit_on_error=False))
