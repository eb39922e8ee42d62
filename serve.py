"""Serve a model over HTTP with OpenAI's completions API, on LitServe (Lightning's model server):

    python serve.py --ckpt_path out/shakespeare_char/checkpoints/last.ckpt --port 8000
    curl http://127.0.0.1:8000/v1/completions -H "Content-Type: application/json" \\
        -d '{"prompt": "ROMEO:", "max_tokens": 100, "temperature": 0.8}'

POST /v1/completions takes prompt, max_tokens, temperature, top_p, stop, seed and stream (server-sent events, as
OpenAI's API sends them), and answers with OpenAI's text_completion JSON. A bad request gets a 4xx with a message.
"""

import multiprocessing
import os
import signal

import litserve as ls
from jsonargparse import auto_cli

from tinygpt_pl.errors import UsageError, exit_on_bad_input
from tinygpt_pl.generation.server import CompletionAPI
from tinygpt_pl.load import load_model


def serve(*, ckpt_path: str, port: int = 8000, host: str = "127.0.0.1", accelerator: str = "auto",
          kv_cache: bool = True, max_tokens_limit: int | None = None, request_timeout: float | None = None,
          max_batch_size: int = 16) -> None:  # fmt: skip
    """Answer OpenAI-style completion requests for a model at http://HOST:PORT/v1/completions.

    Args:
        ckpt_path: a .ckpt written by train.py, a Hugging Face GPT-2 folder, or a hub name (gpt2, gpt2-medium, ...).
        port: the TCP port to listen on.
        host: the address to listen on (0.0.0.0: every interface).
        accelerator: where the model runs: auto (a GPU if there is one), cpu or cuda.
        kv_cache: generate with the key/value cache (false: the plain path, for comparison).
        max_tokens_limit: the most tokens a request may ask for (max_tokens); more gets OpenAI's 400 error at once.
            Default: the model's block_size or 4096, whichever is larger.
        request_timeout: seconds a completion may take (none: no limit); past it a stream ends with finish_reason
            "length", and a plain request gets a 504. Either way the worker goes on with the others.
        max_batch_size: completions generated together; more requests wait for a slot.
    """
    model, _ = load_model(ckpt_path)  # a bad --ckpt_path ends here in one line, not in the server's worker
    if max_tokens_limit is None:
        max_tokens_limit = max(model.config.block_size, 4096)
    if max_tokens_limit < 1:
        raise UsageError(f"--max_tokens_limit {max_tokens_limit}: pass a number of tokens >= 1")
    if request_timeout is not None and not request_timeout > 0:
        raise UsageError(f"--request_timeout {request_timeout}: pass a number of seconds > 0 (or leave it out)")
    if max_batch_size < 1:
        raise UsageError(f"--max_batch_size {max_batch_size}: pass a number of completions >= 1")
    api = CompletionAPI(ckpt_path, kv_cache, max_tokens_limit, max_batch_size, request_timeout)
    server = ls.LitServer(api, accelerator=accelerator, devices=1, timeout=False)
    print(f"serving {ckpt_path} at http://{host}:{port}/v1/completions (GET /health answers ok once it is ready)",
          flush=True)  # fmt: skip
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, stop_everything)
    server.run(host=host, port=port, generate_client_file=False)


def stop_everything(signum: int, frame: object) -> None:
    """SIGTERM or Ctrl-C: end the server and inference processes at once (a request under way gets a closed
    connection), then this one. LitServe's own shutdown, on Ctrl-C only, waits for busy workers and open streams."""
    for child in multiprocessing.active_children():
        child.kill()
    os.write(2, f"\nserve.py: stopped by {signal.Signals(signum).name}\n".encode())
    os._exit(128 + signum)


if __name__ == "__main__":
    exit_on_bad_input(auto_cli)(serve, exit_on_error=False)
