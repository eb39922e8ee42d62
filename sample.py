"""Sample text from a model: python sample.py --ckpt_path out/shakespeare_char/checkpoints/last.ckpt

--ckpt_path takes a train.py checkpoint, a Hugging Face GPT-2 folder or a hub name (gpt2, gpt2-medium, ...).
With --chat, talk to a chat model (fine-tuned with --data.format chat) instead: type a message, read the reply as it
is generated; /clear starts a new conversation, Ctrl-D leaves.
"""

import sys

import torch
from jsonargparse import auto_cli

from tinygpt_pl.errors import UsageError, exit_on_bad_input
from tinygpt_pl.generation.chat import Chat
from tinygpt_pl.generation.generate import Completion, Sampling
from tinygpt_pl.load import load_model


def sample(
    *,
    ckpt_path: str,
    prompt: str = "\n",
    max_new_tokens: int = 500,
    temperature: float = 0.8,
    top_k: int | None = 200,
    top_p: float = 1.0,
    num_samples: int = 1,
    seed: int = 1337,
    kv_cache: bool = True,
    stream: bool = False,
    chat: bool = False,
    system: str | None = None,
    device: str = "cuda" if torch.cuda.is_available() else "cpu",
) -> None:
    """Print num_samples continuations of prompt, each up to max_new_tokens long (BPE models stop at the
    end-of-text token).

    Past the model's context (block_size tokens), the model sees the last block_size tokens, as in training; the
    key/value cache then cannot be reused, so each further token costs a pass over the whole context (the output is
    the same as with --kv_cache false).

    Args:
        ckpt_path: a .ckpt written by train.py, a Hugging Face GPT-2 folder, or a hub name (gpt2, gpt2-medium, ...).
        prompt: the text to continue (with the char tokenizer, only characters the model was trained on).
        max_new_tokens: the most tokens to generate per sample.
        temperature: < 1 sharpens the distribution, > 1 flattens it, 0 always picks the most likely token.
        top_k: sample only among the k most likely tokens (None: all).
        top_p: sample only among the most likely tokens that together hold top_p of the probability (nucleus
            sampling; 1: all).
        num_samples: how many independent samples.
        seed: fixes the samples.
        kv_cache: keep each layer's keys and values, so that each new token costs one position (false: run the
            whole context for each token; the same output, slower).
        stream: print the text as it is generated (the same text as without --stream).
        chat: talk to a chat model: each line read is a user message, each reply is streamed (up to max_new_tokens);
            the conversation's keys and values stay cached between turns. /clear starts over; Ctrl-D (end of input)
            leaves. --prompt and --num_samples do not apply.
        system: chat: a system message that starts every conversation.
        device: where to run the model.
    """
    sampling = Sampling(temperature, top_k, top_p)
    model, tokenizer = load_model(ckpt_path, device)
    generator = torch.Generator(device=device).manual_seed(seed)
    if chat:
        talk(Chat(model, tokenizer, sampling, max_new_tokens, kv_cache, generator, source=ckpt_path), system)
        return
    for i in range(num_samples):
        completion = Completion(model, tokenizer, prompt, max_new_tokens, sampling, kv_cache=kv_cache,
                                generator=generator)  # fmt: skip
        if stream:
            print(prompt, end="", flush=True)
            for piece in completion:
                print(piece, end="", flush=True)
            print()
        else:
            print(prompt + completion.result().text)
        if i < num_samples - 1:
            print("---------------")


def talk(chat: Chat, system: str | None) -> None:
    """The chat REPL: a user message per line, the reply streamed; /clear starts over, end of input leaves. A message
    the model cannot read (characters outside a char model's vocabulary) gets one line, and the conversation goes on."""
    opening = [{"role": "system", "content": system}] if system else []
    messages = opening
    print("chat: type a message; /clear starts over, Ctrl-D leaves", flush=True)
    while True:
        try:
            line = input("> ")
        except EOFError:
            print()
            return
        if line.strip() == "/clear":
            chat.clear()
            messages = opening
            print("(a new conversation)", flush=True)
            continue
        try:
            reply = chat.reply([*messages, {"role": "user", "content": line}])
            for piece in reply:
                print(piece, end="", flush=True)
        except UsageError as e:
            print(f"error: {e}", file=sys.stderr, flush=True)
            continue
        print(flush=True)
        messages = []


if __name__ == "__main__":
    exit_on_bad_input(auto_cli)(sample, exit_on_error=False)
