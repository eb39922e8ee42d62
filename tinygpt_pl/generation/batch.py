"""Continuous batching for serve.py: the completions under way advance together, one token each per decode step, and
those at the same position in one forward pass. A request joins between steps (its prompt computed alone) and leaves
as soon as it ends, runs past its time limit or its client goes, so a long completion never holds up a short one.

Each completion keeps its own sampling settings, random generator and stop strings: it draws the same tokens, in the
same order, as generate.Completion alone (which still turns them into text, here fed token by token)."""

import time
from collections import deque
from dataclasses import dataclass, field
from threading import Lock

import torch

from tinygpt_pl.generation.generate import Completion, KVCache, Model, NextTokenLogits, transposed_head


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
    deadline: float
    logits: NextTokenLogits
    idx: torch.Tensor = field(init=False)  # the prompt and the tokens so far
    next_token: torch.Tensor | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        device = next(self.completion.model.parameters()).device
        self.idx = torch.tensor([self.completion.prompt_ids], dtype=torch.long, device=device)

    def batchable(self) -> bool:
        """One new token after the cached ones, within the window: a decode step that others can share."""
        return self.logits.caches is not None and self.logits.cached == self.idx.size(1) - 1 < self.logits.block_size


class StackedCache:
    """One layer's caches of several completions at the same position, as one batch (the KVCache protocol)."""

    def __init__(self, caches: list[KVCache]) -> None:
        self.caches, self.length = caches, caches[0].length

    def update(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        rows = [cache.update(k[i : i + 1], v[i : i + 1]) for i, cache in enumerate(self.caches)]
        return torch.cat([k for k, _ in rows]), torch.cat([v for _, v in rows])


class Batch:
    """The completions under way in one inference worker. add() from any thread; step() from one."""

    def __init__(self, model: Model, max_size: int, timeout: float | None, kv_cache: bool = True) -> None:
        self.model, self.max_size, self.timeout, self.kv_cache = model, max_size, timeout, kv_cache
        self.head_t = transposed_head(model)
        self.waiting: deque[tuple[str, object]] = deque()
        self.running: dict[str, Running] = {}
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
            token = int(run.next_token)
            if token == completion.end_id:
                out += self._end(uid)
                continue
            run.idx = torch.cat((run.idx, run.next_token.view(1, 1)), dim=1)
            pieces = list(completion.feed(token))
            if run.stream and pieces:
                out.append((uid, {"text": "".join(pieces)}, False))
            if completion.finish_reason is not None or len(completion.completion_ids) == completion.max_new_tokens:
                out += self._end(uid)
        return out

    def _admit(self) -> list[tuple[str, dict | Exception | None, bool]]:
        out = []
        with self.lock:
            while self.waiting and (len(self.running) < self.max_size or isinstance(self.waiting[0][1], Cancel)):
                uid, work = self.waiting.popleft()
                if isinstance(work, Cancel):  # both the cancelled request and the Cancel end here
                    if self.running.pop(work.uid, None) or any(w[0] == work.uid for w in self.waiting):
                        self.waiting = deque(w for w in self.waiting if w[0] != work.uid)
                        out.append((work.uid, None, True))
                    out.append((uid, None, True))
                elif isinstance(work, Exception):
                    out.append((uid, work, True))
                else:
                    completion, stream = work
                    deadline = time.monotonic() + self.timeout if self.timeout else float("inf")
                    logits = NextTokenLogits(self.model, self.kv_cache, self.head_t)
                    self.running[uid] = Running(completion, stream, deadline, logits)
                    if completion.max_new_tokens == 0:
                        out += self._end(uid)
        return out

    def _next_tokens(self) -> None:
        """Each running completion's next token: the logits of those at one position in one batch, the others (a
        prompt, a moved window) alone; each sampled with its own settings and generator."""
        groups: dict[int, list[Running]] = {}
        for run in self.running.values():
            key = run.logits.cached if run.batchable() else -1 - len(groups)  # alone: a group of its own
            groups.setdefault(key, []).append(run)
        for group in groups.values():
            if len(group) == 1:
                logits = group[0].logits(group[0].idx)
            else:
                caches = [
                    StackedCache([run.logits.caches[i] for run in group]) for i in range(len(group[0].logits.caches))
                ]
                x = self.model.hidden_states(torch.cat([run.idx[:, -1:] for run in group]), caches)
                logits = self.model.logits(x[:, -1], self.head_t)
                for run in group:
                    run.logits.cached += 1
            for row, run in zip(logits, group, strict=True):
                completion = run.completion
                limit = completion.tokenizer.vocab_size
                run.next_token = completion.sampling.choose(row[None, :limit], completion.generator)[0, 0]

    def _end(self, uid: str, timed_out: bool = False) -> list[tuple[str, dict | Exception | None, bool]]:
        """The completion's last message: the rest of a stream, or the whole text; a plain one past the time limit
        gets an error."""
        run = self.running.pop(uid)
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
