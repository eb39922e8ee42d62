"""tinygpt_pl: train GPT language models the way the "Let's build GPT" lecture builds them, with Lightning."""

__all__ = ["GPT", "GPTConfig", "UsageError"]


def __getattr__(name: str) -> object:
    """The package's names, imported when first used: importing a submodule does not load torch (train.py takes its
    signals over before torch loads)."""
    if name in ("GPT", "GPTConfig"):
        from tinygpt_pl import model

        return getattr(model, name)
    if name == "UsageError":
        from tinygpt_pl.errors import UsageError

        return UsageError
    raise AttributeError(f"module 'tinygpt_pl' has no attribute {name!r}")
