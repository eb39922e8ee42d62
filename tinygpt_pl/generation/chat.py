"""Talking to a chat model (one fine-tuned with --data.format chat): the code behind sample.py --chat and serve.py's
/v1/chat/completions.

A Chat holds a conversation as token ids (data/chat.py's template) and the model's key/value caches of them: each reply
runs only the new messages and <|assistant_start|> through the model, then generates until <|assistant_end|>, which
joins the conversation with the reply, so that earlier turns are never run again. Past the model's context the model
sees the conversation's last block_size tokens (generate.py's window).
"""

from collections.abc import Iterator, Sequence

import torch

from tinygpt_pl.data.chat import BadConversation, ChatTokenizer
from tinygpt_pl.data.tokenizer import Tokenizer
from tinygpt_pl.errors import UsageError
from tinygpt_pl.generation.generate import REPLACEMENT, Model, NextTokenLogits, Sampling, stream_ids


def not_a_chat_model(source: str) -> str:
    return (
        f"{source} is not a chat model (its tokenizer has no chat template): fine-tune it on conversations with "
        f"train.py --data.format chat --model.init_from {source}"
    )


class Chat:
    """A conversation with a chat model, its caches kept between replies."""

    def __init__(
        self,
        model: Model,
        tokenizer: Tokenizer,
        sampling: Sampling,
        max_new_tokens: int = 256,
        kv_cache: bool = True,
        generator: torch.Generator | None = None,
        source: str = "the model",
    ) -> None:
        if not isinstance(tokenizer, ChatTokenizer):
            raise UsageError(not_a_chat_model(source))
        if max_new_tokens < 1:
            raise UsageError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        self.model, self.tokenizer, self.sampling = model, tokenizer, sampling
        self.max_new_tokens, self.kv_cache, self.generator = max_new_tokens, kv_cache, generator
        self.clear()

    def clear(self) -> None:
        """Start over: no messages, empty caches."""
        self.ids: list[int] = []
        self.next_logits = NextTokenLogits(self.model, self.kv_cache)

    def reply(self, messages: Sequence[dict]) -> "Reply":
        """The assistant's reply to the conversation so far followed by messages (iterate over it for the text)."""
        try:
            prompt = self.tokenizer.prompt(messages)
        except BadConversation as e:
            raise UsageError(f"not a conversation ({e}): send messages of {{role, content}} with role user, "
                             "system or assistant") from None  # fmt: skip
        return Reply(self, prompt)


class Reply:
    """One reply of a Chat, in the shape of generate.Completion: iterate over it for the text as it is generated;
    afterwards text, finish_reason ("stop" at <|assistant_end|>, "length" after max_new_tokens) and the token counts
    tell the result. When it ends, the conversation holds the messages and the reply."""

    def __init__(self, chat: Chat, prompt_ids: list[int]) -> None:
        self.chat, self.prompt_ids = chat, prompt_ids
        self.text = ""
        self.finish_reason: str | None = None
        self.completion_tokens = 0

    def __iter__(self) -> Iterator[str]:
        chat, tokenizer = self.chat, self.chat.tokenizer
        end = tokenizer.end("assistant")
        device = next(chat.model.parameters()).device
        idx = torch.tensor([chat.ids + self.prompt_ids], dtype=torch.long, device=device)
        ids: list[int] = []
        tokens = stream_ids(chat.model, idx, chat.max_new_tokens, chat.sampling, vocab_limit=tokenizer.vocab_size,
                            eot_id=end, generator=chat.generator, next_logits=chat.next_logits)  # fmt: skip
        for token in tokens:
            ids.append(token.item())
            yield from self._emit(tokenizer.decode(ids).rstrip(REPLACEMENT))
        yield from self._emit(tokenizer.decode(ids))
        self.finish_reason = "length" if len(ids) == chat.max_new_tokens else "stop"
        self.completion_tokens = len(ids)
        chat.ids += self.prompt_ids + ids + [end]

    def _emit(self, text: str) -> Iterator[str]:
        if len(text) > len(self.text):
            piece = text[len(self.text) :]
            self.text = text
            yield piece

    def result(self) -> "Reply":
        """Generates the whole reply (the non-streamed form)."""
        for _ in self:
            pass
        return self
