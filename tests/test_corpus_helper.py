"""The tests find tiny Shakespeare from any clone: the shared copy, else the project's cache, else one clear failure."""

import shutil
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from conftest import find_tiny_shakespeare

from tinygpt_pl.data import datamodule as data


@pytest.fixture
def no_download(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any download attempt fails, as on a machine without a network."""

    def offline(url: str, *args: object, **kwargs: object) -> None:
        raise urllib.error.URLError(f"no network to fetch {url}")

    monkeypatch.setattr(urllib.request, "urlopen", offline)


@pytest.mark.usefixtures("no_download")
def test_shared_copy_first(corpus: Path, tmp_path: Path) -> None:
    assert find_tiny_shakespeare(corpus, tmp_path / "cache") == corpus
    assert not (tmp_path / "cache").exists()  # the cache is not even looked at


@pytest.mark.usefixtures("no_download")
def test_cached_copy_when_the_shared_one_is_absent_or_damaged(corpus: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    cache.mkdir()
    shutil.copyfile(corpus, cache / "tinyshakespeare.txt")
    assert find_tiny_shakespeare(tmp_path / "absent.txt", cache) == cache / "tinyshakespeare.txt"
    damaged = tmp_path / "damaged.txt"
    damaged.write_bytes(corpus.read_bytes()[:-1])
    assert find_tiny_shakespeare(damaged, cache) == cache / "tinyshakespeare.txt"


def test_downloads_into_the_cache_once(corpus: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(data, "TINY_SHAKESPEARE_URL", corpus.as_uri())  # the "download" reads the local copy
    found = find_tiny_shakespeare(tmp_path / "absent.txt", tmp_path / "cache")
    assert found == tmp_path / "cache" / "tinyshakespeare.txt" and found.read_bytes() == corpus.read_bytes()
    monkeypatch.setattr(data, "TINY_SHAKESPEARE_URL", "file:///nonexistent/input.txt")
    assert find_tiny_shakespeare(tmp_path / "absent.txt", tmp_path / "cache") == found  # no second download


@pytest.mark.usefixtures("no_download")
def test_neither_fails_in_one_line(tmp_path: Path) -> None:
    with pytest.raises(pytest.fail.Exception) as failure:
        find_tiny_shakespeare(tmp_path / "absent.txt", tmp_path / "cache")
    message = str(failure.value)
    assert "\n" not in message
    assert message.startswith(f"tiny Shakespeare for the tests: no intact copy at {tmp_path / 'absent.txt'} or in")
    assert "no network to fetch" in message and message.endswith("put tinyshakespeare.txt in either place")
