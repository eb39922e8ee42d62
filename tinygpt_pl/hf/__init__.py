"""Hugging Face interop: GPT-2 weights and configs both ways (convert.py), and tokenizers both ways (tokenizer.py).
The commands are python -m tinygpt_pl.export and --model.init_from; transformers is the `hf` extra."""
