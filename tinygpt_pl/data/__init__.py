"""From text to blocks of tokens: tokenizers (tokenizer.py), where the text comes from (sources.py), the token
cache written once and memory-mapped (cache.py), and the LightningDataModule that serves the blocks (datamodule.py)."""
