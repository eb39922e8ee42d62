"""OpenAI's completions API on LitServe (Lightning's model server): the request, the endpoint and the inference worker
that serve.py runs. POST /v1/completions takes prompt, max_tokens, temperature, top_p, stop, seed and stream
(server-sent events, as OpenAI's API sends them), and answers with OpenAI's text_completion JSON; a bad request gets
a 4xx with a message. A chat model (fine-tuned with --data.format chat) also answers POST /v1/chat/completions:
messages instead of a prompt, OpenAI's chat.completion JSON or chat.completion.chunk stream (generation/chat.py)."""

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
from tinygpt_pl.generation.chat import Chat, Reply
from tinygpt_pl.generation.generate import Completion, Sampling
from tinygpt_pl.load import load_model


class CompletionRequest(BaseModel):
    """The fields of OpenAI's completions request that apply to one prompt and one choice (others are ignored)."""

    prompt: StrictStr
    max_tokens: StrictInt = Field(16, ge=1)
    temperature: float = Field(1.0, strict=True)  # ranges are checked by Sampling, as for sample.py
    top_p: float = Field(1.0, strict=True)
    stop: StrictStr | list[StrictStr] | None = None
    seed: StrictInt | None = None  # fixes the sampled text
    stream: StrictBool = False


class ChatMessage(BaseModel):
    role: StrictStr
    content: StrictStr


class ChatCompletionRequest(BaseModel):
    """The fields of OpenAI's chat completions request that apply to one choice (others are ignored)."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: StrictInt = Field(256, ge=1)
    temperature: float = Field(1.0, strict=True)
    top_p: float = Field(1.0, strict=True)
    seed: StrictInt | None = None
    stream: StrictBool = False


def choice(text: str, finish_reason: str | None) -> dict:
    """The one choice of a response or a stream's chunk."""
    return {"text": text, "index": 0, "logprobs": None, "finish_reason": finish_reason}


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
        self.add_endpoint("/v1/chat/completions", self.chat_completions, ["POST"])

    @property
    def stream(self) -> bool:
        return True

    def encode_response(self, output: Iterator[dict], context_kwargs: dict | None = None) -> Iterator[dict]:
        yield from output

    def submit(self, request: BaseModel) -> tuple[uuid.UUID, AsyncIterator[dict]]:
        """Queue the request for the inference worker: its id and the worker's messages."""
        uid = uuid.uuid4()
        queue, event = deque(), asyncio.Event()
        self.response_buffer[uid] = ResponseBufferItem(response_queue=queue, event=event)
        self.request_queue.put((self.response_queue_id, uid, time.monotonic(), request))
        return uid, self.messages(uid, queue, event)

    async def completions(self, request: CompletionRequest) -> Any:
        uid, messages = self.submit(request)
        first = await anext(messages)
        header = {"id": f"cmpl-{uid.hex}", "object": "text_completion", "created": int(time.time()),
                  "model": self.model_name}  # fmt: skip
        if request.stream:
            return StreamingResponse(self.events(header, first, messages), media_type="text/event-stream")
        text, last = first["text"], first
        async for message in messages:
            text, last = text + message["text"], message
        return {**header, "choices": [choice(text, last["finish_reason"])], "usage": last["usage"]}

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

    async def chat_completions(self, request: ChatCompletionRequest) -> Any:
        """OpenAI's chat completion: the assistant's message, or a stream of chunks with its pieces as deltas."""
        uid, messages = self.submit(request)
        first = await anext(messages)
        header = {"id": f"chatcmpl-{uid.hex}", "created": int(time.time()), "model": self.model_name}
        if request.stream:
            return StreamingResponse(self.chat_events(header, first, messages), media_type="text/event-stream")
        text, last = first["text"], first
        async for message in messages:
            text, last = text + message["text"], message
        reply = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": last["finish_reason"]}
        return {**header, "object": "chat.completion", "choices": [reply], "usage": last["usage"]}

    @staticmethod
    async def chat_events(header: dict, first: dict, messages: AsyncIterator[dict]) -> AsyncIterator[str]:
        """OpenAI's chat stream: the role, a chunk per text piece, finish_reason in the last one, then [DONE]."""

        def chunk(delta: dict, finish_reason: str | None = None) -> str:
            data = {**header, "object": "chat.completion.chunk",
                    "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}]}  # fmt: skip
            return f"data: {json.dumps(data)}\n\n"

        yield chunk({"role": "assistant", "content": ""})
        message = first
        while True:
            if message["text"]:
                yield chunk({"content": message["text"]})
            if "finish_reason" in message:
                yield chunk({}, message["finish_reason"])
                break
            message = await anext(messages)
        yield "data: [DONE]\n\n"


class CompletionAPI(ls.LitAPI):
    """The inference worker: the model, and one completion at a time."""

    def __init__(self, ckpt_path: str, kv_cache: bool) -> None:
        super().__init__(spec=CompletionsSpec(ckpt_path))
        self.ckpt_path, self.kv_cache = ckpt_path, kv_cache

    def setup(self, device: str) -> None:
        self.model, self.tokenizer = load_model(self.ckpt_path, device)
        self.torch_device = device

    def decode_request(self, request: CompletionRequest | ChatCompletionRequest) -> tuple[Completion | Reply, bool]:
        generator = torch.Generator(self.torch_device)
        if request.seed is None:
            generator.seed()
        else:
            generator.manual_seed(request.seed)
        if isinstance(request, ChatCompletionRequest):
            return self.decode_chat_request(request, generator), request.stream
        stop = [request.stop] if isinstance(request.stop, str) else request.stop or []
        try:
            sampling = Sampling(temperature=request.temperature, top_p=request.top_p)
            completion = Completion(self.model, self.tokenizer, request.prompt, request.max_tokens, sampling, stop,
                                    kv_cache=self.kv_cache, generator=generator)  # fmt: skip
        except UsageError as e:
            raise HTTPException(400, str(e)) from None
        return completion, request.stream

    def decode_chat_request(self, request: ChatCompletionRequest, generator: torch.Generator) -> Reply:
        """The reply to the request's conversation, from a new Chat: the same code as sample.py --chat."""
        try:
            sampling = Sampling(temperature=request.temperature, top_p=request.top_p)
            chat = Chat(self.model, self.tokenizer, sampling, request.max_tokens, self.kv_cache, generator,
                        source=self.ckpt_path)  # fmt: skip
            return chat.reply([message.model_dump() for message in request.messages])
        except UsageError as e:
            raise HTTPException(400, str(e)) from None

    def predict(self, work: tuple[Completion | Reply, bool]) -> Iterator[dict]:
        """A message per text piece for a stream; one message for the whole text otherwise (each message crosses
        from this worker's process to the server's)."""
        completion, stream = work
        text = ""
        if stream:
            for piece in completion:
                yield {"text": piece}
        else:
            text = completion.result().text
        prompt_tokens, completion_tokens = len(completion.prompt_ids), completion.completion_tokens
        usage = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                 "total_tokens": prompt_tokens + completion_tokens}  # fmt: skip
        yield {"text": text, "finish_reason": completion.finish_reason, "usage": usage}
