"""Which worker maintains the cache directory: ``<cache dir>/maintenance.lock`` under
``flock``.

With ``workers`` > 1 the background work that must not run once per worker over one
directory (size eviction and low-space passes, pin refresh, publishing the disk-usage
gauges) runs in the worker holding this lock. The others try to take it every
``POLL_INTERVAL``, so when the holder dies (the kernel drops its lock) another worker
takes over within that. The holder recounts the store every ``RECOUNT_INTERVAL``: the
other workers' commits are seen that way (each worker counts only its own as they
happen). What each worker does for itself stays per worker: its access times (flushed to
the index, where the latest use wins), its descriptor and tag caches, its fetches.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path

MAINTENANCE_FILE = "maintenance.lock"
POLL_INTERVAL = 2.0
RECOUNT_INTERVAL = 15.0


class MaintenanceLock:
    def __init__(self, root: Path) -> None:
        self.path = root / MAINTENANCE_FILE
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def try_acquire(self) -> bool:
        """Take the lock without waiting; True when held (now or already). Blocking call
        (an open and a flock)."""
        if self._fd is not None:
            return True
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd
        return True

    def release(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)
