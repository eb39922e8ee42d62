"""Sample text from a trained checkpoint: python sample.py --ckpt_path out/shakespeare_char/checkpoints/last.ckpt"""

import torch
from jsonargparse import auto_cli

from tinygpt_pl.checkpoint import load_checkpoint
from tinygpt_pl.errors import UsageError, exit_on_bad_input


def sample(
    *,
    ckpt_path: str,
    prompt: str = "\n",
    max_new_tokens: int = 500,
    temperature: float = 0.8,
    top_k: int | None = 200,
    num_samples: int = 1,
    seed: int = 1337,
    device: str = "cuda" if torch.cuda.is_available() else "cpu",
) -> None:
    """Print num_samples continuations of prompt, each max_new_tokens long.

    Args:
        ckpt_path: a .ckpt written by train.py (it holds the model and its tokenizer).
        prompt: the text to continue (with the char tokenizer, only characters the model was trained on).
        max_new_tokens: tokens to generate per sample.
        temperature: < 1 sharpens the distribution, > 1 flattens it.
        top_k: sample only among the k most likely tokens (None: all).
        num_samples: how many independent samples.
        seed: fixes the samples.
        device: where to run the model.
    """
    model, tokenizer = load_checkpoint(ckpt_path, map_location=device)
    if temperature <= 0:
        raise UsageError(f"--temperature must be > 0, got {temperature}")
    ids = tokenizer.encode(prompt)
    if not ids:
        raise UsageError("--prompt is empty: give at least one character to start from")
    idx = torch.tensor([ids], dtype=torch.long, device=device)
    generator = torch.Generator(device=device).manual_seed(seed)
    for i in range(num_samples):
        out = model.generate(idx, max_new_tokens, temperature=temperature, top_k=top_k,
                             vocab_limit=tokenizer.vocab_size, generator=generator)  # fmt: skip
        print(tokenizer.decode(out[0].tolist()))
        if i < num_samples - 1:
            print("---------------")


if __name__ == "__main__":
    exit_on_bad_input(auto_cli)(sample, exit_on_error=False)
