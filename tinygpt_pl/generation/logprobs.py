"""The log-probabilities of a text's tokens, as OpenAI's completions API reports them (`logprobs`, with `echo` the
prompt's too): each token's log-probability given the tokens before it (at most block_size of them, as generation
crops its context), the `top` most likely tokens at each position and each token's offset in the text."""

import torch
from torch.nn import functional as F

from tinygpt_pl.data.tokenizer import Tokenizer
from tinygpt_pl.generation.generate import Model


@torch.no_grad()
def next_token_logprobs(model: Model, ids: list[int], vocab_size: int) -> torch.Tensor:
    """(len(ids) - 1, vocab_size): the log-probabilities of the token after each position but the last; positions past
    the model's context see the block_size tokens before them."""
    device = next(model.parameters()).device
    block = model.config.block_size
    logits = model.logits(model.hidden_states(torch.tensor([ids[:block]], device=device)))[0, :-1]
    if len(ids) > block:  # one window per further token, all in one batch
        windows = torch.tensor([ids[p - block : p] for p in range(block, len(ids))], device=device)
        logits = torch.cat((logits, model.logits(model.hidden_states(windows)[:, -1])))
    return F.log_softmax(logits.float()[:, :vocab_size], dim=-1)


def openai_logprobs(model: Model, tokenizer: Tokenizer, ids: list[int], start: int, top: int) -> dict:
    """OpenAI's `logprobs` object for ids[start:] (start 0: with the first token, which has no log-probability):
    tokens, token_logprobs, top_logprobs ({token: logprob} of the `top` most likely) and text_offset."""
    logprobs = next_token_logprobs(model, ids, tokenizer.vocab_size)
    chosen = logprobs.gather(1, torch.tensor(ids[1:], device=logprobs.device)[:, None])[:, 0].tolist()
    best, best_ids = logprobs.topk(top, dim=-1) if top else (logprobs[:, :0], logprobs[:, :0].long())
    tops = [{tokenizer.decode([i]): lp for i, lp in zip(row_ids, row, strict=True)}
            for row_ids, row in zip(best_ids.tolist(), best.tolist(), strict=True)]  # fmt: skip
    offsets = [len(tokenizer.decode(ids[:i])) for i in range(len(ids))]
    first = offsets[start] if start < len(ids) else len(tokenizer.decode(ids))
    return {
        "tokens": [tokenizer.decode([i]) for i in ids[start:]],
        "token_logprobs": ([None] + chosen)[start:],
        "top_logprobs": ([None] + tops)[start:],
        "text_offset": [offset - first for offset in offsets[start:]] if start else offsets,
    }
