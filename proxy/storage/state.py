"""Tag mappings and repository links persisted beside the blobs (embedded defaults).

Without Redis, this SQLite file (``<cache dir>/state.db``, stdlib ``sqlite3``) is the L2
behind the in-memory L1, so a proxy restarted while its upstream is down still knows
every cached tag and which repositories hold which digests. SQLite gives atomic,
crash-safe writes for free (WAL journal). Calls run in a worker thread; one connection
is shared under a lock. Rows older than the retention are pruned at start, so the file
does not grow without bound.

Like every cache layer it is advisory: a failing database (disk full, I/O error) makes a
read a miss and a write a no-op, logged once until the database works again; the request
goes on from memory and disk.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from proxy.errors import RegistryError
from proxy.interfaces import LinkService, TagEntry, TagService
from proxy.model import Digest

log = logging.getLogger(__name__)

T = TypeVar("T")

STATE_FILE = "state.db"
DEFAULT_RETENTION = 30 * 86400.0

_SCHEMA = """
CREATE TABLE IF NOT EXISTS tags (
    upstream TEXT NOT NULL, repo TEXT NOT NULL, tag TEXT NOT NULL,
    digest TEXT NOT NULL, media_type TEXT NOT NULL, size INTEGER NOT NULL,
    fetched_at REAL NOT NULL,
    PRIMARY KEY (upstream, repo, tag)
);
CREATE TABLE IF NOT EXISTS links (
    upstream TEXT NOT NULL, repo TEXT NOT NULL, digest TEXT NOT NULL, linked_at REAL NOT NULL,
    PRIMARY KEY (upstream, repo, digest)
);
"""


class SqliteState(TagService, LinkService):
    def __init__(
        self,
        root: Path,
        *,
        retention: float = DEFAULT_RETENTION,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._path = root / STATE_FILE
        self._retention = retention
        self._clock = clock
        self._lock = threading.Lock()
        self._db: sqlite3.Connection | None = None
        self._failing = False

    def open(self) -> None:
        self._path.parent.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(self._path, check_same_thread=False, isolation_level=None)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")
        db.execute("PRAGMA busy_timeout=5000")  # workers write it from several processes
        db.executescript(_SCHEMA)
        cutoff = self._clock() - self._retention
        db.execute("DELETE FROM tags WHERE fetched_at < ?", (cutoff,))
        db.execute("DELETE FROM links WHERE linked_at < ?", (cutoff,))
        self._db = db

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None

    async def _run(self, call: Callable[[sqlite3.Connection], T], failed: T) -> T:
        """``call`` on the connection in a worker thread; ``failed`` if SQLite fails."""

        def locked() -> T:
            with self._lock:
                assert self._db is not None, "state store used before open()"
                return call(self._db)

        try:
            result = await asyncio.to_thread(locked)
        except sqlite3.Error as exc:
            if not self._failing:
                log.warning("state database failing, going on without it: %s", exc)
            self._failing = True
            return failed
        if self._failing:
            log.info("state database works again")
            self._failing = False
        return result

    async def get(self, upstream: str, repo: str, tag: str) -> TagEntry | None:
        row: Any = await self._run(
            lambda db: db.execute(
                "SELECT digest, media_type, size, fetched_at FROM tags"
                " WHERE upstream = ? AND repo = ? AND tag = ?",
                (upstream, repo, tag),
            ).fetchone(),
            None,
        )
        if row is None:
            return None
        try:
            return TagEntry(Digest.parse(row[0]), row[1], int(row[2]), float(row[3]))
        except (RegistryError, TypeError, ValueError):
            return None  # a damaged row is a miss

    async def _write(self, sql: str, rows: list[tuple[object, ...]]) -> None:
        """Run ``sql`` for each row. The cursor is closed under the lock: one that
        escaped it would be finalised in whatever thread drops it, racing the next
        statement on the shared connection ("bad parameter or other API misuse")."""
        await self._run(lambda db: db.executemany(sql, rows).close(), None)

    async def set(self, upstream: str, repo: str, tag: str, entry: TagEntry) -> None:
        row = (upstream, repo, tag, str(entry.digest), entry.media_type, entry.size)
        await self._write(
            "INSERT OR REPLACE INTO tags VALUES (?, ?, ?, ?, ?, ?, ?)", [(*row, entry.fetched_at)]
        )

    async def linked(self, upstream: str, repo: str, digest: Digest) -> bool:
        row = await self._run(
            lambda db: db.execute(
                "SELECT 1 FROM links WHERE upstream = ? AND repo = ? AND digest = ?",
                (upstream, repo, str(digest)),
            ).fetchone(),
            None,
        )
        return row is not None

    async def link(self, upstream: str, repo: str, digests: list[Digest]) -> None:
        if not digests:
            return
        now = self._clock()
        rows: list[tuple[object, ...]] = [(upstream, repo, str(d), now) for d in digests]
        await self._write("INSERT OR REPLACE INTO links VALUES (?, ?, ?, ?)", rows)

    async def delete(self, upstream: str, repo: str, tag: str, digest: Digest) -> None:
        await self._write(
            "DELETE FROM tags WHERE upstream = ? AND repo = ? AND tag = ? AND digest = ?",
            [(upstream, repo, tag, str(digest))],
        )

    async def unlink(self, upstream: str, repo: str, digests: list[Digest]) -> None:
        rows: list[tuple[object, ...]] = [(upstream, repo, str(d)) for d in digests]
        await self._write("DELETE FROM links WHERE upstream = ? AND repo = ? AND digest = ?", rows)
