"""The local index of what the cache directory holds as images, and when each was used.

The blob store knows files, not images. Eviction by image, pinning, ``cache ls`` and GC
need to know which committed digests are manifests, what each references, which tags
point at them and when they were last pulled. That is this index: a SQLite file beside
the blobs (``<cache dir>/index.db``). It is per disk, so it is local even when Redis
holds the shared tags and links: the disk is what it describes.

Tables::

    manifests(digest, media_type, size, stored_at)   written by ManifestStore.put
    refs(parent, child)                              what each manifest references
    tags(upstream, repo, tag, digest)                which tags named a manifest
    pulls(upstream, repo, digest, at)                through which repository it was pulled
    used(digest, at)                                 last use of a digest (batched)

Access times are never written per request: ``AccessTimes`` keeps them in memory and
``flush`` writes what changed in one transaction (the registry flushes every
``FLUSH_INTERVAL`` and before each eviction pass). Readers merge the unflushed times
over the table, so nothing is lost between flushes except across a crash, where the
cost is an image looking older than it is.

An **image** is a root manifest (one no other indexed manifest references) with
everything it references, transitively (an index, its platform manifests, their configs
and layers). Its last use is the latest use of any of its manifests. A committed blob in
no image is **loose** (fetched by digest without a manifest, or cached before the index
existed).

Like the other state files it is advisory: a failing database is logged once and
treated as empty, and eviction then falls back to evicting loose blobs, oldest first.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import threading
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from proxy.errors import RegistryError
from proxy.interfaces import TagEntry, TagService
from proxy.model import Digest

log = logging.getLogger(__name__)

T = TypeVar("T")

INDEX_FILE = "index.db"
FLUSH_INTERVAL = 10.0
MAX_DEPTH = 4
"""An index references manifests, which reference blobs: two levels; a little slack."""

_SCHEMA = """
CREATE TABLE IF NOT EXISTS manifests (
    digest TEXT PRIMARY KEY, media_type TEXT NOT NULL, size INTEGER NOT NULL,
    stored_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS refs (
    parent TEXT NOT NULL, child TEXT NOT NULL, PRIMARY KEY (parent, child)
);
CREATE TABLE IF NOT EXISTS tags (
    upstream TEXT NOT NULL, repo TEXT NOT NULL, tag TEXT NOT NULL, digest TEXT NOT NULL,
    PRIMARY KEY (upstream, repo, tag)
);
CREATE INDEX IF NOT EXISTS tags_by_digest ON tags (digest);
CREATE TABLE IF NOT EXISTS pulls (
    upstream TEXT NOT NULL, repo TEXT NOT NULL, digest TEXT NOT NULL, at REAL NOT NULL,
    PRIMARY KEY (upstream, repo, digest)
);
CREATE TABLE IF NOT EXISTS used (digest TEXT PRIMARY KEY, at REAL NOT NULL);
"""

TagName = tuple[str, str, str]
"""(upstream, repository, tag key) as the tag stores key it."""
RepoName = tuple[str, str]


@dataclass
class Snapshot:
    """The whole index at one moment, unflushed access times merged in."""

    manifests: dict[Digest, tuple[Digest, ...]] = field(default_factory=dict)
    stored_at: dict[Digest, float] = field(default_factory=dict)
    tags: dict[Digest, list[TagName]] = field(default_factory=dict)
    pulls: dict[Digest, list[RepoName]] = field(default_factory=dict)
    used: dict[Digest, float] = field(default_factory=dict)


@dataclass
class Image:
    """A root manifest and everything it references (``members``, the root included)."""

    root: Digest
    members: frozenset[Digest]
    manifests: frozenset[Digest]
    tagged: list[tuple[TagName, Digest]]
    """The tags naming one of its manifests, and which."""
    repos: list[RepoName]
    last_used: float

    @property
    def tags(self) -> list[TagName]:
        return [tag for tag, _ in self.tagged]

    def names(self) -> list[str]:
        """``<upstream>/<repo>:<tag>`` of each tag (narrow-Accept keys shown bare), else
        ``<upstream>/<repo>@<digest>`` of each repository it was pulled through."""
        if self.tags:
            return sorted({f"{u}/{r}:{t.split('#')[0]}" for u, r, t in self.tags})
        return sorted({f"{u}/{r}@{self.root}" for u, r in self.repos}) or [str(self.root)]


def build_images(snapshot: Snapshot) -> list[Image]:
    """Every image of the index: its roots with their transitive references."""
    children = {c for kids in snapshot.manifests.values() for c in kids}
    images = []
    for root in snapshot.manifests:
        if root in children:
            continue
        members = {root}
        manifests = {root}
        frontier = [root]
        for _ in range(MAX_DEPTH):
            following = []
            for parent in frontier:
                for child in snapshot.manifests.get(parent, ()):
                    if child not in members:
                        members.add(child)
                        if child in snapshot.manifests:
                            manifests.add(child)
                            following.append(child)
            frontier = following
        tagged = [(t, m) for m in manifests for t in snapshot.tags.get(m, ())]
        repos = sorted({r for m in manifests for r in snapshot.pulls.get(m, ())})
        last = max(
            (snapshot.used.get(m, snapshot.stored_at.get(m, 0.0)) for m in manifests),
            default=0.0,
        )
        last = max(last, snapshot.stored_at.get(root, 0.0))
        images.append(Image(root, frozenset(members), frozenset(manifests), tagged, repos, last))
    return images


class AccessTimes:
    """Last use of digests and pulls of manifests, in memory until flushed."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._used: dict[Digest, float] = {}
        self._pulls: dict[tuple[str, str, Digest], float] = {}

    def touch(self, digests: Iterable[Digest]) -> None:
        now = self._clock()
        for digest in digests:
            self._used[digest] = now

    def pulled(self, upstream: str, repo: str, digest: Digest) -> None:
        now = self._clock()
        self._used[digest] = now
        self._pulls[(upstream, repo, digest)] = now

    def last_used(self, digest: Digest) -> float | None:
        """The unflushed last use of ``digest``, if any."""
        return self._used.get(digest)

    def drain(self) -> tuple[dict[Digest, float], dict[tuple[str, str, Digest], float]]:
        used, pulls = self._used, self._pulls
        self._used, self._pulls = {}, {}
        return used, pulls

    def restore(
        self, used: dict[Digest, float], pulls: dict[tuple[str, str, Digest], float]
    ) -> None:
        """Put back what a failed flush drained (newer times win)."""
        for digest, at in used.items():
            self._used[digest] = max(at, self._used.get(digest, at))
        for key, at in pulls.items():
            self._pulls[key] = max(at, self._pulls.get(key, at))

    def pending(self) -> dict[Digest, float]:
        return dict(self._used)


class CacheIndex:
    """The SQLite index. Blocking methods end in ``_sync`` (the CLI on a stopped proxy
    calls them directly); the others run them in a worker thread, under one lock."""

    def __init__(self, root: Path, *, clock: Callable[[], float] = time.time) -> None:
        self.path = root / INDEX_FILE
        self._clock = clock
        self._lock = threading.Lock()
        self._db: sqlite3.Connection | None = None
        self._failing = False
        self.times = AccessTimes(clock)

    def open_sync(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")
        db.execute("PRAGMA busy_timeout=5000")
        db.executescript(_SCHEMA)
        self._db = db

    def close_sync(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None

    def _locked(self, call: Callable[[sqlite3.Connection], T], failed: T) -> T:
        try:
            with self._lock:
                if self._db is None:
                    return failed
                result = call(self._db)
        except sqlite3.Error as exc:
            if not self._failing:
                log.warning("cache index failing, going on without it: %s", exc)
            self._failing = True
            return failed
        if self._failing:
            log.info("cache index works again")
            self._failing = False
        return result

    async def _run(self, call: Callable[[sqlite3.Connection], T], failed: T) -> T:
        return await asyncio.to_thread(self._locked, call, failed)

    # --- writes -------------------------------------------------------------------

    async def record_manifest(
        self, digest: Digest, media_type: str, size: int, children: list[Digest]
    ) -> None:
        """A manifest was committed: what it is and what it references. Idempotent."""
        now = self._clock()

        def write(db: sqlite3.Connection) -> None:
            with db:
                db.execute("BEGIN")
                db.execute(
                    "INSERT OR IGNORE INTO manifests VALUES (?, ?, ?, ?)",
                    (str(digest), media_type, size, now),
                )
                db.executemany(
                    "INSERT OR IGNORE INTO refs VALUES (?, ?)",
                    [(str(digest), str(c)) for c in children],
                ).close()

        await self._run(write, None)

    async def record_tag(self, upstream: str, repo: str, tag: str, digest: Digest) -> None:
        await self._run(
            lambda db: db.execute(
                "INSERT OR REPLACE INTO tags VALUES (?, ?, ?, ?)",
                (upstream, repo, tag, str(digest)),
            ).close(),
            None,
        )

    def _write_times(
        self, used: dict[Digest, float], pulls: dict[tuple[str, str, Digest], float]
    ) -> bool:
        def write(db: sqlite3.Connection) -> bool:
            with db:
                db.execute("BEGIN")
                db.executemany(
                    "INSERT INTO used VALUES (?, ?) ON CONFLICT (digest)"
                    " DO UPDATE SET at = max(at, excluded.at)",
                    [(str(d), at) for d, at in used.items()],
                ).close()
                db.executemany(
                    "INSERT INTO pulls VALUES (?, ?, ?, ?) ON CONFLICT (upstream, repo, digest)"
                    " DO UPDATE SET at = max(at, excluded.at)",
                    [(u, r, str(d), at) for (u, r, d), at in pulls.items()],
                ).close()
            return True

        return self._locked(write, False)

    async def forget_tag(self, upstream: str, repo: str, tag: str, digest: Digest) -> None:
        await self._run(
            lambda db: db.execute(
                "DELETE FROM tags WHERE upstream = ? AND repo = ? AND tag = ? AND digest = ?",
                (upstream, repo, tag, str(digest)),
            ).close(),
            None,
        )

    async def tags_of(self, digests: Iterable[Digest]) -> list[tuple[TagName, Digest]]:
        """The tags naming any of ``digests``, read now (not from a snapshot)."""
        names = [str(d) for d in digests]

        def read(db: sqlite3.Connection) -> list[tuple[TagName, Digest]]:
            found = []
            for name in names:
                for upstream, repo, tag in db.execute(
                    "SELECT upstream, repo, tag FROM tags WHERE digest = ?", (name,)
                ):
                    found.append(((upstream, repo, tag), Digest.parse(name)))
            return found

        return await self._run(read, [])

    def flush_sync(self) -> None:
        """``flush`` for a caller without an event loop (the CLI)."""
        used, pulls = self.times.drain()
        if (used or pulls) and not self._write_times(used, pulls):
            self.times.restore(used, pulls)

    async def flush(self) -> None:
        """Write the access times gathered since the last flush, in one transaction.
        They are taken on the event loop (where they are gathered), written in a thread."""
        used, pulls = self.times.drain()
        if (used or pulls) and not await asyncio.to_thread(self._write_times, used, pulls):
            self.times.restore(used, pulls)

    def forget_sync(self, digests: Iterable[Digest]) -> None:
        """Remove every row about ``digests`` (they were evicted or quarantined)."""
        names = [(str(d),) for d in digests]

        def write(db: sqlite3.Connection) -> None:
            with db:
                db.execute("BEGIN")
                for sql in (
                    "DELETE FROM manifests WHERE digest = ?",
                    "DELETE FROM refs WHERE parent = ?",
                    "DELETE FROM tags WHERE digest = ?",
                    "DELETE FROM pulls WHERE digest = ?",
                    "DELETE FROM used WHERE digest = ?",
                ):
                    db.executemany(sql, names).close()

        self._locked(write, None)

    async def forget(self, digests: Iterable[Digest]) -> None:
        await asyncio.to_thread(self.forget_sync, list(digests))

    # --- reads --------------------------------------------------------------------

    def snapshot_sync(self) -> Snapshot:
        """``snapshot`` for a caller without an event loop (the CLI)."""
        return self._merge(self._read_sync())

    def _read_sync(self) -> Snapshot:
        def read(db: sqlite3.Connection) -> Snapshot:
            snap = Snapshot()
            for digest, stored_at in db.execute("SELECT digest, stored_at FROM manifests"):
                parsed = _parse(digest)
                if parsed is not None:
                    snap.manifests[parsed] = ()
                    snap.stored_at[parsed] = float(stored_at)
            children: dict[Digest, list[Digest]] = {}
            for parent, child in db.execute("SELECT parent, child FROM refs"):
                p, c = _parse(parent), _parse(child)
                if p is not None and c is not None and p in snap.manifests:
                    children.setdefault(p, []).append(c)
            for digest, kids in children.items():
                snap.manifests[digest] = tuple(kids)
            for upstream, repo, tag, digest in db.execute(
                "SELECT upstream, repo, tag, digest FROM tags"
            ):
                parsed = _parse(digest)
                if parsed is not None:
                    snap.tags.setdefault(parsed, []).append((upstream, repo, tag))
            for upstream, repo, digest in db.execute("SELECT upstream, repo, digest FROM pulls"):
                parsed = _parse(digest)
                if parsed is not None:
                    snap.pulls.setdefault(parsed, []).append((upstream, repo))
            for digest, at in db.execute("SELECT digest, at FROM used"):
                parsed = _parse(digest)
                if parsed is not None:
                    snap.used[parsed] = float(at)
            return snap

        return self._locked(read, Snapshot())

    def _merge(self, snap: Snapshot) -> Snapshot:
        for digest, at in self.times.pending().items():
            snap.used[digest] = max(at, snap.used.get(digest, at))
        return snap

    async def snapshot(self) -> Snapshot:
        """The index, unflushed times merged in on the event loop (where they change)."""
        return self._merge(await asyncio.to_thread(self._read_sync))


class IndexedTagStore(TagService):
    """A tag store that also tells the index which manifest each tag names (so eviction
    can forget the tags of what it removes, and pins can be matched).

    A tag is recorded after its manifest is stored; an eviction may remove the manifest
    in between. So ``set`` asks ``present`` after recording (which waits for a removal
    under way, ``Evictor.settled``) and forgets the tag if its manifest is gone: no tag
    is left naming a manifest that is not on disk."""

    def __init__(
        self,
        inner: TagService,
        index: CacheIndex,
        present: Callable[[Digest], Awaitable[bool]] | None = None,
    ) -> None:
        self._inner = inner
        self._index = index
        self._present = present

    async def get(self, upstream: str, repo: str, tag: str) -> TagEntry | None:
        return await self._inner.get(upstream, repo, tag)

    async def set(self, upstream: str, repo: str, tag: str, entry: TagEntry) -> None:
        await self._index.record_tag(upstream, repo, tag, entry.digest)
        await self._inner.set(upstream, repo, tag, entry)
        if self._present is not None and not await self._present(entry.digest):
            await self.delete(upstream, repo, tag, entry.digest)

    async def delete(self, upstream: str, repo: str, tag: str, digest: Digest) -> None:
        await self._inner.delete(upstream, repo, tag, digest)
        await self._index.forget_tag(upstream, repo, tag, digest)


def _parse(text: str) -> Digest | None:
    try:
        return Digest.parse(text)
    except (RegistryError, ValueError):
        return None
