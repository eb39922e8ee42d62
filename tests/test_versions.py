"""The start-up warning for a Lightning release outside the tested range, and that range agreeing with the install."""

from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet

from tinygpt_pl.training.safety import versions
from tinygpt_pl.training.safety.versions import (
    INSTALL_TESTED,
    SUPPORTED_LIGHTNING,
    check_lightning_version,
    warn_if_untested_lightning,
)

ROOT = Path(__file__).resolve().parents[1]


def fake_lightning(monkeypatch: pytest.MonkeyPatch, installed: str) -> None:
    """Make the installed lightning appear to be `installed`."""

    def fake_version(name: str) -> str:
        assert name == "lightning"
        return installed

    monkeypatch.setattr(versions, "version", fake_version)


@pytest.mark.parametrize("installed", ["2.7.0", "2.5.1"])
def test_untested_lightning_says_one_line_on_stderr(
    installed: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    fake_lightning(monkeypatch, installed)
    warn_if_untested_lightning()
    out, err = capsys.readouterr()
    assert out == ""
    assert err == (
        f"warning: lightning {installed} is not a version this project was tested with (2.6.x): resume, checkpoint "
        "management and FSDP rely on its internals; install the tested versions, in the project folder: "
        'pip install torch==2.13.0 -e ".[dev]" -c tested-versions.txt\n'
    )


@pytest.mark.parametrize(
    ("installed", "warns"),
    [("2.6.0", False), ("2.6.6+local", False), ("2.6.7rc1", False), ("2.7.0rc1", True), ("3.0.0", True),
     ("not-a-version", True)],
)  # fmt: skip
def test_which_versions_warn(installed: str, warns: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    fake_lightning(monkeypatch, installed)
    message = check_lightning_version()
    assert (message is not None) == warns
    if warns:
        assert message.startswith(f"warning: lightning {installed} is not a version") and "\n" not in message


def test_installed_lightning_says_nothing(capsys: pytest.CaptureFixture[str]) -> None:
    assert check_lightning_version() is None
    warn_if_untested_lightning()
    assert capsys.readouterr() == ("", "")


def test_supported_range_matches_pyproject_pins_and_install_command() -> None:
    """The range is named once in code; pyproject.toml, tested-versions.txt and the install command agree with it."""
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    (lightning,) = [Requirement(d) for d in deps if Requirement(d).name == "lightning"]
    assert lightning.specifier == SpecifierSet(SUPPORTED_LIGHTNING)
    lines = (ROOT / "tested-versions.txt").read_text().splitlines()
    pins = dict(line.split("==") for line in lines if line and not line.startswith("#"))
    assert SpecifierSet(SUPPORTED_LIGHTNING).contains(pins["lightning"])
    assert pins["lightning"] == pins["pytorch-lightning"]
    for path in ("README.md", ".ci/run"):
        assert f"\n{INSTALL_TESTED}\n" in (ROOT / path).read_text(), f"{path} installs otherwise than the warning says"
