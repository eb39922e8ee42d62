"""OpenAI's completions API on LitServe (Lightning's model server): the request, the endpoint and the inference worker
that serve.py runs. POST /v1/completions takes prompt, max_tokens, temperature, top_p, stop, seed and stream
(server-sent events, as OpenAI's API sends them), and answers with OpenAI's text_completion JSON; a bad request gets
a 4xx with a message. As OpenAI's legacy completions API, it also takes token ids or several prompts (a choice each),
`logprobs` (the log-probability of each token and the N most likely, generation/logprobs.py) and `echo` (the prompt
before the completion, with its tokens' log-probabilities), which lm-eval's local-completions model scores with.
A chat model (fine-tuned with --data.format chat) also answers POST /v1/chat/completions: messages instead of a
prompt, OpenAI's chat.completion JSON or chat.completion.chunk stream (generation/chat.py)."""

import asyncio
import ctypes
import json
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import litserve as ls
import torch
from fastapi import HTTPException
from fastapi.responses import JSONResponse, StreamingResponse
from litserve.loops.continuous_batching_loop import ContinuousBatchingLoop, Output
from litserve.specs.base import LitSpec
from litserve.utils import LitAPIStatus, ResponseBufferItem
from pydantic import BaseModel, Field, StrictBool, StrictInt, StrictStr

from tinygpt_pl.errors import UsageError
from tinygpt_pl.generation.batch import Batch, Cancel, TimedOut
from tinygpt_pl.generation.chat import Chat
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


def openai_error(status: int, message: str, param: str | None = None) -> JSONResponse:
    """An error response with OpenAI's body, as its API answers a request it refuses."""
    error = {"message": message, "type": "invalid_request_error", "param": param, "code": None}
    return JSONResponse({"error": error}, status_code=status)


def choice(text: str, finish_reason: str | None, index: int = 0, logprobs: dict | None = None) -> dict:
    """A choice of a response or a stream's chunk."""
    return {"text": text, "index": index, "logprobs": logprobs, "finish_reason": finish_reason}


async def cancel_if_left(events: AsyncIterator[str], cancel: Callable[[], None]) -> AsyncIterator[str]:
    """A stream's events; a client that goes before the last one (the server closes the stream) cancels the
    completion, so that its slot is freed at once."""
    sent = False
    try:
        async for event in events:
            yield event
        sent = True
    finally:
        if not sent:
            cancel()


class CompletionsSpec(LitSpec):
    """OpenAI's POST /v1/completions on LitServe. The inference worker streams each completion to the API server as
    JSON messages (text pieces, then finish_reason and usage); the endpoint sends them on as server-sent events, or
    joins them into one response. It waits for the first message before answering, so that a request the worker
    refuses gets its 4xx, also when it asked for a stream."""

    def __init__(self, model_name: str, max_tokens_limit: int) -> None:
        super().__init__()
        self.api_path = "/v1/completions"
        self.model_name, self.max_tokens_limit = model_name, max_tokens_limit
        self.add_endpoint(self.api_path, self.completions, ["POST"])
        self.add_endpoint("/v1/chat/completions", self.chat_completions, ["POST"])

    @property
    def stream(self) -> bool:
        return True

    def encode_response(self, output: dict, context_kwargs: dict | None = None) -> dict:
        return output

    def beyond_limit(self, max_tokens: int) -> JSONResponse | None:
        """OpenAI's 400 for more tokens than the server allows: answered at once, even while the worker is busy."""
        if max_tokens <= self.max_tokens_limit:
            return None
        message = (f"max_tokens is {max_tokens}, more than this server allows ({self.max_tokens_limit}, "
                   f"serve.py --max_tokens_limit): ask for {self.max_tokens_limit} tokens or fewer")  # fmt: skip
        return openai_error(400, message, "max_tokens")

    async def completions(self, request: CompletionRequest) -> Any:
        if (refused := self.beyond_limit(request.max_tokens)) is not None:
            return refused
        prompts = request.prompts()
        if request.stream and (len(prompts) > 1 or request.logprobs is not None or request.echo):
            return openai_error(400, "stream takes one prompt, without logprobs or echo: drop stream", "stream")
        # one request to the worker per prompt: their completions are generated together
        submitted = [self.submit(request.model_copy(update={"prompt": prompt})) for prompt in prompts]
        uid, messages = submitted[0]
        first = await anext(messages)
        header = {"id": f"cmpl-{uid.hex}", "object": "text_completion", "created": int(time.time()),
                  "model": self.model_name}  # fmt: skip
        if request.stream:
            events = cancel_if_left(self.events(header, first, messages), lambda: self.cancel(uid))
            return StreamingResponse(events, media_type="text/event-stream")
        choices, usage = [], {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}
        for index, (_, messages) in enumerate(submitted):
            received = ([first] if index == 0 else []) + [message async for message in messages]
            last = received[-1]  # a plain completion's one message
            choices.append(choice(last["text"], last["finish_reason"], index, last.get("logprobs")))
            usage = {key: usage[key] + last["usage"][key] for key in usage}
        return {**header, "choices": choices, "usage": usage}

    def submit(self, request: BaseModel) -> tuple[uuid.UUID, AsyncIterator[dict]]:
        """Queue the request for the inference worker: its id and the worker's messages."""
        uid = uuid.uuid4()
        queue, event = deque(), asyncio.Event()
        self.response_buffer[uid] = ResponseBufferItem(response_queue=queue, event=event)
        self.request_queue.put((self.response_queue_id, uid, time.monotonic(), request))
        return uid, self.messages(uid, queue, event)

    async def messages(self, uid: uuid.UUID, queue: deque, event: asyncio.Event) -> AsyncIterator[dict]:
        try:
            async for data, status in self.data_streamer(queue, event, send_status=True):
                if status == LitAPIStatus.ERROR:
                    if isinstance(data, HTTPException):
                        raise data
                    raise HTTPException(500, "the model failed: see the server's log")
                message = json.loads(data)
                if "status" in message:  # the worker refused the request, or it timed out
                    raise HTTPException(message["status"], message["detail"])
                yield message
        finally:
            self.response_buffer.pop(uid, None)

    def cancel(self, uid: uuid.UUID) -> None:
        """The client of request uid went away: the worker frees its slot at once."""
        self.request_queue.put((self.response_queue_id, uuid.uuid4(), time.monotonic(), Cancel(uid)))

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
        if (refused := self.beyond_limit(request.max_tokens)) is not None:
            return refused
        uid, messages = self.submit(request)
        first = await anext(messages)
        header = {"id": f"chatcmpl-{uid.hex}", "created": int(time.time()), "model": self.model_name}
        if request.stream:
            events = cancel_if_left(self.chat_events(header, first, messages), lambda: self.cancel(uid))
            return StreamingResponse(events, media_type="text/event-stream")
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


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)


def keep_freed_memory() -> None:
    """glibc hands blocks over its mmap threshold (128 KiB at first) straight from and back to the system, so each
    decode step's logits (3 MiB for 16 completions over GPT-2's vocabulary) and their copies came as fresh pages. In a
    plain process glibc soon raises that threshold; in the worker it did not: 230,000 page faults for 16 completions
    together, which took 1.9 instead of 1.6 s (benchmarks/serving.py). Blocks up to 64 MiB now come from the heap, and
    up to 256 MiB freed stays there. Elsewhere than glibc, nothing changes."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    libc.mallopt(M_MMAP_THRESHOLD, 64 << 20)
    libc.mallopt(M_TRIM_THRESHOLD, 256 << 20)


class WaitingLoop(ContinuousBatchingLoop):
    """LitServe's continuous batching loop, waiting for work instead of spinning: LitServe (0.2.19) calls run() again
    at once while no request is active, which kept a core at 100% on an idle server, and slowed generation on a small
    machine. Requests arrive through add_request, in the event loop's thread: it wakes run()."""

    def __init__(self) -> None:
        super().__init__()
        self.work = asyncio.Event()

    def add_request(self, uid: str, request: Any, lit_api: ls.LitAPI, *args: Any) -> None:
        super().add_request(uid, request, lit_api, *args)
        self.work.set()

    async def run(self, lit_api: ls.LitAPI, *args: Any) -> None:
        if not lit_api.has_active_requests():
            self.work.clear()
            await self.work.wait()
        await super().run(lit_api, *args)


class CompletionAPI(ls.LitAPI):
    """The inference worker: the model, and the completions under way, generated together (generation/batch.py)."""

    def __init__(
        self, ckpt_path: str, kv_cache: bool, max_tokens_limit: int, max_batch_size: int, request_timeout: float | None
    ) -> None:
        super().__init__(spec=CompletionsSpec(ckpt_path, max_tokens_limit), loop=WaitingLoop())
        self.ckpt_path, self.kv_cache = ckpt_path, kv_cache
        self.max_size, self.time_limit = max_batch_size, request_timeout  # (LitServe uses request_timeout)

    def setup(self, device: str) -> None:
        keep_freed_memory()
        # Every torch operation of the worker runs in this one thread. LitServe calls step() from a pool of threads;
        # once two threads have run OpenMP's parallel regions, libgomp (torch's CPU threads) stops spin-waiting when
        # there are fewer cores than its threads, and each small operation takes 4x longer (150 against 35 us).
        self.torch_thread = ThreadPoolExecutor(1, thread_name_prefix="torch")
        self.torch_thread.submit(self.load, device).result()
        self.requests: dict[str, CompletionRequest | ChatCompletionRequest] = {}  # those under way, for their options

    def load(self, device: str) -> None:
        self.model, self.tokenizer = load_model(self.ckpt_path, device)
        self.torch_device = device
        self.batch = Batch(self.model, self.max_size, self.time_limit, self.kv_cache)

    def decode_request(self, request: CompletionRequest | ChatCompletionRequest) -> Completion:
        """The completion of the request's one prompt (the endpoint sends each prompt on its own), or a chat's reply
        (the code of sample.py --chat)."""
        generator = torch.Generator(self.torch_device)
        if request.seed is None:
            generator.seed()
        else:
            generator.manual_seed(request.seed)
        try:
            sampling = Sampling(temperature=request.temperature, top_p=request.top_p)
            if isinstance(request, ChatCompletionRequest):
                chat = Chat(self.model, self.tokenizer, sampling, request.max_tokens, self.kv_cache, generator,
                            source=self.ckpt_path)  # fmt: skip
                return chat.reply([message.model_dump() for message in request.messages]).completion
            stop = [request.stop] if isinstance(request.stop, str) else request.stop or []
            return Completion(self.model, self.tokenizer, request.prompt, request.max_tokens, sampling, stop,
                              kv_cache=self.kv_cache, generator=generator)  # fmt: skip
        except UsageError as e:
            raise HTTPException(400, str(e)) from None

    # LitServe's continuous batching loop: requests come in through add_request, and step() runs while any is active
    def add_request(self, uid: str, request: CompletionRequest | ChatCompletionRequest | Cancel) -> None:
        if isinstance(request, Cancel):
            self.batch.add(uid, request)
            return
        try:
            completion = self.decode_request(request)
        except HTTPException as e:
            self.batch.add(uid, e)
            return
        self.requests[uid] = request
        self.batch.add(uid, (completion, request.stream))

    def step(self, prev_outputs: list[Output] | None) -> list[Output]:
        """Decode steps (a token for every completion under way) until one gives output: a message per text piece of
        a stream, each completion's last message (a plain one's whole text) as it ends, a refused request's error."""
        return self.torch_thread.submit(self.steps).result()

    def steps(self) -> list[Output]:
        outputs = []
        while not outputs and self.batch.active():  # (LitServe's loop pauses 10 ms after a step with no output)
            outputs = self.outputs(self.batch.step())
        return outputs

    def outputs(self, messages: list[tuple[str, dict | Exception | None, bool]]) -> list[Output]:
        outputs = []
        for uid, message, ended in messages:
            if isinstance(message, Exception):  # a refused request (400), one that took too long (504)
                status = 504 if isinstance(message, TimedOut) else message.status_code
                message = {
                    "status": status,
                    "detail": str(message) if isinstance(message, TimedOut) else message.detail,
                }
            request = self.requests.pop(uid, None) if ended else self.requests.get(uid)
            if isinstance(message, dict) and "completion_ids" in message:
                message = self.whole_choice(message, request)
            if message is not None:
                outputs.append(Output(uid, message, LitAPIStatus.OK))
            if ended:
                outputs.append(Output(uid, "", LitAPIStatus.FINISH_STREAMING))
        return outputs

    def has_capacity(self) -> bool:
        return True  # the batch keeps its own queue: a Cancel must reach it at once, also when every slot is taken

    def has_active_requests(self) -> bool:
        return self.batch.active()

    def whole_choice(self, message: dict, request: CompletionRequest | ChatCompletionRequest) -> dict:
        """A plain completion's message: with echo the prompt's text before the completion's; with logprobs those of
        the tokens returned (the generated ones up to a stop string)."""
        prompt, ids, text = message.pop("prompt_ids"), message.pop("completion_ids"), message["text"]
        if not isinstance(request, CompletionRequest) or (request.logprobs is None and not request.echo):
            return message
        kept = len(ids)  # the generated tokens that begin within the text returned
        prompt_chars = len(self.tokenizer.decode(prompt))
        while kept and len(self.tokenizer.decode(prompt + ids[: kept - 1])) - prompt_chars >= len(text):
            kept -= 1
        if request.logprobs is not None:
            start = 0 if request.echo else len(prompt)
            message["logprobs"] = openai_logprobs(self.model, self.tokenizer, prompt + ids[:kept], start,
                                                  request.logprobs)  # fmt: skip
        if request.echo:
            message["text"] = self.tokenizer.decode(prompt) + text
        return message
