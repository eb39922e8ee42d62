"""Log-likelihoods of continuations, as lm-evaluation-harness's `loglikelihood` computes them, but with each context
run once: a request's context and all its continuations share one row of the batch, each continuation at the
positions it would have after the context alone and seeing only the context and itself (a mask, as packed documents
see only themselves), so the context's keys and values serve every continuation, and the continuations of several
examples share a batch.

Tokens: lm-eval's split (HFLM._encode_pair): trailing spaces of the context move to the continuation, the whole text is
encoded and the continuation is what follows the context's own tokens. A pair longer than the model's context
(block_size + 1 tokens, the last never fed) loses tokens from the left, as lm-eval crops it; such continuations then
run with their own, cropped, context, and are counted.
"""

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch.nn import functional as F
from tqdm import tqdm

from tinygpt_pl.data.tokenizer import Tokenizer
from tinygpt_pl.errors import UsageError
from tinygpt_pl.evaluation.tasks import Example
from tinygpt_pl.generation.generate import Model


@dataclass(frozen=True)
class Score:
    loglikelihood: float  # sum over the continuation's tokens
    greedy: bool  # every token of the continuation is the model's most likely next token
    tokens: int  # the continuation's tokens


@dataclass(frozen=True)
class Request:
    """Continuations of one example that share a context: its tokens, and theirs."""

    example: int  # index into the examples
    choices: tuple[int, ...]  # which of the example's continuations
    context: list[int]
    continuations: list[list[int]]


@dataclass
class Encoded:
    requests: list[Request]
    skipped: list[tuple[int, str]]  # examples left out (unencodable text): index and why
    cropped: set[int]  # examples whose context lost tokens from the left


def encode_pair(tokenizer: Tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-eval's HFLM._encode_pair (causal models); an empty context is the end-of-text token, as lm-eval's prefix."""
    if not context:
        if tokenizer.eot_id is None:
            raise UsageError("an empty context needs an end-of-text token to start from, which this tokenizer lacks")
        return [tokenizer.eot_id], tokenizer.encode(continuation)
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces > 0:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    whole = tokenizer.encode(context + continuation)
    context_ids = tokenizer.encode(context)
    return context_ids, whole[len(context_ids) :]


def encode(
    examples: Sequence[Example], tokenizer: Tokenizer, block_size: int, skip_unencodable: bool = False
) -> Encoded:
    """The requests of the examples: lm-eval's pairs, then an example's `completion` pairs as build-nanogpt encodes
    them (context and continuation each on its own), one request per context. Text the tokenizer cannot encode
    (characters a char model never saw) is refused in one line that names the example, or, with skip_unencodable, the
    example is skipped and listed."""
    encoded = Encoded([], [], set())
    for i, example in enumerate(examples):
        try:
            pairs = [encode_pair(tokenizer, example.context, c) for c in example.continuations]
            if example.completion is not None:  # its choices follow lm-eval's
                context, continuations = example.completion
                pairs += [(tokenizer.encode(context), tokenizer.encode(c)) for c in continuations]
        except UsageError as e:
            if not skip_unencodable:
                raise UsageError(f"example {i}: {e}; or pass --skip_unencodable to skip such examples") from None
            encoded.skipped.append((i, str(e)))
            continue
        if not all(context for context, _ in pairs):
            raise UsageError(f"example {i}: the context is only spaces: give every example some context")
        whole: dict[tuple[int, ...], list[int]] = {}  # choices that fit the model's context, by their context
        cropped = []
        for choice, (context, continuation) in enumerate(pairs):
            if not continuation:
                raise UsageError(f"example {i}: continuation {choice} is empty: every answer needs some text")
            if len(continuation) > block_size:
                raise UsageError(
                    f"example {i}: continuation {choice} is {len(continuation)} tokens, longer than the model's "
                    f"context ({block_size}): it cannot be scored"
                )
            if len(context) + len(continuation) <= block_size + 1:
                whole.setdefault(tuple(context), []).append(choice)
            else:
                cropped.append(choice)
        for context, choices in whole.items():
            encoded.requests.append(Request(i, tuple(choices), list(context), [pairs[c][1] for c in choices]))
        for choice in cropped:  # (context + continuation)[-(block_size + 1):], the last token never fed
            context, continuation = pairs[choice]
            kept = block_size + 1 - len(continuation)
            encoded.requests.append(Request(i, (choice,), context[-kept:], [continuation]))
            encoded.cropped.add(i)
    return encoded


def row_length(request: Request) -> int:
    """The tokens a request feeds: its context, and each continuation but its last token (which nothing follows)."""
    return len(request.context) + sum(len(c) - 1 for c in request.continuations)


def batches(requests: list[Request], batch_size: int) -> Iterator[list[Request]]:
    """Requests longest row first, packed until a batch holds batch_size continuations (at least one request)."""
    batch, rows = [], 0
    for request in sorted(requests, key=lambda r: -row_length(r)):
        if batch and rows + len(request.continuations) > batch_size:
            yield batch
            batch, rows = [], 0
        batch.append(request)
        rows += len(request.continuations)
    if batch:
        yield batch


@torch.no_grad()
def score_batch(model: Model, batch: list[Request], vocab_size: int) -> list[list[Score]]:
    """Each request's continuations' Scores, one forward pass for the batch: a request's row is its context and then
    each continuation (but its last token); continuation i's tokens are at positions len(context) onwards and see the
    context and themselves, causally."""
    device = next(model.parameters()).device
    width = max(map(row_length, batch))
    fed, positions, parts = [], [], []  # parts: 0 for the context, k for the k-th continuation (from 1), -1 padding
    row, predictor, target = [], [], []  # per scored token: its row, the position whose output predicts it, the token
    for b, request in enumerate(batch):
        context = request.context
        ids, where, part = list(context), list(range(len(context))), [0] * len(context)
        for i, continuation in enumerate(request.continuations, start=1):
            start = len(ids)
            predictor += [len(context) - 1, *range(start, start + len(continuation) - 1)]
            ids += continuation[:-1]
            where += range(len(context), len(context) + len(continuation) - 1)
            part += [i] * (len(continuation) - 1)
            row += [b] * len(continuation)
            target += continuation
        pad = width - len(ids)
        fed.append(ids + [0] * pad)
        positions.append(where + [0] * pad)
        parts.append(part + [-1] * pad)
    parts_t = torch.tensor(parts, device=device)
    index = torch.arange(width, device=device)
    sees = (index[None, :, None] >= index[None, None, :]) & (
        (parts_t[:, None, :] == 0) | (parts_t[:, None, :] == parts_t[:, :, None])
    )  # (B, T, keys): the keys before it of the context and of its own part
    hidden = model.hidden_states(torch.tensor(fed, device=device), positions=torch.tensor(positions, device=device),
                                 mask=sees[:, None])  # fmt: skip
    row_t, predictor_t = torch.tensor(row, device=device), torch.tensor(predictor, device=device)
    target_t = torch.tensor(target, device=device)
    logprobs = F.log_softmax(model.logits(hidden[row_t, predictor_t]).float()[:, :vocab_size], dim=-1)
    token_ll = logprobs.gather(1, target_t[:, None])[:, 0]
    hit = (logprobs.argmax(dim=-1) == target_t).float()
    lengths = [len(c) for r in batch for c in r.continuations]
    which = torch.repeat_interleave(torch.arange(len(lengths), device=device), torch.tensor(lengths, device=device))
    totals = torch.zeros(len(lengths), 2, dtype=torch.float64, device=device)
    totals.index_add_(0, which, torch.stack((token_ll.double(), hit.double()), dim=1))
    scores = iter(Score(ll, hits == n, n) for (ll, hits), n in zip(totals.tolist(), lengths, strict=True))
    return [[next(scores) for _ in r.continuations] for r in batch]


def score(
    model: Model, encoded: Encoded, n_examples: int, vocab_size: int, batch_size: int = 32, progress: bool = False
) -> list[list[Score] | None]:
    """Every example's continuations' Scores (None for skipped examples), batch_size continuations per forward."""
    if batch_size < 1:
        raise UsageError(f"--batch_size must be >= 1, got {batch_size}")
    results: list[dict[int, Score] | None] = [{} for _ in range(n_examples)]
    for i, _ in encoded.skipped:
        results[i] = None
    total = sum(len(r.continuations) for r in encoded.requests)
    with tqdm(total=total, unit="choice", disable=not progress, dynamic_ncols=True) as bar:
        for batch in batches(encoded.requests, batch_size):
            for request, scores in zip(batch, score_batch(model, batch, vocab_size), strict=True):
                results[request.example].update(zip(request.choices, scores, strict=True))
            bar.update(sum(len(r.continuations) for r in batch))
    return [None if r is None else [r[c] for c in sorted(r)] for r in results]
