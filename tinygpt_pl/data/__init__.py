"""From text to blocks of tokens: tokenizers, sources, the token cache (cache.py), conversations and their chat
template (chat.py, conversations.py), blocks served by step (batches.py) and the LightningDataModule (datamodule.py)."""
