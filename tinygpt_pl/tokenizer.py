"""Tokenizers: text <-> token ids. The character-level one is the lecture's: its vocabulary is the set of
characters in the corpus."""

from tinygpt_pl.errors import UsageError


class CharTokenizer:
    def __init__(self, chars: str) -> None:
        if len(set(chars)) != len(chars):
            raise ValueError("the vocabulary has repeated characters")
        self.chars = chars
        self.stoi = {ch: i for i, ch in enumerate(chars)}

    @classmethod
    def from_text(cls, text: str) -> "CharTokenizer":
        return cls("".join(sorted(set(text))))

    @property
    def vocab_size(self) -> int:
        return len(self.chars)

    def encode(self, text: str) -> list[int]:
        unknown = sorted(set(text) - self.stoi.keys())
        if unknown:
            raise UsageError(
                f"characters {''.join(unknown)!r} are not in the model's vocabulary: "
                "use only characters from the training corpus"
            )
        return [self.stoi[ch] for ch in text]

    def decode(self, ids: list[int]) -> str:
        return "".join(self.chars[i] for i in ids)

    def state_dict(self) -> dict:
        """What a checkpoint stores so the tokenizer can be rebuilt without the corpus."""
        return {"name": "char", "chars": self.chars}


def tokenizer_from_state(state: dict) -> CharTokenizer:
    if state.get("name") != "char":
        raise UsageError(f"unknown tokenizer {state.get('name')!r} in checkpoint")
    return CharTokenizer(state["chars"])
