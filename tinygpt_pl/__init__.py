"""tinygpt_pl: train GPT language models the way the "Let's build GPT" lecture builds them, with Lightning."""

from tinygpt_pl.errors import UsageError
from tinygpt_pl.model import GPT, GPTConfig

__all__ = ["GPT", "GPTConfig", "UsageError"]
