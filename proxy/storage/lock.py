"""Who owns a cache directory: ``<cache dir>/proxy.lock`` under ``flock``.

Every serving process holds it shared (the workers of one node share a directory); the
operator CLI takes it exclusively, without waiting, to work on a stopped proxy's files.
When it cannot, a proxy is running on the directory and the CLI goes through that proxy's
admin API instead, so the two never remove files under each other. The kernel releases
the lock when its process ends, crash included: no stale pid files.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

LOCK_FILE = "proxy.lock"


class DirectoryLock:
    def __init__(self, root: Path) -> None:
        self.path = root / LOCK_FILE
        self._fd: int | None = None

    def acquire(self, *, exclusive: bool) -> bool:
        """Take the lock without blocking; False when another process holds it in a
        conflicting mode. Blocking call (a file open): cheap, but not on a hot path."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        if exclusive:
            os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd
        return True

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor releases the flock
            self._fd = None
