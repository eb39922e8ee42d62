"""OpenAI's completions API on LitServe (Lightning's model server): the request, the endpoint and the inference worker
that serve.py runs. POST /v1/completions takes prompt, max_tokens, temperature, top_p, stop, seed and stream
(server-sent events, as OpenAI's API sends them), and answers with OpenAI's text_completion JSON; a bad request gets
a 4xx with a message. As OpenAI's legacy completions API, it also takes token ids or several prompts (a choice each),
`logprobs` (the log-probability of each token and the N most likely, generation/logprobs.py) and `echo` (the prompt
before the completion, with its tokens' log-probabilities), which lm-eval's local-completions model scores with."""

import asyncio
import json
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Iterator
from typing import Any

import litserve as ls
import torch
from fastapi import HTTPException
from fastapi.responses import StreamingResponse
from litserve.specs.base import LitSpec
from litserve.utils import LitAPIStatus, ResponseBufferItem
from pydantic import BaseModel, Field, StrictBool, StrictInt, StrictStr

from tinygpt_pl.errors import UsageError
from tinygpt_pl.generation.generate import Completion, Sampling
from tinygpt_pl.generation.logprobs import openai_logprobs
from tinygpt_pl.load import load_model


class CompletionRequest(BaseModel):
    """The fields of OpenAI's completions request that apply to one choice per prompt (others are ignored)."""

    prompt: StrictStr | list[StrictInt] | list[StrictStr] | list[list[StrictInt]]
    max_tokens: StrictInt = Field(16, ge=1)
    temperature: float = Field(1.0, strict=True)  # ranges are checked by Sampling, as for sample.py
    top_p: float = Field(1.0, strict=True)
    stop: StrictStr | list[StrictStr] | None = None
    seed: StrictInt | None = None  # fixes the sampled text
    stream: StrictBool = False
    logprobs: StrictInt | None = Field(None, ge=0, le=5)  # the log-probabilities of the tokens and of the N most likely
    echo: StrictBool = False  # the prompt, and its tokens' log-probabilities, before the completion

    def prompts(self) -> list[str | list[int]]:
        """One prompt (text or token ids) per choice."""
        if isinstance(self.prompt, str) or (self.prompt and isinstance(self.prompt[0], int)):
            return [self.prompt]
        return list(self.prompt)


def choice(text: str, finish_reason: str | None, index: int = 0, logprobs: dict | None = None) -> dict:
    """A choice of a response or a stream's chunk."""
    return {"text": text, "index": index, "logprobs": logprobs, "finish_reason": finish_reason}


class CompletionsSpec(LitSpec):
    """OpenAI's POST /v1/completions on LitServe. The inference worker streams each completion to the API server as
    JSON messages (text pieces, then finish_reason and usage); the endpoint sends them on as server-sent events, or
    joins them into one response. It waits for the first message before answering, so that a request the worker
    refuses gets its 4xx, also when it asked for a stream."""

    def __init__(self, model_name: str) -> None:
        super().__init__()
        self.api_path = "/v1/completions"
        self.model_name = model_name
        self.add_endpoint(self.api_path, self.completions, ["POST"])

    @property
    def stream(self) -> bool:
        return True

    def encode_response(self, output: Iterator[dict], context_kwargs: dict | None = None) -> Iterator[dict]:
        yield from output

    async def completions(self, request: CompletionRequest) -> Any:
        uid = uuid.uuid4()
        queue, event = deque(), asyncio.Event()
        self.response_buffer[uid] = ResponseBufferItem(response_queue=queue, event=event)
        self.request_queue.put((self.response_queue_id, uid, time.monotonic(), request))
        messages = self.messages(uid, queue, event)
        first = await anext(messages)
        header = {"id": f"cmpl-{uid.hex}", "object": "text_completion", "created": int(time.time()),
                  "model": self.model_name}  # fmt: skip
        if request.stream:
            return StreamingResponse(self.events(header, first, messages), media_type="text/event-stream")
        choices, usage = [first["choice"]], first["usage"]
        async for message in messages:
            choices.append(message["choice"])
            usage = {key: usage[key] + message["usage"][key] for key in usage}
        return {**header, "choices": choices, "usage": usage}

    async def messages(self, uid: uuid.UUID, queue: deque, event: asyncio.Event) -> AsyncIterator[dict]:
        try:
            async for data, status in self.data_streamer(queue, event, send_status=True):
                if status == LitAPIStatus.ERROR:
                    if isinstance(data, HTTPException):
                        raise data
                    raise HTTPException(500, "the model failed: see the server's log")
                yield json.loads(data)
        finally:
            self.response_buffer.pop(uid, None)

    @staticmethod
    async def events(header: dict, first: dict, messages: AsyncIterator[dict]) -> AsyncIterator[str]:
        """OpenAI's stream: a chunk per text piece, finish_reason in the last one, then [DONE]."""

        def chunk(message: dict) -> str:
            data = {**header, "choices": [choice(message["text"], message.get("finish_reason"))]}
            return f"data: {json.dumps(data)}\n\n"

        yield chunk(first)
        async for message in messages:
            yield chunk(message)
        yield "data: [DONE]\n\n"


class CompletionAPI(ls.LitAPI):
    """The inference worker: the model, and one completion at a time."""

    def __init__(self, ckpt_path: str, kv_cache: bool) -> None:
        super().__init__(spec=CompletionsSpec(ckpt_path))
        self.ckpt_path, self.kv_cache = ckpt_path, kv_cache

    def setup(self, device: str) -> None:
        self.model, self.tokenizer = load_model(self.ckpt_path, device)
        self.torch_device = device

    def decode_request(self, request: CompletionRequest) -> tuple[list[Completion], CompletionRequest]:
        generator = torch.Generator(self.torch_device)
        if request.seed is None:
            generator.seed()
        else:
            generator.manual_seed(request.seed)
        stop = [request.stop] if isinstance(request.stop, str) else request.stop or []
        prompts = request.prompts()
        if request.stream and (len(prompts) > 1 or request.logprobs is not None or request.echo):
            raise HTTPException(400, "stream takes one prompt, without logprobs or echo: drop stream")
        try:
            sampling = Sampling(temperature=request.temperature, top_p=request.top_p)
            completions = [Completion(self.model, self.tokenizer, prompt, request.max_tokens, sampling, stop,
                                      kv_cache=self.kv_cache, generator=generator) for prompt in prompts]  # fmt: skip
        except UsageError as e:
            raise HTTPException(400, str(e)) from None
        return completions, request

    def predict(self, work: tuple[list[Completion], CompletionRequest]) -> Iterator[dict]:
        """A message per text piece for a stream, then one with the finish; one message per choice otherwise (each
        message crosses from this worker's process to the server's)."""
        completions, request = work
        for index, completion in enumerate(completions):
            if request.stream:
                for piece in completion:
                    yield {"text": piece}
            else:
                completion.result()
            prompt_tokens, completion_tokens = len(completion.prompt_ids), completion.completion_tokens
            usage = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                     "total_tokens": prompt_tokens + completion_tokens}  # fmt: skip
            if request.stream:
                yield {"text": "", "finish_reason": completion.finish_reason, "usage": usage}
                return
            yield {"choice": self.choice(completion, index, request), "usage": usage}

    def choice(self, completion: Completion, index: int, request: CompletionRequest) -> dict:
        """A whole choice: with echo the prompt's text before the completion's; with logprobs those of the tokens
        returned (the generated ones up to a stop string)."""
        prompt, ids = completion.prompt_ids, completion.completion_ids
        text = completion.text
        kept = len(ids)  # the generated tokens that begin within the text returned
        while kept and len(self.tokenizer.decode(prompt + ids[: kept - 1])) - len(self.tokenizer.decode(prompt)) >= len(
            text
        ):
            kept -= 1
        logprobs = None
        if request.logprobs is not None:
            start = 0 if request.echo else len(prompt)
            logprobs = openai_logprobs(self.model, self.tokenizer, prompt + ids[:kept], start, request.logprobs)
        if request.echo:
            text = self.tokenizer.decode(prompt) + text
        return choice(text, completion.finish_reason, index, logprobs)
