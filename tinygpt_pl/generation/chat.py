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
from tinygpt_pl.generation.generate import Completion, Model, NextTokenLogits, Sampling


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
    """One reply of a Chat: a generate.Completion of the conversation so far that ends at <|assistant_end|>, run from
    the chat's caches. Iterate over it for the text as it is generated; afterwards text, finish_reason ("stop" at
    <|assistant_end|>, "length" after max_new_tokens) and the token counts tell the result. When it ends, the
    conversation holds the messages and the reply."""

    def __init__(self, chat: Chat, prompt_ids: list[int]) -> None:
        self.chat, self.prompt_ids = chat, prompt_ids
        self.end = chat.tokenizer.end("assistant")
        self.completion = Completion(chat.model, chat.tokenizer, chat.ids + prompt_ids, chat.max_new_tokens,
                                     chat.sampling, kv_cache=chat.kv_cache, generator=chat.generator, end_id=self.end,
                                     next_logits=chat.next_logits)  # fmt: skip

    def __iter__(self) -> Iterator[str]:
        yield from self.completion
        self.chat.ids += self.prompt_ids + self.completion.completion_ids + [self.end]

    @property
    def text(self) -> str:
        return self.completion.text

    @property
    def finish_reason(self) -> str | None:
        return self.completion.finish_reason

    @property
    def completion_tokens(self) -> int:
        return self.completion.completion_tokens

    def result(self) -> "Reply":
        """Generates the whole reply (the non-streamed form)."""
        for _ in self:
            pass
        return self
