"""One run per folder: train.py holds a lock on its run folder while it runs, so that a second train.py there is
refused before it does any work. The lock is the kernel's (flock), released when the process ends however it ends: a
killed run's lock never blocks the next one."""

import fcntl
import os
import shutil
from pathlib import Path

from tinygpt_pl.errors import UsageError
from tinygpt_pl.training.safety.signals import at_abort

LOCK_NAME = ".lock"


class RunLock:
    """Holds root/.lock for the life of the process (on global rank 0; the other ranks belong to the same run)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.created = not root.exists()
        try:
            root.mkdir(parents=True, exist_ok=True)
            self.fd = os.open(root / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise UsageError(
                f"cannot write to the run folder {root} ({e.strerror}): pass a writable --trainer.default_root_dir"
            ) from None
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self.fd)
            raise UsageError(
                f"another train.py is running in {root} (it holds {root / LOCK_NAME}): wait for it to end, "
                "or pass another --trainer.default_root_dir"
            ) from None
        at_abort(self.abandon)

    def abandon(self) -> None:
        """The run did not start: release the lock, and remove the run folder if this process made it."""
        if self.fd is None:
            return
        if self.created and [p.name for p in self.root.iterdir()] == [LOCK_NAME]:
            shutil.rmtree(self.root)
        os.close(self.fd)
        self.fd = None
