"""The chat template: conversations as token ids, in one place, carried by the tokenizer into every checkpoint.

A conversation is a list of messages {"role": system | user | assistant, "content": text}, Hugging Face's chat format.
Each message is its content between its role's two special tokens, messages end to end, nothing else:

    <|user_start|>Hi<|user_end|><|assistant_start|>Hello!<|assistant_end|>

The six special tokens take the ids after the tokenizer's own (GPT-2's BPE: 50257..50262, inside the padded
vocabulary's unused rows), so no text can produce them: text that spells one is ordinary text. Training computes the
loss only on what the assistant says and its end token (loss_mask); a reply is generated after the prompt of the
conversation so far and <|assistant_start|>, and ends at <|assistant_end|>.
"""

from collections.abc import Sequence

import numpy as np

from tinygpt_pl.data.tokenizer import Tokenizer
from tinygpt_pl.errors import UsageError

ROLES = ("system", "user", "assistant")
SPECIAL_TOKENS = tuple(f"<|{role}_{edge}|>" for role in ROLES for edge in ("start", "end"))
TEMPLATE_KEY = "chat_template"  # in a tokenizer's state_dict: the special tokens, in id order
# the same rendering for transformers' apply_chat_template (hf/tokenizer.py); add_generation_prompt opens a reply
JINJA_TEMPLATE = (
    "{% for message in messages %}{{ '<|' + message['role'] + '_start|>' + message['content'] + '<|' + "
    "message['role'] + '_end|>' }}{% endfor %}{% if add_generation_prompt %}{{ '<|assistant_start|>' }}{% endif %}"
)


class BadConversation(ValueError):
    """A row that is not a conversation to train on; the message says why, in a few words."""


class ChatTokenizer:
    """A tokenizer (the base) with the chat template's special tokens after its ids. It encodes text as the base does
    (never to a special token) and decodes special tokens to their spelling."""

    def __init__(self, base: Tokenizer) -> None:
        self.base = base.base if isinstance(base, ChatTokenizer) else base
        self.name = self.base.name
        self.special = {token: self.base.vocab_size + i for i, token in enumerate(SPECIAL_TOKENS)}
        self.spelling = {i: token for token, i in self.special.items()}

    @property
    def vocab_size(self) -> int:
        return self.base.vocab_size + len(SPECIAL_TOKENS)

    @property
    def eot_id(self) -> int | None:
        return self.base.eot_id

    def start(self, role: str) -> int:
        return self.special[f"<|{role}_start|>"]

    def end(self, role: str) -> int:
        return self.special[f"<|{role}_end|>"]

    def encode(self, text: str) -> list[int]:
        return self.base.encode(text)

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        return self.base.encode_batch(texts)

    def decode(self, ids: list[int]) -> str:
        """The text of ids, special tokens spelled out."""
        text, run = [], []
        for i in ids:
            if i in self.spelling:
                text += [self.base.decode(run), self.spelling[i]]
                run = []
            else:
                run.append(i)
        return "".join(text) + self.base.decode(run)

    def state_dict(self) -> dict:
        return {**self.base.state_dict(), TEMPLATE_KEY: list(SPECIAL_TOKENS)}

    def byte_lengths(self) -> np.ndarray:
        return np.concatenate([self.base.byte_lengths(), np.zeros(len(SPECIAL_TOKENS), np.int64)])

    def message(self, message: object) -> tuple[list[int], list[bool]]:
        """A message's ids and their loss mask (the assistant's content and end token)."""
        if not isinstance(message, dict) or not isinstance(message.get("content"), str):
            raise BadConversation("a message without text content")
        role = message.get("role")
        if role not in ROLES:
            raise BadConversation(f"unknown role {role!r}")
        try:
            content = self.encode(message["content"])
        except UsageError as e:  # the char tokenizer's characters outside its vocabulary
            raise BadConversation(str(e).split(":")[0]) from None
        ids = [self.start(role), *content, self.end(role)]
        trained = role == "assistant"
        return ids, [False] + [trained] * (len(ids) - 1)

    def render(self, messages: object, max_tokens: int | None = None) -> tuple[list[int], list[bool], bool]:
        """(ids, loss mask, truncated) of a conversation; one longer than max_tokens keeps its messages up to the last
        assistant message that fits. Raises BadConversation for what is not a conversation with an assistant turn."""
        if not isinstance(messages, list) or not messages:
            raise BadConversation("no messages list")
        ids: list[int] = []
        mask: list[bool] = []
        kept = 0  # tokens up to the end of the last assistant message that fits
        truncated = False
        for message in messages:
            message_ids, message_mask = self.message(message)
            if max_tokens is not None and len(ids) + len(message_ids) > max_tokens:
                truncated = True
            if not truncated:
                ids += message_ids
                mask += message_mask
                if message["role"] == "assistant":
                    kept = len(ids)
        if not any(message.get("role") == "assistant" for message in messages):
            raise BadConversation("no assistant message")
        if kept == 0:
            raise BadConversation("no assistant message within block_size")
        return ids[:kept], mask[:kept], truncated

    def prompt(self, messages: Sequence[dict]) -> list[int]:
        """The ids a reply is generated after: the conversation so far and <|assistant_start|>."""
        ids = []
        for message in messages:
            ids += self.message(message)[0]
        return ids + [self.start("assistant")]


def check_template(special_tokens: list[str]) -> None:
    """Refuses a checkpoint whose chat template is not this version's."""
    if list(special_tokens) != list(SPECIAL_TOKENS):
        raise UsageError(
            f"the checkpoint's chat template has the special tokens {', '.join(special_tokens)}, this version of "
            f"tinygpt_pl {', '.join(SPECIAL_TOKENS)}: use the version that trained it"
        )
