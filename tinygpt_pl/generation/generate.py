"""Generation: the tokens and text a GPT continues a prompt with, one token at a time (nanoGPT's generate, made fast).

With the key/value cache (the default), the prompt runs through the model once (prefill) and then each step feeds
only the new token: every layer keeps the keys and values of the positions it has seen (KVCache), and the LM head
runs only for the last position. kv_cache=False is the plain path: each step runs the whole context again.

Past the model's context (block_size), the model sees the last block_size tokens, as nanoGPT's generate crops
them. The window then moves by one position each step, so every cached key and value would belong to another
position: each step runs the whole window again without the caches, as the plain path does.
"""

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import cached_property

import torch
from torch.nn import functional as F

from tinygpt_pl.bigram import BigramLanguageModel
from tinygpt_pl.data.tokenizer import Tokenizer
from tinygpt_pl.errors import UsageError
from tinygpt_pl.model import GPT

Model = GPT | BigramLanguageModel  # anything with hidden_states(idx, caches), logits(x) and config.block_size, n_layer
REPLACEMENT = "\ufffd"  # what decoding shows for a character whose bytes are split between tokens, until it is whole


class KVCache:
    """One layer's keys and values (B, n_head, T, head_size) for up to `size` positions, in buffers allocated at the
    first update, with the dtype and device the model computes them in."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.length = 0
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None

    def update(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.k is None:
            shape = (*k.shape[:2], self.size, k.size(3))
            self.k, self.v = k.new_empty(shape), v.new_empty(shape)
        end = self.length + k.size(2)
        self.k[:, :, self.length : end] = k
        self.v[:, :, self.length : end] = v
        self.length = end
        return self.k[:, :, :end], self.v[:, :, :end]


class NextTokenLogits:
    """The model's logits (B, vocab_size) for the token after idx, called with idx grown by one token each time."""

    def __init__(
        self,
        model: Model,
        kv_cache: bool = True,
        head_t: torch.Tensor | None = None,
        caches: list[KVCache] | None = None,
    ) -> None:
        """caches: those to fill, one per layer (default new ones)."""
        self.model = model
        self.block_size = model.config.block_size
        if kv_cache:
            self.caches = caches or [KVCache(self.block_size) for _ in range(model.config.n_layer)]
        else:
            self.caches = None
        self.cached = 0  # positions of the context that the caches hold
        if head_t is not None:
            self.head_t = head_t

    @cached_property
    def head_t(self) -> torch.Tensor | None:
        """Made at the first call, in the thread that generates (serve.py: generation/server.py)."""
        return transposed_head(self.model)

    def __call__(self, idx: torch.Tensor) -> torch.Tensor:
        context = idx[:, -self.block_size :]
        if self.caches is None or idx.size(1) > self.block_size:  # past the context: the window moved (module doc)
            x = self.model.hidden_states(context)
        else:
            x = self.model.hidden_states(context[:, self.cached :], self.caches)
            self.cached = context.size(1)
        return self.model.logits(x[:, -1], self.head_t)


def transposed_head(model: Model) -> torch.Tensor | None:
    """The LM head's weight transposed, on a CPU: one row times the head's (vocab, n_embd) weight takes a CPU 2.4x
    longer than times its transpose stored as such (7.7 against 3.2 ms for GPT-2's vocabulary at n_embd 256 on an
    AMD EPYC): a copy for a generation."""
    head = getattr(model, "lm_head", None)
    return head.weight.T.contiguous() if head is not None and head.weight.is_cpu else None


@dataclass(frozen=True)
class Sampling:
    """How the next token is chosen from the model's logits."""

    temperature: float = 1.0  # 0: always the most likely token (greedy); < 1 sharpens the distribution, > 1 flattens
    top_k: int | None = None  # only among the k most likely tokens
    top_p: float = 1.0  # only among the most likely tokens that together hold top_p of the probability (nucleus)

    def __post_init__(self) -> None:
        if not self.temperature >= 0:
            raise UsageError(f"temperature must be >= 0 (0 picks the most likely token), got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            raise UsageError(f"top_k must be >= 1 (or null: all tokens), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise UsageError(f"top_p must be in (0, 1] (1: all tokens), got {self.top_p}")

    def choose(
        self, logits: torch.Tensor, generator: torch.Generator | list[torch.Generator | None] | None = None
    ) -> torch.Tensor:
        """The next token (B, 1) for logits (B, vocab). generator: the random source, or one per row (completions
        decoded together, generation/batch.py: each draws what it would draw alone)."""
        if self.temperature == 0:
            return logits.argmax(dim=-1, keepdim=True)
        logits = logits / self.temperature
        if self.top_k is not None and self.top_k < logits.size(-1):
            v, _ = torch.topk(logits, self.top_k)
            logits[logits < v[:, [-1]]] = -float("inf")
        probs = F.softmax(logits, dim=-1)
        if self.top_p < 1:
            # the nucleus: the most likely tokens until their probabilities add up to top_p, the token crossing it too
            sorted_probs, order = probs.sort(dim=-1, descending=True)
            outside = sorted_probs.cumsum(dim=-1) - sorted_probs >= self.top_p
            probs = probs.scatter(-1, order, sorted_probs.masked_fill(outside, 0.0))
        # inverse transform sampling: the first token whose cumulative probability exceeds u ~ U(0, total), 25x faster
        # than torch.multinomial over GPT-2's 50k tokens on a CPU (0.07 against 1.8 ms)
        cdf = probs.double().cumsum(dim=-1)
        if isinstance(generator, list):
            u = torch.cat([torch.rand(1, 1, dtype=cdf.dtype, device=cdf.device, generator=g) for g in generator])
        else:
            u = torch.rand(cdf.size(0), 1, dtype=cdf.dtype, device=cdf.device, generator=generator)
        u = u * cdf[:, -1:]
        return torch.searchsorted(cdf, u, right=True).clamp_(max=cdf.size(-1) - 1)


@torch.no_grad()
def stream_ids(
    model: Model,
    idx: torch.Tensor,
    max_new_tokens: int,
    sampling: Sampling = Sampling(),
    *,
    vocab_limit: int | None = None,
    eot_id: int | None = None,
    kv_cache: bool = True,
    generator: torch.Generator | None = None,
    next_logits: NextTokenLogits | None = None,
) -> Iterator[torch.Tensor]:
    """The tokens (B,) that follow idx (B, T), one per step, up to max_new_tokens.

    vocab_limit: ids at or above it are never chosen (the padding rows of the embedding).
    eot_id: stop when it is chosen (one sequence only, B = 1), without yielding it.
    generator: the random source, so that a seed fixes the output without touching the global RNG.
    next_logits: the model's (and its caches') state from a previous call whose idx this idx extends, so that the
        positions it ran are not run again (a chat's earlier turns); default a new one.
    """
    if eot_id is not None and idx.size(0) != 1:
        raise ValueError(f"stopping at the end-of-text token needs one sequence, got {idx.size(0)}")
    next_logits = next_logits or NextTokenLogits(model, kv_cache)
    for _ in range(max_new_tokens):
        idx_next = sampling.choose(next_logits(idx)[:, :vocab_limit], generator)
        if eot_id is not None and idx_next.item() == eot_id:
            return
        idx = torch.cat((idx, idx_next), dim=1)
        yield idx_next[:, 0]


def generate(
    model: Model, idx: torch.Tensor, max_new_tokens: int, sampling: Sampling = Sampling(), **kwargs
) -> torch.Tensor:
    """idx (B, T) extended by the tokens stream_ids (same keyword arguments) yields."""
    new = [token[:, None] for token in stream_ids(model, idx, max_new_tokens, sampling, **kwargs)]
    return torch.cat([idx, *new], dim=1)


class Completion:
    """The text a model continues a prompt with, as OpenAI's completions define it: iterate over it for the text as it
    is generated, in pieces; afterwards text, finish_reason and the token counts tell the result.

    It ends at the end-of-text token (BPE tokenizers; or end_id, a chat reply's end; finish_reason "stop"), at the
    first of the stop strings (which the text leaves out; "stop") or after max_new_tokens ("length"). While stop strings
    could still begin in the last characters, those wait. An empty prompt starts a new document (the end-of-text token)
    where there is one.
    The prompt may also be token ids (OpenAI's API takes both); completion_ids are the tokens generated.
    """

    def __init__(
        self,
        model: Model,
        tokenizer: Tokenizer,
        prompt: str | list[int],
        max_new_tokens: int,
        sampling: Sampling = Sampling(),
        stop: Sequence[str] = (),
        kv_cache: bool = True,
        generator: torch.Generator | None = None,
        end_id: int | None = None,
        next_logits: NextTokenLogits | None = None,
    ) -> None:
        if max_new_tokens < 0:
            raise UsageError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
        if "" in stop:
            raise UsageError("a stop string is empty: give stop strings of at least one character")
        if isinstance(prompt, list) and any(not 0 <= i < tokenizer.vocab_size for i in prompt):
            raise UsageError(f"a prompt's token ids must be in [0, {tokenizer.vocab_size}), the tokenizer's ids")
        ids = list(prompt) if isinstance(prompt, list) else tokenizer.encode(prompt)
        ids = ids or ([] if tokenizer.eot_id is None else [tokenizer.eot_id])
        if not ids:
            raise UsageError("the prompt is empty: give at least one character to start from")
        self.model, self.tokenizer, self.sampling = model, tokenizer, sampling
        self.max_new_tokens, self.stop, self.kv_cache, self.generator = max_new_tokens, tuple(stop), kv_cache, generator
        self.prompt_ids = ids
        self.end_id = tokenizer.eot_id if end_id is None else end_id  # the token that ends it (not part of it)
        self.next_logits = next_logits  # a chat's caches of the prompt's start (chat.py)
        self.held = max(map(len, self.stop), default=1) - 1  # characters that could be the start of a stop string
        # decoded after the prompt: a token's text can depend on the one before (SentencePiece's leading spaces)
        self.prompt_chars = len(tokenizer.decode(ids))
        self.text = ""
        self.finish_reason: str | None = None
        self.completion_tokens = 0
        self.completion_ids: list[int] = []  # generated so far

    def __iter__(self) -> Iterator[str]:
        device = next(self.model.parameters()).device
        idx = torch.tensor([self.prompt_ids], dtype=torch.long, device=device)
        tokens = stream_ids(self.model, idx, self.max_new_tokens, self.sampling, vocab_limit=self.tokenizer.vocab_size,
                            eot_id=self.end_id, kv_cache=self.kv_cache, generator=self.generator,
                            next_logits=self.next_logits)  # fmt: skip
        for token in tokens:
            yield from self.feed(token.item())
            if self.finish_reason is not None:
                return
        yield from self.finish()

    def feed(self, token: int) -> Iterator[str]:
        """Take in the next generated token (not the end-of-text one): the text it completes, if any; ends the
        completion ("stop") when a stop string appears. (Generation driven from outside: generation/batch.py.)"""
        self.completion_ids.append(token)
        text = self.tokenizer.decode(self.prompt_ids + self.completion_ids)[self.prompt_chars :].rstrip(REPLACEMENT)
        stops = [i for s in self.stop if (i := text.find(s, len(self.text))) >= 0]
        end = min(stops) if stops else len(text) - self.held
        yield from self._emit(text, end)
        if stops:
            self.finish_reason, self.completion_tokens = "stop", len(self.completion_ids)

    def finish(self) -> Iterator[str]:
        """End the completion after the tokens fed (at max_new_tokens: "length"; the end-of-text token: "stop"): the
        text held back for stop strings."""
        self.finish_reason = "length" if len(self.completion_ids) == self.max_new_tokens else "stop"
        self.completion_tokens = len(self.completion_ids)
        text = self.tokenizer.decode(self.prompt_ids + self.completion_ids)[self.prompt_chars :]
        yield from self._emit(text, len(text))

    def _emit(self, text: str, end: int) -> Iterator[str]:
        if end > len(self.text):
            piece = text[len(self.text) : end]
            self.text += piece
            yield piece

    def result(self) -> "Completion":
        """Generates the whole completion (the non-streamed form)."""
        for _ in self:
            pass
        return self
