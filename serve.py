"""Serve a model over HTTP with OpenAI's completions API, on LitServe (Lightning's model server):

    python serve.py --ckpt_path out/shakespeare_char/checkpoints/last.ckpt --port 8000
    curl http://127.0.0.1:8000/v1/completions -H "Content-Type: application/json" \\
        -d '{"prompt": "ROMEO:", "max_tokens": 100, "temperature": 0.8}'

POST /v1/completions takes prompt, max_tokens, temperature, top_p, stop, seed and stream (server-sent events, as
OpenAI's API sends them), and answers with OpenAI's text_completion JSON. A bad request gets a 4xx with a message.
"""

import litserve as ls
from jsonargparse import auto_cli

from tinygpt_pl.errors import exit_on_bad_input
from tinygpt_pl.generation.server import CompletionAPI
from tinygpt_pl.load import load_model


def serve(*, ckpt_path: str, port: int = 8000, host: str = "127.0.0.1", accelerator: str = "auto",
          kv_cache: bool = True) -> None:  # fmt: skip
    """Answer OpenAI-style completion requests for a model at http://HOST:PORT/v1/completions.

    Args:
        ckpt_path: a .ckpt written by train.py, a Hugging Face GPT-2 folder, or a hub name (gpt2, gpt2-medium, ...).
        port: the TCP port to listen on.
        host: the address to listen on (0.0.0.0: every interface).
        accelerator: where the model runs: auto (a GPU if there is one), cpu or cuda.
        kv_cache: generate with the key/value cache (false: the plain path, for comparison).
    """
    load_model(ckpt_path)  # a bad --ckpt_path ends here in one line, not in the server's worker
    server = ls.LitServer(CompletionAPI(ckpt_path, kv_cache), accelerator=accelerator, devices=1, timeout=False)
    print(f"serving {ckpt_path} at http://{host}:{port}/v1/completions (GET /health answers ok once it is ready)",
          flush=True)  # fmt: skip
    server.run(host=host, port=port, generate_client_file=False)


if __name__ == "__main__":
    exit_on_bad_input(auto_cli)(serve, exit_on_error=False)
