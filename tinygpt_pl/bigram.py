"""The lecture's first model: the bigram language model (configs/lecture/00_bigram.yaml, `--model.arch bigram`).

Each token reads the logits of the token after it from a vocab_size x vocab_size lookup table; nothing earlier in
the context counts. The GPT (model.py) grows out of it: the table becomes a token embedding, and attention lets the
tokens before it have a say.
"""

from dataclasses import dataclass

import torch
import torch.nn as nn

from tinygpt_pl.model import GPT, KVCache


@dataclass
class BigramConfig:
    vocab_size: int = 65
    block_size: int = 8  # bounds only the context that generation feeds back; the table sees one token
    n_layer: int = 0  # no Blocks: generation keeps no caches


class BigramLanguageModel(nn.Module):
    def __init__(self, config: BigramConfig) -> None:
        super().__init__()
        self.config = config
        self.token_embedding_table = nn.Embedding(config.vocab_size, config.vocab_size)
        # all logits 0: every next token equally likely, so the loss starts at ln(vocab_size)
        nn.init.zeros_(self.token_embedding_table.weight)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def flops_per_token(self) -> int:
        """No matrix multiplies: a row is looked up. (The softmax's work is not counted for the GPT either.)"""
        return 0

    def hidden_states(
        self,
        idx: torch.Tensor,
        caches: list[KVCache] | None = None,
        positions: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Each position's row of the table (B, T, vocab_size): a table sees one token, so neither a cache of the
        positions before, nor positions, nor what else a token could see (mask) change it."""
        return self.token_embedding_table(idx)

    def logits(self, x: torch.Tensor, head_t: torch.Tensor | None = None) -> torch.Tensor:
        """The rows are the logits already (a table has no head)."""
        return x

    forward = GPT.forward  # the GPT's, written against hidden_states and logits alone: the same loss for both models
