"""Sample text from a model: python sample.py --ckpt_path out/shakespeare_char/checkpoints/last.ckpt

--ckpt_path takes a train.py checkpoint, a Hugging Face GPT-2 folder or a hub name (gpt2, gpt2-medium, ...).
"""

import torch
from jsonargparse import auto_cli

from tinygpt_pl.errors import exit_on_bad_input
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
        device: where to run the model.
    """
    sampling = Sampling(temperature, top_k, top_p)
    model, tokenizer = load_model(ckpt_path, device)
    generator = torch.Generator(device=device).manual_seed(seed)
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


if __name__ == "__main__":
    exit_on_bad_input(auto_cli)(sample, exit_on_error=False)
