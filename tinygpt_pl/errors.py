"""Bad input ends a command with one line that says what was wrong and what to do, and exit status 2."""

import functools
import sys
from collections.abc import Callable
from typing import NoReturn, TypeVar

from jsonargparse import ArgumentError

T = TypeVar("T")


class UsageError(Exception):
    """Bad input from the user: the message says what was wrong and what to do."""


class RunStopped(Exception):
    """A fault that ends a run that had started (a diverged loss, a full disk): the message says what happened, what
    was kept and what to do; the command prints it as one line and exits with exit_code."""

    exit_code = 1


def fail(message: str) -> NoReturn:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def exit_on_bad_input(main: Callable[..., T]) -> Callable[..., T]:
    """Runs a command's main; a UsageError, or a bad option or config key (jsonargparse's ArgumentError, raised
    because the parser is built with exit_on_error=False), becomes one line on stderr and exit status 2."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs) -> T:
        try:
            return main(*args, **kwargs)
        except UsageError as e:
            fail(str(e))
        except ArgumentError as e:
            program = sys.argv[0] if sys.argv else "the command"
            fail(f"{' '.join(str(e).split())} (`python {program} --help` lists the options)")

    return wrapper
