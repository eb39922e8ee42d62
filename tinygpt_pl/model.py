"""The GPT Transformer, as the "Let's build GPT" lecture builds it: plain PyTorch, no Lightning.

Reading order follows the lecture: token + position embeddings (the bigram model's lookup table grown up),
causal multi-head self-attention, the feed-forward layer, the residual Block with pre-LayerNorm, and the
GPT that stacks Blocks and predicts the next token.

The defaults build nanoGPT's GPT exactly. Options choose other modules when the model is built, never branches in
the forward pass:
- the lecture's earlier stages (configs/lecture/): no position embeddings, blocks without residual connections
  (and so without output projections, with a 1x feed-forward), no feed-forward, no LayerNorm;
- GPT-2's own arithmetic (activation "gelu_tanh"), for its weights (hf/convert.py);
- the modern recipe of the GPT-2 speedruns (configs/shakespeare_char_cpu_modern.yaml): rotary positions, RMSNorm,
  QK-norm, ReLU², an untied head, zero-initialised output projections, logit soft-capping.
"""

import math
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn as nn
from torch.nn import functional as F

ACTIVATIONS = ("gelu", "gelu_tanh", "relu", "relu2")
POSITION_EMBEDDINGS = ("learned", "rotary", "none")
NORMS = ("layernorm", "rmsnorm", "none")


@dataclass
class GPTConfig:
    vocab_size: int = 65
    block_size: int = 256  # the longest context the model sees
    n_layer: int = 6
    n_head: int = 6
    n_embd: int = 384
    dropout: float = 0.2
    bias: bool = False  # biases in Linear and LayerNorm layers; False is a little faster and as good
    activation: str = "gelu"  # the feed-forward's: gelu (exact), gelu_tanh (GPT-2's), relu (the lecture's), relu2
    # the lecture's stages: what the model had before each step of the lecture added it
    pos_emb: str = "learned"  # learned (GPT-2), rotary (rotates q and k by position), none
    feed_forward: bool = True
    residual: bool = True  # residual connections, each branch ending in a projection; the feed-forward 4x wide
    norm: str = "layernorm"  # pre-norm before each branch and the head: layernorm, rmsnorm, none
    # the modern recipe's options
    qk_norm: bool = False  # RMS-normalise each head's queries and keys before attention
    tie_weights: bool = True  # the token embedding and the LM head share one matrix
    zero_init_proj: bool = False  # residual branches' output projections start at zero: each Block starts as identity
    logit_softcap: float | None = None  # logits = c * tanh(logits / c)

    def __post_init__(self) -> None:
        """Refuses, in one line each, option values and combinations that build no model of the lecture or recipe."""
        for name, allowed in (("activation", ACTIVATIONS), ("pos_emb", POSITION_EMBEDDINGS), ("norm", NORMS)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name}={getattr(self, name)!r} is not one of {', '.join(allowed)}")
        if self.n_embd % self.n_head != 0:
            raise ValueError(
                f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}: choose n_embd as a multiple of n_head"
            )
        if self.pos_emb == "rotary" and (self.n_embd // self.n_head) % 2:
            raise ValueError(f"rotary positions rotate pairs of features: head size {self.head_size} is odd")
        if self.residual and not self.feed_forward:
            raise ValueError("residual connections come with the feed-forward in the lecture: set feed_forward true")
        if not self.residual and self.norm != "none":
            raise ValueError("normalisation comes after residual connections in the lecture: set norm none")
        if self.logit_softcap is not None and self.logit_softcap <= 0:
            raise ValueError(f"logit_softcap must be > 0, got {self.logit_softcap}")

    @property
    def head_size(self) -> int:
        return self.n_embd // self.n_head


class KVCache(Protocol):
    """One layer's keys and values of the positions already seen (generation/generate.py): generation feeds one new
    token."""

    length: int  # positions cached before this call

    def update(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append k, v (B, n_head, T, head_size); return the keys and values of every position so far."""
        ...


def make_norm(config: GPTConfig, size: int) -> nn.Module:
    if config.norm == "layernorm":
        return nn.LayerNorm(size, bias=config.bias)
    return nn.RMSNorm(size) if config.norm == "rmsnorm" else nn.Identity()


class ReLUSquared(nn.Module):
    """relu(x)²: as good as GELU in the GPT-2 speedruns, and cheaper (Primer, So et al. 2021)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(x).square()


def make_activation(name: str) -> nn.Module:
    return {
        "gelu": nn.GELU(),
        "gelu_tanh": nn.GELU(approximate="tanh"),
        "relu": nn.ReLU(),
        "relu2": ReLUSquared(),
    }[name]


class RotaryEmbedding(nn.Module):
    """Rotary position embedding (RoFormer): turns each pair of a head's features by an angle proportional to the
    position, so that a query-key product depends only on how far apart the two tokens are."""

    def __init__(self, head_size: int, block_size: int, base: float = 10000.0) -> None:
        super().__init__()
        frequencies = base ** -(torch.arange(0, head_size, 2, dtype=torch.float32) / head_size)
        angles = torch.outer(torch.arange(block_size, dtype=torch.float32), frequencies)  # (block_size, head_size/2)
        self.register_buffer("cos", angles.cos(), persistent=False)
        self.register_buffer("sin", angles.sin(), persistent=False)

    def forward(self, x: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, n_head, T, head_size) rotated for each token's position (positions (B or 1, T); default 0 .. T-1)."""
        if positions is None:
            positions = torch.arange(x.size(2), device=x.device)[None]
        cos, sin = self.cos[positions][:, None], self.sin[positions][:, None]
        x1, x2 = x.float().chunk(2, dim=-1)
        return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).type_as(x)


class SoftCap(nn.Module):
    """cap * tanh(logits / cap): logits stay within (-cap, cap), smoothly (Gemma 2, the GPT-2 speedruns)."""

    def __init__(self, cap: float) -> None:
        super().__init__()
        self.cap = cap

    def forward(self, logits: torch.Tensor) -> torch.Tensor:
        return self.cap * torch.tanh(logits / self.cap)


class CausalSelfAttention(nn.Module):
    """All heads of multi-head self-attention at once: each token attends to itself and the tokens before it."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.n_head = config.n_head
        self.dropout = config.dropout
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)  # query, key, value
        # the heads' concatenation projected back into the residual stream (the lecture adds it with residuals)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias) if config.residual else nn.Identity()
        self.resid_dropout = nn.Dropout(config.dropout)
        self.qk_norm = nn.RMSNorm(config.head_size, elementwise_affine=False) if config.qk_norm else nn.Identity()
        self.rotary = RotaryEmbedding(config.head_size, config.block_size) if config.pos_emb == "rotary" else None

    def forward(
        self,
        x: torch.Tensor,
        cache: KVCache | None = None,
        mask: torch.Tensor | None = None,
        positions: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """mask (B, 1, T, keys): which keys each token may attend to (default: itself and those before it); positions
        (B or 1, T): where the tokens are, for rotary embeddings (default 0 .. T-1)."""
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        # (B, T, C) -> (B, n_head, T, head_size)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        q, k = self.qk_norm(q), self.qk_norm(k)
        if self.rotary is not None:
            q, k = self.rotary(q, positions), self.rotary(k, positions)
        if cache is not None:
            k, v = cache.update(k, v)
        # softmax(q @ k^T / sqrt(head_size), masked to the past) @ v; fused (flash) kernels where available.
        # The scale keeps the scores' variance near 1, so softmax stays diffuse at initialisation instead of
        # converging to one-hot (lecture: "scaled attention").
        dropout = self.dropout if self.training else 0.0
        if mask is None:
            mask = past_mask(T, k.size(2), x.device)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout,
                                           is_causal=mask is None and T == k.size(2) and T > 1)  # fmt: skip
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # concatenate the heads
        return self.resid_dropout(self.c_proj(y))


def document_mask(segments: torch.Tensor) -> torch.Tensor:
    """(B, 1, T, T): each position attends to the positions before it of its own document (segments (B, T): the
    document of each position), so that documents packed into one row do not see each other."""
    T = segments.size(1)
    causal = torch.ones(T, T, dtype=torch.bool, device=segments.device).tril()
    return (causal & (segments[:, :, None] == segments[:, None, :]))[:, None]


def document_positions(segments: torch.Tensor) -> torch.Tensor:
    """(B, T): each position's index within its document, as if the document started the row."""
    index = torch.arange(segments.size(1), device=segments.device).expand_as(segments)
    starts = torch.ones_like(segments, dtype=torch.bool)
    starts[:, 1:] = segments[:, 1:] != segments[:, :-1]
    return index - torch.where(starts, index, 0).cummax(dim=1).values


def past_mask(queries: int, keys: int, device: torch.device) -> torch.Tensor | None:
    """Which keys each of the last `queries` positions may see, when they are not all the positions (is_causal) nor
    one new token (which sees them all): queries appended to a cache several at a time."""
    if queries in (1, keys):
        return None
    return torch.ones(queries, keys, dtype=torch.bool, device=device).tril(keys - queries)


class FeedForward(nn.Module):
    """Per-token computation after the tokens have communicated: a 4x wide MLP (with residual connections; before
    them, the lecture's first feed-forward is one layer as wide as the embedding)."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        hidden = 4 * config.n_embd if config.residual else config.n_embd
        self.c_fc = nn.Linear(config.n_embd, hidden, bias=config.bias)
        self.act = make_activation(config.activation)
        self.c_proj = nn.Linear(hidden, config.n_embd, bias=config.bias) if config.residual else nn.Identity()
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(self.act(self.c_fc(x))))


class Block(nn.Module):
    """Communication (attention) then computation (feed-forward), each a residual branch after a LayerNorm."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.ln_1 = make_norm(config, config.n_embd)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = make_norm(config, config.n_embd)
        self.mlp = FeedForward(config)

    def forward(
        self,
        x: torch.Tensor,
        cache: KVCache | None = None,
        mask: torch.Tensor | None = None,
        positions: torch.Tensor | None = None,
    ) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), cache, mask, positions)
        x = x + self.mlp(self.ln_2(x))
        return x


class PlainBlock(nn.Module):
    """The lecture's block before residual connections: attention, then the feed-forward if there is one."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.attn = CausalSelfAttention(config)
        self.mlp = FeedForward(config) if config.feed_forward else nn.Identity()

    def forward(
        self,
        x: torch.Tensor,
        cache: KVCache | None = None,
        mask: torch.Tensor | None = None,
        positions: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return self.mlp(self.attn(x, cache, mask, positions))


class GPT(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = config
        # nanoGPT's order of construction: the same seed draws the same initial weights
        modules = dict(wte=nn.Embedding(config.vocab_size, config.n_embd))  # token embedding
        if config.pos_emb == "learned":
            modules["wpe"] = nn.Embedding(config.block_size, config.n_embd)  # position embedding
        modules["drop"] = nn.Dropout(config.dropout)
        modules["h"] = nn.ModuleList(
            [(Block if config.residual else PlainBlock)(config) for _ in range(config.n_layer)]
        )
        modules["ln_f"] = make_norm(config, config.n_embd)
        self.transformer = nn.ModuleDict(modules)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_weights:
            self.transformer.wte.weight = self.lm_head.weight  # weight tying: one matrix embeds and un-embeds
        self.softcap = SoftCap(config.logit_softcap) if config.logit_softcap else nn.Identity()

        # GPT-2 initialisation: N(0, 0.02), with residual projections scaled down by sqrt(2 * n_layer)
        # so the residual stream's variance does not grow with depth (or zero: each Block starts as the identity).
        self.apply(self._init_weights)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                if config.zero_init_proj:
                    nn.init.zeros_(p)
                else:
                    nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_params(self) -> int:
        """Number of parameters, counting the tied embedding / LM head matrix once."""
        return sum(p.numel() for p in self.parameters())

    def flops_per_token(self) -> int:
        """Training FLOPs per token, forward and backward: 6 per parameter (2 forward, 4 backward) for the matmuls,
        plus 12 * n_layer * n_embd * block_size for attention's scores and weighted sums (PaLM, appendix B; nanoGPT)."""
        c = self.config
        return 6 * self.num_params() + 12 * c.n_layer * c.n_embd * c.block_size

    def forward(
        self, idx: torch.Tensor, targets: torch.Tensor | None = None, segments: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits (B, T, vocab_size) for every position; with targets, the mean cross-entropy too.

        Targets equal to -1 are ignored (padding at the end of the validation split, what the loss mask leaves out).
        segments (B, T): the document of each position, when several are packed into a row (data/conversations.py).
        """
        if segments is None:
            x = self.hidden_states(idx)
        else:
            x = self.hidden_states(idx, positions=document_positions(segments), mask=document_mask(segments))
        logits = self.logits(x)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1)
        return logits, loss

    def hidden_states(
        self,
        idx: torch.Tensor,
        caches: list[KVCache] | None = None,
        positions: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The last Block's output, normalised (B, T, n_embd). With caches (one per Block), idx holds only the
        positions after those cached. By default the tokens are at the positions after the cached ones and see
        them and each other causally; positions (B, T) and mask (B, 1, T, keys) say otherwise: documents packed
        into one row, each seeing only itself at the positions it would have alone; completions at different
        positions decoded together (generation/batch.py)."""
        B, T = idx.shape
        if positions is None:
            start = caches[0].length if caches else 0
            if start + T > self.config.block_size:
                raise ValueError(f"sequence of length {start + T} is longer than block_size={self.config.block_size}")
            positions = torch.arange(start, start + T, device=idx.device)[None]
        x = self.transformer.wte(idx)
        if "wpe" in self.transformer:
            x = x + self.transformer.wpe(positions)
        x = self.transformer.drop(x)
        for i, block in enumerate(self.transformer.h):
            x = block(x, caches[i] if caches else None, mask, positions)
        return self.transformer.ln_f(x)

    def logits(self, x: torch.Tensor, head_t: torch.Tensor | None = None) -> torch.Tensor:
        """Next-token logits from hidden states: generation asks only for the last position's, and may pass the head's
        weight transposed (n_embd, vocab_size), which a CPU multiplies a single row by faster."""
        return self.softcap(self.lm_head(x) if head_t is None else x @ head_t)
