"""benchmarks/results.md holds the current figures, one section per benchmark; history.md beside it keeps the runs
they replaced. Every benchmark writes its section through record()."""

import re
import subprocess
from datetime import UTC, datetime
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results.md"
HEADER = (
    "# Benchmarks\n\nThe current figures, one section per benchmark, each with its command, date, commit and machine. "
    "Earlier runs are in history.md.\n"
)


def machine() -> str:
    """Core count and CPU model, as nproc and /proc/cpuinfo give them."""
    nproc = subprocess.run(["nproc"], capture_output=True, text=True, check=True).stdout.strip()
    model = re.search(r"^model name\s*:\s*(.*)$", Path("/proc/cpuinfo").read_text(), re.M)
    return f"{nproc} cores (nproc), {model.group(1) if model else 'unknown CPU'}"


def commit() -> str:
    """The checked-out commit, marked + when the tree has uncommitted changes."""
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=REPO)
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True,
                           cwd=REPO)  # fmt: skip
    return head.stdout.strip() + ("+" if dirty.stdout.strip() else "") if head.returncode == 0 else "unknown"


def stamp(command: str, where: str | None = None) -> str:
    """The lines under a section's heading: the command, date, commit and machine."""
    return f"`{command}`  \n{datetime.now(UTC):%Y-%m-%d %H:%M} UTC, commit {commit()}, {where or machine()}\n"


def sections(text: str) -> list[str]:
    """The file's '## ' sections, each from its heading to the next."""
    starts = [m.start() for m in re.finditer(r"^## ", text, re.M)]
    return [text[a:b].rstrip("\n") + "\n" for a, b in zip(starts, [*starts[1:], len(text)][: len(starts)], strict=True)]


def record(title: str, body: str, results: Path = RESULTS) -> None:
    """Print the section `## title` and write it into results in place of the earlier one (which moves to
    history.md beside it), or at the end."""
    section = f"## {title}\n\n{body.strip()}\n"
    print("\n" + section)
    text = results.read_text() if results.is_file() else HEADER
    old = [s for s in sections(text) if s.splitlines()[0] == f"## {title}"]
    if old:
        history = results.with_name("history.md")
        past = history.read_text() if history.is_file() else "# Earlier benchmark runs\n"
        history.write_text(past.rstrip("\n") + "\n\n" + old[0])
        text = text.replace(old[0], section)
    else:
        text = text.rstrip("\n") + "\n\n" + section
    results.write_text(text)
    print(f"written into {results}")
