"""Content-addressed blob store on local disk.

Layout under the cache directory::

    blobs/<algorithm>/<first two hex>/<hex>   committed content, complete by construction
    tmp/<hex>.<random>.part                   ingest in progress; removed at start-up

A blob is written to ``tmp/``, hashed while it streams, verified against the digest and
size it was asked for, fsynced and renamed into ``blobs/``: a file under its final name
is always complete, and a crash leaves at worst a ``.part`` file that the next start
removes. Blocking file calls run in the default executor, except ``stat`` of a committed
blob, a metadata call that costs less than the thread hop.

A blob's last use is not written to the file (no ``utime`` per request): ``stat`` reports
it to ``on_use`` (the index's in-memory access times, flushed in batches); a file's
mtime is its commit time.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path

from proxy import metrics
from proxy.errors import BlobUnknown, DigestMismatch, TooLarge, UpstreamUnavailable
from proxy.interfaces import BlobDescriptorService, BlobStore, BlobWriter
from proxy.model import Descriptor, Digest

log = logging.getLogger(__name__)

BLOBS_DIR = "blobs"
TMP_DIR = "tmp"
PART_SUFFIX = ".part"


class DiskBlobStore(BlobStore):
    def __init__(self, root: Path) -> None:
        self.root = root
        self._blobs = root / BLOBS_DIR
        self._tmp = root / TMP_DIR
        self.used_bytes = 0
        self.blob_count = 0
        self.counting = False
        """True while ``count`` walks the store after start (used_bytes is partial)."""
        self._during: dict[Digest, int] = {}
        self.on_commit: Callable[[], None] | None = None
        """Called on the event loop after each commit (eviction hooks in here)."""
        self.on_use: Callable[[Digest], None] | None = None
        """Called by ``stat`` of a committed blob: its use, for eviction's recency."""

    def open_store(self) -> None:
        """``prepare`` and count what is stored, in one go. Blocking: run it in a thread.
        (The registry instead counts in the background: ``count``.)"""
        self.prepare()
        self._counted(*self._count_sync())

    def prepare(self) -> None:
        """Create the directories and remove temp files a previous run left behind.
        Blocking, and quick whatever the store holds: it never walks ``blobs/``."""
        self._blobs.mkdir(parents=True, exist_ok=True)
        self._tmp.mkdir(parents=True, exist_ok=True)
        removed = 0
        for leftover in self._tmp.iterdir():
            try:
                leftover.unlink()
                removed += 1
            except IsADirectoryError:
                continue
            except FileNotFoundError:
                continue
        if removed:
            log.info("removed %d leftover temp files", removed, extra={"dir": str(self._tmp)})
        self.counting = True
        self._during = {}

    def _count_sync(self) -> tuple[int, int, set[Digest]]:
        """(count, bytes, digests) of the committed files: one ``scandir`` walk."""
        count = size = 0
        seen: set[Digest] = set()
        try:
            algorithms = list(os.scandir(self._blobs))
        except FileNotFoundError:
            return 0, 0, seen
        for algorithm in algorithms:
            if not algorithm.is_dir():
                continue
            for prefix in os.scandir(algorithm.path):
                if not prefix.is_dir():
                    continue
                for entry in os.scandir(prefix.path):
                    try:
                        size += entry.stat().st_size
                    except FileNotFoundError:
                        continue
                    count += 1
                    seen.add(Digest(algorithm.name, entry.name))
        return count, size, seen

    def _counted(self, count: int, size: int, seen: set[Digest]) -> None:
        # Commits while the walk ran were counted as they happened; the walk saw some
        # of them too: those are taken out once.
        twice = [d for d in self._during if d in seen]
        self.used_bytes += size - sum(self._during[d] for d in twice)
        self.blob_count += count - len(twice)
        self.counting = False
        self._during = {}
        metrics.DISK_BYTES.set(self.used_bytes)
        metrics.DISK_BLOBS.set(self.blob_count)

    async def count(self) -> None:
        """Count the committed files in a worker thread while the proxy serves; until
        it ends ``counting`` is True and ``used_bytes`` holds only what changed since
        start. Removals wait for it (``Evictor``), so only commits race the walk."""
        self._counted(*await asyncio.to_thread(self._count_sync))

    def list_committed(self) -> list[tuple[Digest, float, int]]:
        """(digest, mtime, size) of every committed blob. Blocking: run it in a thread."""
        found = []
        for path in self._blobs.glob("*/*/*"):
            try:
                st = path.stat()
            except FileNotFoundError:
                continue
            found.append((Digest(path.parent.parent.name, path.name), st.st_mtime, st.st_size))
        return found

    def writable(self) -> bool:
        """Whether a temp file can be created (readiness check). Blocking."""
        try:
            fd, name = tempfile.mkstemp(dir=self._tmp, suffix=PART_SUFFIX)
        except OSError:
            return False
        os.close(fd)
        os.unlink(name)
        return True

    def path(self, digest: Digest) -> Path:
        return self._blobs / digest.algorithm / digest.hex[:2] / digest.hex

    async def stat(self, digest: Digest) -> Descriptor:
        """The committed blob's descriptor; raises BlobUnknown when it is absent.

        Also the eviction's record of use, reported to ``on_use`` (in memory).
        """
        try:
            st = os.stat(self.path(digest))
        except FileNotFoundError:
            raise BlobUnknown(f"blob {digest} is not cached") from None
        if self.on_use is not None:
            self.on_use(digest)
        return Descriptor(digest, st.st_size)

    async def read(self, digest: Digest, limit: int) -> bytes:
        def _read() -> bytes:
            with open(self.path(digest), "rb") as f:
                data = f.read(limit + 1)
            return data

        try:
            data = await asyncio.to_thread(_read)
        except FileNotFoundError:
            raise BlobUnknown(f"blob {digest} is not cached") from None
        if len(data) > limit:
            raise TooLarge(f"blob {digest} is larger than {limit} bytes")
        return data

    async def create(self, digest: Digest) -> BlobWriter:
        name = f"{digest.hex}.{secrets.token_hex(4)}{PART_SUFFIX}"
        temp = self._tmp / name
        fd = await asyncio.to_thread(os.open, temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        return DiskBlobWriter(self, digest, temp, fd)

    async def delete(self, digest: Digest) -> None:
        def _delete() -> int:
            path = self.path(digest)
            size = path.stat().st_size
            path.unlink()
            return size

        try:
            size = await asyncio.to_thread(_delete)
        except FileNotFoundError:
            return
        self._added(-size, -1)

    async def quarantine(self, digest: Digest, folder: Path) -> Path | None:
        """Move a committed blob out of the store into ``folder`` (a corrupt file kept for
        the operator to inspect); None when it is already gone."""

        def _move() -> tuple[Path, int]:
            folder.mkdir(parents=True, exist_ok=True)
            path = self.path(digest)
            size = path.stat().st_size
            dest = folder / f"{digest.algorithm}-{digest.hex}"
            os.replace(path, dest)
            return dest, size

        try:
            dest, size = await asyncio.to_thread(_move)
        except FileNotFoundError:
            return None
        self._added(-size, -1)
        return dest

    def _added(self, size: int, count: int = 1, digest: Digest | None = None) -> None:
        self.used_bytes += size
        self.blob_count += count
        if self.counting and digest is not None and size > 0:
            self._during[digest] = size
        metrics.DISK_BYTES.set(self.used_bytes)
        metrics.DISK_BLOBS.set(self.blob_count)

    async def put(self, digest: Digest, data: bytes) -> Descriptor:
        """Store a small blob held in memory (a manifest) with the same verify-then-rename."""
        writer = await self.create(digest)
        try:
            await writer.write(data)
            return await writer.commit(Descriptor(digest, len(data)))
        finally:
            await writer.cancel()


class DiskBlobWriter(BlobWriter):
    """Writes one blob: hashing and writing run together in a worker thread."""

    def __init__(self, store: DiskBlobStore, digest: Digest, temp: Path, fd: int) -> None:
        self._store = store
        self._digest = digest
        self._temp = temp
        self._fd: int | None = fd
        self._hasher = digest.hasher()
        self._written = 0
        self._committed = False
        # commit and cancel run in worker threads; a task cancelled during commit runs
        # cancel concurrently: the lock keeps them from closing the descriptor twice.
        self._lock = threading.Lock()

    @property
    def temp_path(self) -> Path:
        return self._temp

    @property
    def written(self) -> int:
        return self._written

    def _write_sync(self, chunks: tuple[bytes, ...]) -> None:
        with self._lock:
            self._write_locked(chunks)

    def _write_locked(self, chunks: tuple[bytes, ...]) -> None:
        if self._fd is None:
            raise UpstreamUnavailable("blob ingest was cancelled")
        for chunk in chunks:
            self._hasher.update(chunk)
        pending = [memoryview(c) for c in chunks if c]
        while pending:
            n = os.writev(self._fd, pending)
            while pending and n >= len(pending[0]):
                n -= len(pending[0])
                pending.pop(0)
            if pending and n:
                pending[0] = pending[0][n:]

    async def write(self, *chunks: bytes) -> None:
        await asyncio.to_thread(self._write_sync, chunks)
        self._written += sum(len(c) for c in chunks)

    def _check(self, expected: Descriptor) -> None:
        """Raise DigestMismatch (and drop the temp file) unless digest and size match."""
        actual = Digest(expected.digest.algorithm, self._hasher.hexdigest())
        if actual != expected.digest or self._written != expected.size:
            metrics.DIGEST_MISMATCHES.inc()
            self._cancel_locked()
            raise DigestMismatch(
                f"upstream content does not match {expected.digest}",
                detail={
                    "expected": {"digest": str(expected.digest), "size": expected.size},
                    "actual": {"digest": str(actual), "size": self._written},
                },
            )

    def _verify_sync(self, expected: Descriptor) -> None:
        with self._lock:
            if self._fd is None:
                raise UpstreamUnavailable("blob ingest was cancelled")
            self._check(expected)

    async def verify(self, expected: Descriptor) -> None:
        await asyncio.to_thread(self._verify_sync, expected)

    def _commit_sync(self, expected: Descriptor) -> tuple[Descriptor, bool]:
        with self._lock:
            return self._commit_locked(expected)

    def _commit_locked(self, expected: Descriptor) -> tuple[Descriptor, bool]:
        """Returns the descriptor and whether the file is new (not a replacement)."""
        if self._fd is None:
            raise UpstreamUnavailable("blob ingest was cancelled")
        self._check(expected)
        os.fsync(self._fd)
        os.close(self._fd)
        self._fd = None
        final = self._store.path(expected.digest)
        final.parent.mkdir(parents=True, exist_ok=True)
        replaced = final.exists()
        os.rename(self._temp, final)
        self._committed = True
        return Descriptor(expected.digest, self._written, expected.media_type), not replaced

    async def commit(self, expected: Descriptor) -> Descriptor:
        descriptor, new = await asyncio.to_thread(self._commit_sync, expected)
        if new:
            self._store._added(descriptor.size, 1, descriptor.digest)
        if self._store.on_commit is not None:
            self._store.on_commit()
        return descriptor

    def _cancel_sync(self) -> None:
        with self._lock:
            self._cancel_locked()

    def _cancel_locked(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        if not self._committed:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._temp)

    async def cancel(self) -> None:
        # Shielded: cleanup must finish even when the task that owns it is cancelled.
        await asyncio.shield(asyncio.to_thread(self._cancel_sync))


class DiskDescriptorService(BlobDescriptorService):
    """The bottom of the descriptor chain: the committed file is the record.

    ``stat`` looks at the disk; ``set_descriptor`` has nothing to add (commit wrote the
    file) and ``clear`` forgets nothing (removing content is eviction's job, not a cache's).
    """

    def __init__(self, store: DiskBlobStore) -> None:
        self._store = store

    async def stat(self, digest: Digest) -> Descriptor:
        return await self._store.stat(digest)

    async def set_descriptor(self, digest: Digest, descriptor: Descriptor) -> None:
        return None

    async def clear(self, digest: Digest) -> None:
        return None
