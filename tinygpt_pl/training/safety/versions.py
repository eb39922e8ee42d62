"""The Lightning releases this project is tested with, and a one-line start-up warning for any other.

Resume, checkpoint management and FSDP reach into Lightning internals (the fit loop's step counters and
batch_progress, ModelCheckpoint's private methods, FSDPStrategy._setup_model, the signal connector), which can change
in any minor release without notice. pyproject.toml keeps pip within SUPPORTED_LIGHTNING, but a later
`pip install lightning` can still step outside it; this says so at start-up rather than failing obscurely mid-run.
"""

import sys
from importlib.metadata import PackageNotFoundError, version

from packaging.specifiers import SpecifierSet
from packaging.version import InvalidVersion, Version

# The one place that names the supported range; pyproject.toml's lightning requirement must equal it (a test checks).
SUPPORTED_LIGHTNING = ">=2.6,<2.7"
# What puts the tested versions back (README.md's install command, run in the project folder).
INSTALL_TESTED = 'pip install torch==2.13.0 -e ".[dev]" -c tested-versions.txt'


def check_lightning_version() -> str | None:
    """The warning line if the installed lightning is outside SUPPORTED_LIGHTNING, else None (also when lightning
    is not installed: importing it fails more plainly)."""
    try:
        installed = version("lightning")
    except PackageNotFoundError:
        return None
    supported = SpecifierSet(SUPPORTED_LIGHTNING)
    try:
        if supported.contains(Version(installed), prereleases=True):
            return None
    except InvalidVersion:
        pass
    lowest = min(Version(s.version) for s in supported if s.operator == ">=")
    return (
        f"warning: lightning {installed} is not a version this project was tested with ({lowest.major}."
        f"{lowest.minor}.x): resume, checkpoint management and FSDP rely on its internals; install the tested "
        f"versions, in the project folder: {INSTALL_TESTED}"
    )


def warn_if_untested_lightning() -> None:
    """Print check_lightning_version()'s warning, if any, as one line on stderr; call once at start-up."""
    message = check_lightning_version()
    if message:
        print(message, file=sys.stderr)
