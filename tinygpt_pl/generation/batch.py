"""Continuous batching for serve.py: the completions under way advance together, one token each per decode step, in
one forward pass, each at its own position. A request joins between steps (its prompt computed alone) and leaves as
soon as it ends, runs past its time limit or its client goes, so a long completion never holds up a short one.

Each completion has a slot: a row of the batch's key/value cache (SharedCache), which its prompt fills and the
decode steps extend. A step feeds every completion's last token at its own position, each attending only to its
own row's keys up to that position (RaggedCache, and the mask).

Each completion keeps its own sampling settings, random generator and stop strings: it draws the same tokens, in the
same order, as generate.Completion alone (which still turns them into text, here fed token by token)."""

import heapq
import time
from collections import deque
from dataclasses import dataclass, field
from threading import Lock

import torch

from tinygpt_pl.generation.generate import Completion, KVCache, Model, NextTokenLogits, Sampling, transposed_head


@dataclass(frozen=True)
class Cancel:
    """Sent in place of a request when the client of request `uid` went away: its slot is freed at once."""

    uid: str


class TimedOut(Exception):
    """A completion that was not streamed ran past the time limit."""


@dataclass
class Running:
    """One completion under way: its text, its tokens so far and its caches."""

    completion: Completion
    stream: bool
    slot: int
    deadline: float
    logits: NextTokenLogits
    ids: list[int] = field(init=False)  # the prompt and the tokens so far
    next_token: int | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        self.ids = list(self.completion.prompt_ids)

    def idx(self) -> torch.Tensor:
        return torch.tensor([self.ids], device=next(self.completion.model.parameters()).device)

    def batchable(self) -> bool:
        """One new token after the cached ones, within the window: a decode step that others can share."""
        return self.logits.caches is not None and self.logits.cached == len(self.ids) - 1 < self.logits.block_size


class SharedCache:
    """One layer's keys and values of every slot (slots, n_head, size, head_size), allocated at the first update
    (zeros: a row's unwritten positions, masked out, must not be NaN)."""

    def __init__(self, slots: int, size: int) -> None:
        self.slots, self.size = slots, size
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None

    def allocate(self, like: torch.Tensor) -> None:
        if self.k is None:
            shape = (self.slots, like.size(1), self.size, like.size(3))
            self.k, self.v = like.new_zeros(shape), like.new_zeros(shape)


class SlotCache(KVCache):
    """A completion's own cache (what NextTokenLogits runs alone through it: its prompt), in its slot's row."""

    def __init__(self, shared: SharedCache, slot: int) -> None:
        super().__init__(shared.size)
        self.shared, self.slot = shared, slot

    def update(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.k is None:
            self.shared.allocate(k)
            self.k, self.v = self.shared.k[self.slot : self.slot + 1], self.shared.v[self.slot : self.slot + 1]
        return super().update(k, v)


class RaggedCache:
    """One layer's caches of several completions, each one new token at its own position, as one batch (the KVCache
    protocol): the new keys and values go into each slot's row at its position; all rows come back up to the
    furthest, the model's mask keeping each token to its own row's positions."""

    def __init__(self, shared: SharedCache, slots: list[int], positions: torch.Tensor, end: int) -> None:
        self.shared, self.positions, self.end = shared, positions, end
        self.slots = torch.tensor(slots, device=positions.device)
        # consecutive slots (the usual case: each request takes the lowest free one) are read as a view, not copied
        self.rows = slice(slots[0], slots[-1] + 1) if slots == list(range(slots[0], slots[-1] + 1)) else self.slots

    def update(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.shared.k[self.slots, :, self.positions] = k[:, :, 0]
        self.shared.v[self.slots, :, self.positions] = v[:, :, 0]
        return self.shared.k[self.rows, :, : self.end], self.shared.v[self.rows, :, : self.end]


class Batch:
    """The completions under way in one inference worker. add() from any thread; step() from one."""

    def __init__(self, model: Model, max_size: int, timeout: float | None, kv_cache: bool = True) -> None:
        self.model, self.max_size, self.timeout, self.kv_cache = model, max_size, timeout, kv_cache
        self.head_t = transposed_head(model)
        self.waiting: deque[tuple[str, object]] = deque()
        self.running: dict[str, Running] = {}
        self.free_slots = list(range(max_size))
        self.caches = [SharedCache(max_size, model.config.block_size) for _ in range(model.config.n_layer)]
        self.lock = Lock()

    def add(self, uid: str, work: tuple[Completion, bool] | Cancel | Exception) -> None:
        """A request (its completion and whether it streams), a Cancel, or the error that refuses a request."""
        with self.lock:
            self.waiting.append((uid, work))

    def active(self) -> bool:
        return bool(self.running or self.waiting)

    @torch.no_grad()
    def step(self) -> list[tuple[str, dict | Exception | None, bool]]:
        """Admit waiting requests, then one token for every completion: (uid, message or error, whether it ended)."""
        out = self._admit()
        now = time.monotonic()
        for uid, run in list(self.running.items()):
            if now > run.deadline:
                out += self._end(uid, timed_out=True)
        self._next_tokens()
        for uid, run in list(self.running.items()):
            completion = run.completion
            token = run.next_token
            if token == completion.end_id:
                out += self._end(uid)
                continue
            run.ids.append(token)
            pieces = list(completion.feed(token))
            if run.stream and pieces:
                out.append((uid, {"text": "".join(pieces)}, False))
            if completion.finish_reason is not None or len(completion.completion_ids) == completion.max_new_tokens:
                out += self._end(uid)
        return out

    def _admit(self) -> list[tuple[str, dict | Exception | None, bool]]:
        """Cancels and refusals first, wherever they wait (they need no slot, and a Cancel frees one), then requests
        while there are free slots."""
        out = []
        with self.lock:
            for uid, work in [w for w in self.waiting if not isinstance(w[1], tuple)]:
                self.waiting.remove((uid, work))
                if isinstance(work, Exception):
                    out.append((uid, work, True))
                    continue
                if cancelled := self.running.pop(work.uid, None):  # both the cancelled request and the Cancel end
                    heapq.heappush(self.free_slots, cancelled.slot)
                if cancelled or any(w[0] == work.uid for w in self.waiting):
                    self.waiting = deque(w for w in self.waiting if w[0] != work.uid)
                    out.append((work.uid, None, True))
                out.append((uid, None, True))
            while self.waiting and self.free_slots:
                uid, (completion, stream) = self.waiting.popleft()
                deadline = time.monotonic() + self.timeout if self.timeout else float("inf")
                slot = heapq.heappop(self.free_slots)
                caches = [SlotCache(cache, slot) for cache in self.caches]
                logits = NextTokenLogits(self.model, self.kv_cache, self.head_t, caches)
                self.running[uid] = Running(completion, stream, slot, deadline, logits)
                if completion.max_new_tokens == 0:
                    out += self._end(uid)
        return out

    def _next_tokens(self) -> None:
        """Each running completion's next token: the logits of those one token past their cached positions in one
        forward pass, the others (a prompt, a moved window) alone; sampled together where the settings are the same,
        each with its own generator."""
        together = sorted((run for run in self.running.values() if run.batchable()), key=lambda run: run.slot)
        if len(together) < 2:
            together = []
        alone = [run for run in self.running.values() if not (together and run.batchable())]
        runs, logits = together + alone, []
        if together:
            device = next(self.model.parameters()).device
            positions = torch.tensor([run.logits.cached for run in together], device=device)
            end = int(positions.max()) + 1
            mask = (torch.arange(end, device=device) <= positions[:, None])[:, None, None]  # (B, 1, 1, end)
            caches = [RaggedCache(cache, [run.slot for run in together], positions, end) for cache in self.caches]
            idx = torch.tensor([run.ids[-1:] for run in together], device=device)
            x = self.model.hidden_states(idx, caches, positions[:, None], mask)
            logits.append(self.model.logits(x[:, -1], self.head_t))
            for run in together:
                run.logits.cached += 1
                for cache in run.logits.caches:
                    cache.length += 1
        logits += [run.logits(run.idx()) for run in alone]
        if not runs:
            return
        logits = (logits[0] if len(logits) == 1 else torch.cat(logits))[:, : runs[0].completion.tokenizer.vocab_size]
        alike: dict[Sampling, list[int]] = {}
        for i, run in enumerate(runs):
            alike.setdefault(run.completion.sampling, []).append(i)
        tokens = torch.empty(len(runs), dtype=torch.long)
        for sampling, rows in alike.items():
            generators = [runs[i].completion.generator for i in rows]
            tokens[rows] = sampling.choose(logits[rows], generators)[:, 0].cpu()
        for run, token in zip(runs, tokens.tolist(), strict=True):
            run.next_token = token

    def _end(self, uid: str, timed_out: bool = False) -> list[tuple[str, dict | Exception | None, bool]]:
        """The completion's last message: the rest of a stream, or the whole text; a plain one past the time limit
        gets an error."""
        run = self.running.pop(uid)
        heapq.heappush(self.free_slots, run.slot)
        completion = run.completion
        rest = "".join(completion.finish()) if completion.finish_reason is None else ""  # (else a stop string ended it)
        if timed_out:
            if not run.stream:
                message = (f"the completion took longer than the server's limit of {self.timeout:g} s "
                           "(serve.py --request_timeout): ask for fewer tokens, or stream it")  # fmt: skip
                return [(uid, TimedOut(message), True)]
            completion.finish_reason = "length"
        prompt_tokens = len(completion.prompt_ids)
        usage = {"prompt_tokens": prompt_tokens, "completion_tokens": completion.completion_tokens,
                 "total_tokens": prompt_tokens + completion.completion_tokens}  # fmt: skip
        if run.stream:
            return [(uid, {"text": rest, "finish_reason": completion.finish_reason, "usage": usage}, True)]
        message = {"text": completion.text, "finish_reason": completion.finish_reason, "usage": usage,
                   "prompt_ids": completion.prompt_ids, "completion_ids": completion.completion_ids}  # fmt: skip
        return [(uid, message, True)]
