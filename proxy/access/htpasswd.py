"""Local users from an htpasswd file (bcrypt only, as ``htpasswd -B`` writes it).

The file is re-read when its modification time or size changes (checked at most once a
second), so adding a user needs no restart. A file that cannot be read keeps the users
last read (and says so once).

bcrypt is slow on purpose, so it never runs on the event loop and its work is bounded:

* a password once verified is remembered (by a keyed hash of user and password, never
  the password) until the file changes, so a client sending Basic on every request
  costs one bcrypt per file version;
* verifications run in threads, at most ``MAX_CONCURRENT`` at a time, with at most
  ``MAX_WAITING`` queued; beyond that a login is refused at once (``TooManyRequests``);
* after ``MAX_FAILURES`` wrong passwords for one user from one address within
  ``FAILURE_WINDOW`` seconds, further attempts for that user from there are refused
  without hashing until the window passes.
"""

from __future__ import annotations

import asyncio
import errno
import hashlib
import hmac
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path

import bcrypt

from proxy.access.bounded import Bounded
from proxy.errors import TooManyRequests

log = logging.getLogger(__name__)

RELOAD_INTERVAL = 1.0
MAX_CONCURRENT = 2
MAX_WAITING = 32
MAX_FAILURES = 5
FAILURE_WINDOW = 60.0
MAX_REMEMBERED = 10_000
BCRYPT_PREFIXES = ("$2a$", "$2b$", "$2y$")


class Htpasswd:
    def __init__(self, path: Path, *, clock: Callable[[], float] = time.monotonic) -> None:
        self._path = path
        self._clock = clock
        self._users: dict[str, bytes] = {}
        self._stamp: tuple[int, int] | None = None
        self._version = 0
        self._checked = -RELOAD_INTERVAL
        self._key = os.urandom(32)
        self._verified: Bounded[bytes, str] = Bounded(MAX_REMEMBERED)
        self._failures: Bounded[str, list[float]] = Bounded(MAX_REMEMBERED)
        self._slots = asyncio.Semaphore(MAX_CONCURRENT)
        self._waiting = 0
        self._warned = False

    def load(self) -> None:
        """Read the file now; raises OSError when it cannot be read (at start-up)."""
        self._read(self._path.stat())

    def version(self) -> int:
        """A number that changes whenever the file is read again (re-read first if due)."""
        self._maybe_reload()
        return self._version

    def users(self) -> frozenset[str]:
        self._maybe_reload()
        return frozenset(self._users)

    def __contains__(self, username: str) -> bool:
        self._maybe_reload()
        return username in self._users

    async def verify(self, username: str, password: str, source: str = "") -> bool:
        """Whether ``password`` is ``username``'s. Raises ``TooManyRequests`` when the
        user has failed too often from ``source`` (the client address: a stranger's wrong
        guesses cannot lock a user out everywhere) or too many verifications are queued."""
        failure_key = f"{username}\0{source}"
        self._maybe_reload()
        hashed = self._users.get(username)
        if hashed is None:
            return False
        token = hmac.new(self._key, f"{username}\0{password}".encode(), hashlib.sha256).digest()
        if self._verified.get(token) == username:
            return True
        now = self._clock()
        recent = [t for t in self._failures.get(failure_key, []) if now - t < FAILURE_WINDOW]
        if len(recent) >= MAX_FAILURES:
            retry = int(FAILURE_WINDOW - (now - recent[0])) + 1
            raise TooManyRequests(
                "too many failed logins; try again later", headers={"Retry-After": str(retry)}
            )
        if self._waiting >= MAX_WAITING:
            raise TooManyRequests("too many logins at once", headers={"Retry-After": "1"})
        self._waiting += 1
        try:
            async with self._slots:
                ok = await asyncio.to_thread(_check, password.encode(), hashed)
        finally:
            self._waiting -= 1
        if ok:
            self._verified[token] = username
            self._failures.pop(failure_key, None)
        else:
            # Read the failures again: concurrent attempts may have added theirs meanwhile.
            failures = [t for t in self._failures.get(failure_key, []) if now - t < FAILURE_WINDOW]
            failures.append(now)
            self._failures[failure_key] = failures
        return ok

    def _maybe_reload(self) -> None:
        now = self._clock()
        if now - self._checked < RELOAD_INTERVAL:
            return
        self._checked = now
        try:
            stat = self._path.stat()
            if (stat.st_mtime_ns, stat.st_size) != self._stamp:
                self._read(stat)
        except OSError as exc:
            if not self._warned:
                log.warning("cannot re-read htpasswd file %s: %s", self._path, exc.strerror)
                self._warned = True

    def _read(self, stat: os.stat_result) -> None:
        users: dict[str, bytes] = {}
        skipped = 0
        try:
            text = self._path.read_text(encoding="utf-8")
        except UnicodeDecodeError as exc:  # unreadable too: load() and reloads say OSError
            raise OSError(errno.EILSEQ, f"not UTF-8 (byte {exc.start})") from None
        for line in text.splitlines():
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            name, colon, hashed = line.partition(":")
            if not colon or not hashed.startswith(BCRYPT_PREFIXES):
                skipped += 1
                continue
            users[name] = hashed.encode()
        if skipped:
            log.warning(
                "htpasswd file %s: %d line(s) without a bcrypt hash ignored (use htpasswd -B)",
                self._path,
                skipped,
            )
        self._users = users
        self._stamp = (stat.st_mtime_ns, stat.st_size)
        self._version += 1
        self._verified.clear()
        self._warned = False
        log.info("htpasswd file %s: %d user(s)", self._path, len(users))


def _check(password: bytes, hashed: bytes) -> bool:
    try:
        return bcrypt.checkpw(password, hashed)
    except ValueError:
        return False  # a malformed hash in the file
