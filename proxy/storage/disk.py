"""Content-addressed blob store on local disk.

Layout under the cache directory::

    blobs/<algorithm>/<first two hex>/<hex>   committed content, complete by construction
    tmp/<hex>.<random>.part                   ingest in progress; removed at start-up
    tmp/<hex>.part, tmp/<hex>.meta            a fetch shared by workers (proxy.storage.claims)

A blob is written to ``tmp/``, hashed while it streams, verified against the digest and
size it was asked for, fsynced and renamed into ``blobs/``: a file under its final name
is always complete, and a crash leaves at worst a ``.part`` file that the next start
removes. Blocking file calls run in the default executor, except ``stat`` of a committed
blob, a metadata call that costs less than the thread hop.

Every temp file is under ``flock`` while its writer has it open, so that start-up (and a
worker restarting beside live ones) removes only what no live process is writing.

A blob's last use is not written to the file (no ``utime`` per request): ``stat`` reports
it to ``on_use`` (the index's in-memory access times, flushed in batches); a file's
mtime is its commit time.

Free space. No new write starts when the filesystem's free space, less what writes in
progress are still to write, would fall under ``min_free`` (``cache.min_free``): such a
writer has no file and only hashes. A write that fails (ENOSPC, EIO, EDQUOT...) drops
its temp file, raises ``CacheWriteFailed`` once and then only hashes too, so the caller
can still verify what it streams to its clients; either writer refuses to commit. Each
failure calls ``on_space_needed`` (eviction hooks in there as well).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import secrets
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path

from proxy import metrics
from proxy.errors import (
    BlobUnknown,
    CacheWriteFailed,
    DigestMismatch,
    TooLarge,
    UpstreamUnavailable,
)
from proxy.interfaces import BlobDescriptorService, BlobStore, BlobWriter, BlockingBlobWriter
from proxy.model import Descriptor, Digest
from proxy.storage.claims import Claim, FetchClaims, remove_unlocked

log = logging.getLogger(__name__)

BLOBS_DIR = "blobs"
TMP_DIR = "tmp"
PART_SUFFIX = ".part"
MIN_FREE_CAP_BYTES = 1 << 30
MIN_FREE_CAP_SHARE = 0.05
"""Without ``min_free``: keep the smaller of 1 GiB and 5 % of the filesystem free."""
WRITE_SLICE = 256 << 10
"""The most one write(2) to a temp file carries. The kernel sizes a new page-cache folio
by the write: a write of 2 MiB or more gets huge folios, which on this VM (and any guest
whose free memory the host takes back) cost 2.9-3.6 s of kernel time per GiB to fill,
against 0.3-0.8 s for writes of 16 KiB to 1 MiB (bench/README.md)."""
IOV_MAX = os.sysconf("SC_IOV_MAX")
"""The most pieces one writev(2) takes (1024 on Linux)."""


class DiskBlobStore(BlobStore):
    def __init__(self, root: Path, *, min_free: int | float | None = None) -> None:
        self.root = root
        self._blobs = root / BLOBS_DIR
        self._tmp = root / TMP_DIR
        self.used_bytes = 0
        self.blob_count = 0
        self.counting = False
        """True while ``count`` walks the store after start (used_bytes is partial)."""
        self._during: dict[Digest, int] = {}
        self.min_free = min_free
        """Bytes, a share of the filesystem (a float), or None for the default."""
        self._writers: set[DiskBlobWriter] = set()
        self._writers_lock = threading.Lock()  # added on the loop, summed in threads
        self.on_commit: Callable[[], None] | None = None
        """Called on the event loop after each commit (eviction hooks in here)."""
        self.on_space_needed: Callable[[], None] | None = None
        """Called on the event loop when a write failed or could not start for space."""
        self.on_use: Callable[[Digest], None] | None = None
        """Called by ``stat`` of a committed blob: its use, for eviction's recency."""
        self.claims = FetchClaims(self._tmp, self.path)
        self.publishes_usage = True
        """Whether this process sets the disk usage gauges (workers: only the one doing
        maintenance, whose count includes the others' commits)."""

    def open_store(self) -> None:
        """``prepare`` and count what is stored, in one go. Blocking: run it in a thread.
        (The registry instead counts in the background: ``count``.)"""
        self.prepare()
        self._counted(*self._count_sync())

    def prepare(self, *, remove_leftovers: bool = True) -> None:
        """Create the directories and remove the temp files a previous run left behind
        (those no live process holds a lock on). Blocking, and quick whatever the store
        holds: it never walks ``blobs/``."""
        self._blobs.mkdir(parents=True, exist_ok=True)
        self._tmp.mkdir(parents=True, exist_ok=True)
        removed = 0
        leftovers = list(self._tmp.iterdir()) if remove_leftovers else []
        for leftover in leftovers:
            if leftover.name.endswith(PART_SUFFIX) and remove_unlocked(leftover):
                removed += 1
        for leftover in leftovers:
            if leftover.name.endswith(PART_SUFFIX):
                continue
            # A fetch's meta file (or its half-written temp) outlives its data file only
            # when the fetch is gone.
            data = self._tmp / (leftover.name.split(".")[0] + PART_SUFFIX)
            if not data.exists():
                with contextlib.suppress(FileNotFoundError, IsADirectoryError):
                    leftover.unlink()
                    removed += 1
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
        self._publish_usage()

    def _publish_usage(self) -> None:
        if self.publishes_usage:
            metrics.DISK_BYTES.set(self.used_bytes)
            metrics.DISK_BLOBS.set(self.blob_count)

    def recounted(self, count: int, size: int) -> None:
        """A fresh walk of the store found ``count`` files of ``size`` bytes (workers:
        the others' commits and removals are seen this way)."""
        if not self.counting:
            self.used_bytes, self.blob_count = size, count
            self._publish_usage()

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

    def space(self) -> tuple[int, int]:
        """(free bytes for new writes, the ``min_free`` threshold in bytes) of the cache's
        filesystem: free space less what writes in progress are still to write. Blocking
        (one statvfs); updates the disk-space metrics."""
        st = os.statvfs(self.root)
        total = st.f_blocks * st.f_frsize
        if self.min_free is None:
            threshold = min(MIN_FREE_CAP_BYTES, int(total * MIN_FREE_CAP_SHARE))
        elif isinstance(self.min_free, float):
            threshold = int(total * self.min_free)
        else:
            threshold = self.min_free
        free = st.f_bavail * st.f_frsize
        with self._writers_lock:
            free -= sum(w.remaining for w in self._writers)
        metrics.DISK_FREE_BYTES.set(max(free, 0))
        metrics.DISK_MIN_FREE_BYTES.set(threshold)
        metrics.DISK_LOW_SPACE.set(1 if free < threshold else 0)
        return free, threshold

    def low_on_space(self) -> bool:
        """Whether free space is under ``min_free`` (no new write starts). Blocking."""
        free, threshold = self.space()
        return free < threshold

    def _space_needed(self) -> None:
        if self.on_space_needed is not None:
            self.on_space_needed()

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

    async def create(
        self, digest: Digest, size: int | None = None, *, claim: Claim | None = None
    ) -> BlobWriter:
        """A writer for ``digest`` (``size`` bytes when known); one without a file (it only
        hashes, ``failure`` says why) when the space is short or the file cannot be made.

        With an owned ``claim`` (workers) the writer writes the claimed file, after the
        ``claim.offset`` bytes already in it (hashed first): a dead owner's fetch goes on."""
        name = f"{digest.hex}.{secrets.token_hex(4)}{PART_SUFFIX}"
        temp = self._tmp / name if claim is None else claim.path
        offset = 0 if claim is None else claim.offset

        def _create() -> int | CacheWriteFailed:
            free, threshold = self.space()
            if free - max((size or 0) - offset, 0) < threshold:
                return CacheWriteFailed(
                    f"{max(free, 0)} bytes free, {threshold} kept free (cache.min_free)",
                    reason="low_space",
                )
            try:
                if claim is not None:
                    assert claim.fd is not None and claim.owned
                    fd = os.dup(claim.fd)  # the claim's descriptor keeps the lock
                    os.lseek(fd, offset, os.SEEK_SET)
                    os.ftruncate(fd, offset)
                    return fd
                fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # live: prepare keeps it
                return fd
            except OSError as exc:
                return CacheWriteFailed(
                    f"cannot create a temp file: {exc.strerror}",
                    reason="write_error",
                    errno=exc.errno,
                )

        created = await asyncio.to_thread(_create)
        if isinstance(created, CacheWriteFailed):
            self._space_needed()
            return DiskBlobWriter(self, digest, None, None, failure=created)
        writer = DiskBlobWriter(self, digest, temp, created, size=size)
        if offset:
            await asyncio.to_thread(writer.absorb, offset)
        with self._writers_lock:
            self._writers.add(writer)
        return writer

    def _writer_done(self, writer: DiskBlobWriter) -> None:
        with self._writers_lock:
            self._writers.discard(writer)

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
        self._publish_usage()

    async def put(self, digest: Digest, data: bytes) -> Descriptor:
        """Store a small blob held in memory (a manifest) with the same verify-then-rename;
        raises ``CacheWriteFailed`` when the cache cannot take it."""
        writer = await self.create(digest)
        try:
            await writer.write(data)
            return await writer.commit(Descriptor(digest, len(data)))
        finally:
            await writer.cancel()


class DiskBlobWriter(BlobWriter, BlockingBlobWriter):
    """Writes one blob: hashing and writing run together in a worker thread (``write``),
    or apart, each in a thread of the caller's (``write_blocking``, ``hash_blocking``).

    Without a file (``temp`` None: never started, or dropped after a failed write) it only
    hashes; ``failure`` says why, and ``commit`` raises it.
    """

    def __init__(
        self,
        store: DiskBlobStore,
        digest: Digest,
        temp: Path | None,
        fd: int | None,
        *,
        size: int | None = None,
        failure: CacheWriteFailed | None = None,
    ) -> None:
        self._store = store
        self._digest = digest
        self._temp = temp
        self._fd: int | None = fd
        self._hasher = digest.hasher()
        self._written = 0
        self._size = size
        self._committed = False
        self._cancelled = False
        self.failure = failure
        # commit and cancel run in worker threads; a task cancelled during commit runs
        # cancel concurrently: the lock keeps them from closing the descriptor twice.
        self._lock = threading.Lock()

    @property
    def temp_path(self) -> Path | None:
        return None if self.failure is not None else self._temp

    @property
    def written(self) -> int:
        return self._written

    @property
    def remaining(self) -> int:
        """Bytes still to be written of the announced size (what free space must hold)."""
        if self._size is None or self._fd is None:
            return 0
        return max(self._size - self._written, 0)

    def absorb(self, offset: int) -> None:
        """Hash the ``offset`` bytes already in the file (a fetch continued from there).
        Blocking."""
        assert self._fd is not None
        position = 0
        while position < offset:
            data = os.pread(self._fd, min(1 << 20, offset - position), position)
            if not data:
                raise UpstreamUnavailable("claimed temp file shorter than it was")
            self._hasher.update(data)
            position += len(data)
        self._written = offset

    def _write_sync(self, chunks: tuple[bytes, ...]) -> CacheWriteFailed | None:
        with self._lock:
            return self._write_locked(chunks)

    def _write_locked(self, chunks: tuple[bytes, ...]) -> CacheWriteFailed | None:
        if self._cancelled:
            raise UpstreamUnavailable("blob ingest was cancelled")
        for chunk in chunks:
            self._hasher.update(chunk)
        if self.failure is not None:
            return None  # no file: hashing only
        assert self._fd is not None
        try:
            _write_all(self._fd, [memoryview(c) for c in chunks])
        except OSError as exc:
            self.failure = CacheWriteFailed(
                f"writing the cache failed: {exc.strerror}", reason="write_error", errno=exc.errno
            )
            self._drop_file_locked()
            return self.failure
        return None

    def write_blocking(self, data: memoryview) -> CacheWriteFailed | None:
        with self._lock:
            if self._cancelled:
                raise UpstreamUnavailable("blob ingest was cancelled")
            if self.failure is not None:
                return None
            assert self._fd is not None
            try:
                _write_all(self._fd, [data])
            except OSError as exc:
                self.failure = CacheWriteFailed(
                    f"writing the cache failed: {exc.strerror}",
                    reason="write_error",
                    errno=exc.errno,
                )
                self._drop_file_locked()
                return self.failure
            return None

    def hash_blocking(self, data: memoryview) -> None:
        # Not under the lock: only the one hashing thread touches the hasher until
        # verify, which runs after it stopped; cancel does not touch it.
        self._hasher.update(data)
        self._written += len(data)

    def write_failed(self) -> None:
        self._store._writer_done(self)
        self._store._space_needed()

    async def write(self, *chunks: bytes) -> None:
        """Append and hash ``chunks``; raises ``CacheWriteFailed`` once, when the write
        fails (the temp file is dropped); later calls only hash."""
        try:
            failed = await asyncio.to_thread(self._write_sync, chunks)
        finally:
            self._written += sum(len(c) for c in chunks)
        if failed is not None:
            self._store._writer_done(self)
            self._store._space_needed()
            raise failed

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
            if self._cancelled:
                raise UpstreamUnavailable("blob ingest was cancelled")
            self._check(expected)

    async def verify(self, expected: Descriptor) -> None:
        await asyncio.to_thread(self._verify_sync, expected)

    def _commit_sync(self, expected: Descriptor) -> tuple[Descriptor, bool]:
        with self._lock:
            return self._commit_locked(expected)

    def _commit_locked(self, expected: Descriptor) -> tuple[Descriptor, bool]:
        """Returns the descriptor and whether the file is new (not a replacement)."""
        if self._cancelled:
            raise UpstreamUnavailable("blob ingest was cancelled")
        self._check(expected)  # wrong bytes are refused before anything else is said
        if self.failure is not None:
            raise self.failure
        assert self._fd is not None and self._temp is not None
        try:
            os.fsync(self._fd)
            os.close(self._fd)
            self._fd = None
            final = self._store.path(expected.digest)
            final.parent.mkdir(parents=True, exist_ok=True)
            replaced = final.exists()
            os.rename(self._temp, final)
        except OSError as exc:
            self.failure = CacheWriteFailed(
                f"committing to the cache failed: {exc.strerror}",
                reason="write_error",
                errno=exc.errno,
            )
            self._drop_file_locked()
            raise self.failure from None
        self._committed = True
        return Descriptor(expected.digest, self._written, expected.media_type), not replaced

    async def commit(self, expected: Descriptor) -> Descriptor:
        try:
            descriptor, new = await asyncio.to_thread(self._commit_sync, expected)
        except CacheWriteFailed:
            self._store._space_needed()
            raise
        finally:
            self._store._writer_done(self)
        if new:
            self._store._added(descriptor.size, 1, descriptor.digest)
        if self._store.on_commit is not None:
            self._store.on_commit()
        return descriptor

    def _cancel_sync(self) -> None:
        with self._lock:
            self._cancel_locked()

    def _cancel_locked(self) -> None:
        self._cancelled = True
        self._drop_file_locked()

    def _drop_file_locked(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = None
        if not self._committed and self._temp is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._temp)

    async def cancel(self) -> None:
        self._store._writer_done(self)
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


def _write_all(fd: int, views: list[memoryview]) -> None:
    """Append ``views`` to ``fd`` in writes of at most ``WRITE_SLICE`` bytes and
    ``IOV_MAX`` pieces (small views go together in one ``writev``, a big one is cut)."""
    batch: list[memoryview] = []
    size = 0
    for view in views:
        while view:
            part, view = view[: WRITE_SLICE - size], view[WRITE_SLICE - size :]
            batch.append(part)
            size += len(part)
            if size == WRITE_SLICE or len(batch) == IOV_MAX:
                _writev_all(fd, batch)
                batch, size = [], 0
    if batch:
        _writev_all(fd, batch)


def _writev_all(fd: int, pending: list[memoryview]) -> None:
    """``writev`` until every byte of ``pending`` is written (short writes go on)."""
    while pending:
        n = os.writev(fd, pending)
        while pending and n >= len(pending[0]):
            n -= len(pending[0])
            pending.pop(0)
        if pending and n:
            pending[0] = pending[0][n:]
