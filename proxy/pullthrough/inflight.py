"""One upstream fetch per blob, however many clients ask for it at once.

Protocol:

* ``InflightBlobFetches.join(digest, opener)`` returns the ``BlobFetch`` in progress for
  the digest or starts one. Check-and-insert happens without an ``await`` in between, so
  two requests on the event loop can never start two fetches for one digest.
* The fetch runs in a task owned by this registry (hence by the application), not by any
  request: a client hanging up never cancels it. It streams the upstream body into a
  temp file (hashing as it goes, in worker threads: a plain-HTTP body is received,
  written and hashed off the event loop by ``proxy.pullthrough.pump``), then verifies
  digest and size, fsyncs, renames into place and records the descriptor.
* Every client, the first included, follows the growing temp file from its own offset
  (``BlobFetch.read``): bytes reach all of them as they arrive from upstream, except
  the last byte, which waits for the digest check.
* On an upstream failure or a digest mismatch nothing is committed, the temp file is
  removed, and every reader's iterator raises, so the API layer aborts connections
  that already sent headers instead of finishing a complete-looking 200.
* A fetch is removed from the registry when it ends; a later miss starts a new one.

Pass-through. When the cache cannot take the blob (the store's writer has no file: free
space under ``cache.min_free``; or a write fails with ENOSPC, EIO, EDQUOT...), the fetch
does not fail: it goes on streaming from the upstream response, and what the file does
not hold is kept in memory for the readers:

* The temp file stops growing at ``written``; the fetch keeps a read descriptor of it
  (the file itself is unlinked), so a reader behind that point still reads it from disk,
  then goes on with the chunks in memory.
* Memory is bounded: at most ``PASSTHROUGH_WINDOW`` bytes past the slowest reader. When
  the window is full the fetch waits for readers before it reads on from the upstream
  (a reader that stops reading altogether is cut off by the server's send timeout).
  Chunks no reader needs are dropped.
* The bytes are still hashed (by the writer, which now only hashes) and the last byte
  still waits for the digest check; nothing is committed.
* The fetch leaves the registry at once, so a later miss starts a fetch of its own
  instead of joining one whose first bytes may be gone from memory.
* It is counted (``passthrough_fetches_total``), logged once, and the store's
  ``on_space_needed`` starts an eviction pass.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import logging
import os
from collections import deque
from collections.abc import AsyncGenerator, Callable
from contextlib import AbstractAsyncContextManager, suppress
from typing import BinaryIO

from proxy import metrics
from proxy.errors import CacheWriteFailed, UpstreamUnavailable
from proxy.interfaces import (
    ArrivingBlob,
    BlobDescriptorService,
    BlobStore,
    BlobWriter,
    BlockingBlobWriter,
    DetachableBlob,
    UpstreamBlob,
)
from proxy.model import Descriptor, Digest
from proxy.pullthrough.pump import pump

log = logging.getLogger(__name__)

READ_CHUNK = 1 << 20
WRITE_BATCH = 1 << 20
DEFAULT_FETCH_TIMEOUT = 3600.0
PASSTHROUGH_WINDOW = 8 << 20
"""Bytes a pass-through fetch holds in memory past its slowest reader."""

BlobOpener = Callable[[], AbstractAsyncContextManager[UpstreamBlob]]
Span = tuple[BinaryIO, int, int] | memoryview


class BlobFetch(ArrivingBlob):
    """State of one in-progress fetch, shared by its readers."""

    def __init__(
        self, digest: Digest, store: BlobStore, origin: tuple[str, str] = ("", "")
    ) -> None:
        self.digest = digest
        self._store = store
        self.origin = origin
        self.size: int | None = None
        self.written = 0
        """Bytes in the temp file: readers may read ``[0, written)`` from it."""
        self.end = 0
        """Bytes received that readers may have (in the file, then in memory)."""
        self.temp_path: os.PathLike[str] | None = None
        self.passthrough: str | None = None
        """Why the rest is not cached (``write_error``, ``low_space``); None while it is."""
        self._fd: int | None = None  # the fetch's read descriptor of the temp file
        self._memory: deque[tuple[int, bytes]] = deque()  # (offset, chunk), contiguous
        self._memory_start = 0
        self._memory_bytes = 0
        self._cursors: dict[int, int] = {}  # reader -> the next offset it needs
        self._reader_ids = itertools.count()
        self._consumed = asyncio.Event()
        self.ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.done: asyncio.Future[Descriptor] = asyncio.get_running_loop().create_future()
        self._progress = asyncio.Event()
        self.readers = 0
        self.verified = False
        """Digest and size checked: the whole body may go out (fsync and rename follow)."""

    def _notify(self) -> None:
        event, self._progress = self._progress, asyncio.Event()
        event.set()

    async def wait_done(self) -> Descriptor:
        descriptor = await asyncio.shield(self.done)
        if self.passthrough is not None:
            raise CacheWriteFailed(
                f"blob {self.digest} was served but not cached", reason=self.passthrough
            )
        return descriptor

    def _notify_consumed(self) -> None:
        event, self._consumed = self._consumed, asyncio.Event()
        event.set()

    async def wait_ready(self) -> None:
        """Wait for the upstream's headers; raises the fetch's error if it failed first."""
        await asyncio.shield(self.ready)

    # --- the fetch's side ---------------------------------------------------------------

    def attach(self, temp_path: os.PathLike[str] | None) -> None:
        """The writer's temp file (None: pass-through from the start); opened once for
        reading here, so readers can follow it even after it is unlinked."""
        self.temp_path = temp_path
        if temp_path is not None:
            self._fd = os.open(temp_path, os.O_RDONLY)

    def file_grew(self, size: int) -> None:
        self.written += size
        self.end = self.written
        self._notify()

    def stop_caching(self, reason: str) -> None:
        """The file stops growing at ``written``; from now on bytes are held in memory."""
        self.passthrough = reason
        self._memory_start = self.end = self.written

    async def hold(self, chunk: bytes) -> None:
        """Keep ``chunk`` for the readers (pass-through); waits while the window is full.
        Never past the announced size: what is beyond it fails the size check anyway."""
        if self.size is not None and self.end + len(chunk) > self.size:
            chunk = chunk[: max(self.size - self.end, 0)]
        self._memory.append((self.end, chunk))
        self.end += len(chunk)
        self._memory_bytes += len(chunk)
        self._notify()
        self._trim()
        while self._memory_bytes > PASSTHROUGH_WINDOW:
            consumed = self._consumed
            await consumed.wait()
            self._trim()

    def _trim(self) -> None:
        """Drop the chunks no reader needs, oldest first, while over the window."""
        low = min(self._cursors.values(), default=None)
        while self._memory and self._memory_bytes > PASSTHROUGH_WINDOW:
            start, chunk = self._memory[0]
            if low is not None and start + len(chunk) > low:
                return
            self._memory.popleft()
            self._memory_start = start + len(chunk)
            self._memory_bytes -= len(chunk)

    def close_file(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)

    # --- the readers' side --------------------------------------------------------------

    async def spans(self, offset: int = 0) -> AsyncGenerator[Span, None]:
        """The blob's bytes from ``offset`` to the end as they arrive: (file, offset,
        length) of what the temp file holds, then the bytes themselves (memoryviews) when
        the fetch went pass-through; raises the fetch's error if it fails.

        The caller sends each span (``loop.sendfile`` or ``write``) before asking for the
        next. Must be called after ``wait_ready``. The file is opened once (a duplicate of
        the fetch's descriptor): a later rename (commit) or unlink does not affect it.
        """
        file = self._open()
        key = next(self._reader_ids)
        self._cursors[key] = offset
        self.readers += 1
        metrics.INFLIGHT_READERS.inc()
        try:
            while True:
                if self.done.done():
                    self.done.result()  # raises the fetch's error, if any
                # The last byte is held back until the digest is verified, so a client
                # never receives a complete body that turns out to be wrong.
                complete = self.verified or self.done.done()
                available = self.end if complete else self.end - 1
                if offset < available:
                    if offset < self.written:
                        if file is None:
                            raise UpstreamUnavailable("blob temp file is gone")
                        length = min(available, self.written) - offset
                        yield file, offset, length
                    else:
                        view = self._from_memory(offset, available)
                        length = len(view)
                        yield view
                    offset += length
                    self._cursors[key] = offset
                    self._notify_consumed()
                    continue
                if complete:
                    return
                await self._progress.wait()
        finally:
            del self._cursors[key]
            self._notify_consumed()
            self.readers -= 1
            metrics.INFLIGHT_READERS.dec()
            if file is not None:
                file.close()

    def _from_memory(self, offset: int, limit: int) -> memoryview:
        if offset < self._memory_start:
            raise UpstreamUnavailable("reader fell behind the pass-through window")
        for start, chunk in self._memory:
            if start <= offset < start + len(chunk):
                return memoryview(chunk)[offset - start : min(len(chunk), limit - start)]
        raise UpstreamUnavailable("blob bytes are no longer held")

    async def read(self, offset: int = 0) -> AsyncGenerator[bytes, None]:
        """The blob's bytes from ``offset`` as they arrive, in chunks of at most
        ``READ_CHUNK``; raises if the fetch fails (see ``spans``)."""
        async for span in self.spans(offset):
            if isinstance(span, memoryview):
                yield bytes(span)
                continue
            file, start, length = span
            end = start + length
            while start < end:
                data = await asyncio.to_thread(
                    os.pread, file.fileno(), min(READ_CHUNK, end - start), start
                )
                if not data:
                    raise UpstreamUnavailable("blob temp file shorter than announced")
                start += len(data)
                yield data

    def _open(self) -> BinaryIO | None:
        """A descriptor of the blob's file: the fetch's own (duplicated) while it runs,
        else the committed file; None when there is no file (pass-through from the
        start)."""
        if self._fd is not None:
            return os.fdopen(os.dup(self._fd), "rb", buffering=0)
        if self.written == 0 and self.passthrough is not None:
            return None
        try:
            return os.fdopen(os.open(self._store.path(self.digest), os.O_RDONLY), "rb", buffering=0)
        except FileNotFoundError:
            if self.done.done():
                self.done.result()
            raise UpstreamUnavailable("blob fetch ended before it could be read") from None


class InflightBlobFetches:
    """The application's registry of blob fetches in progress, keyed by digest."""

    def __init__(
        self,
        store: BlobStore,
        descriptors: BlobDescriptorService,
        *,
        timeout: float = DEFAULT_FETCH_TIMEOUT,
    ) -> None:
        self._store = store
        self._descriptors = descriptors
        self._timeout = timeout
        self._fetches: dict[Digest, BlobFetch] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    def get(self, digest: Digest) -> BlobFetch | None:
        return self._fetches.get(digest)

    def join(
        self, digest: Digest, opener: BlobOpener, origin: tuple[str, str] = ("", "")
    ) -> tuple[BlobFetch, bool]:
        """The fetch in progress for ``digest`` (and True), or a new one started with
        ``opener`` (and False). ``origin`` (upstream, repository) is what the new fetch
        asks upstream for; a joiner from elsewhere must prove its own access first."""
        fetch = self._fetches.get(digest)
        if fetch is not None:
            metrics.COALESCED.labels("blob").inc()
            return fetch, True
        fetch = BlobFetch(digest, self._store, origin)
        self._fetches[digest] = fetch
        task = asyncio.create_task(self._run(fetch, opener), name=f"fetch {digest}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return fetch, False

    async def wait_idle(self) -> None:
        """Wait until every fetch running now has ended (committed or failed)."""
        tasks = list(self._tasks)
        if tasks:
            await asyncio.wait(tasks)

    async def settle(self, within: float) -> None:
        """Let fetches whose bytes are all in and verified finish committing (shutdown:
        their bytes are worth keeping), for up to ``within`` seconds."""
        committing = [fetch.done for fetch in self._fetches.values() if fetch.verified]
        if committing:
            await asyncio.wait(committing, timeout=within)

    async def close(self) -> None:
        """Cancel every fetch (application shutdown); temp files are removed."""
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with suppress(asyncio.CancelledError):
                await task
        error = UpstreamUnavailable("fetch cancelled")
        for fetch in list(self._fetches.values()):
            for fut in (fetch.ready, fetch.done):
                if not fut.done():
                    fut.set_exception(error)
                    fut.exception()
            fetch._notify()
        self._fetches.clear()

    def _pass_through(self, fetch: BlobFetch, failure: CacheWriteFailed) -> None:
        """The cache cannot take the rest of ``fetch``: stream it on from memory."""
        fetch.stop_caching(failure.reason)
        if self._fetches.get(fetch.digest) is fetch:
            del self._fetches[fetch.digest]  # later misses start their own fetch
        metrics.PASSTHROUGH_FETCHES.labels(failure.reason).inc()
        log.warning(
            "not caching blob, serving it pass-through: %s",
            failure.message,
            extra={"digest": str(fetch.digest), "written": fetch.written},
        )

    async def _copy(self, upstream: UpstreamBlob, writer: BlobWriter, fetch: BlobFetch) -> None:
        """Upstream body into the temp file, hashed and written.

        A plain-HTTP body is read, written and hashed by threads of its own, off the
        event loop (``proxy.pullthrough.pump``); any other body (TLS, a peer's, one that
        the pump gave back after a cut, a fetch that is pass-through from the start)
        goes through ``_copy_chunks``, from wherever the pump stopped.
        """
        if (
            fetch.passthrough is None
            and isinstance(upstream, DetachableBlob)
            and isinstance(writer, BlockingBlobWriter)
        ):
            body = upstream.detach()
            if body is not None:
                on_failure = functools.partial(self._pass_through, fetch)
                if await pump(body, writer, fetch, on_failure):
                    return
        await self._copy_chunks(upstream, writer, fetch)

    async def _copy_chunks(
        self, upstream: UpstreamBlob, writer: BlobWriter, fetch: BlobFetch
    ) -> None:
        """Upstream chunks into the temp file, hashed and written in a worker thread.

        Writes overlap reads: while one write runs, what arrives meanwhile is gathered
        and written next in one go (up to ``WRITE_BATCH`` bytes before the reader waits
        for the write), so an idle disk sees each chunk at once and a busy one gets fewer,
        larger writes. At most one write and one batch are held in memory.
        ``fetch.written`` only counts bytes that are in the file: readers rely on it.

        Pass-through (the writer has no file, or a write failed): each chunk is held for
        the readers as it arrives, and the writer goes on hashing it. The chunks of the
        write that failed, and those gathered since, are held first.
        """
        batch: list[bytes] = []
        batched = 0
        pending: asyncio.Future[None] | None = None
        pending_chunks: list[bytes] = []  # those of the latest write

        def start_write() -> None:
            nonlocal pending, batch, batched, pending_chunks
            size = batched
            write = pending = asyncio.ensure_future(writer.write(*batch))
            pending_chunks, batch, batched = batch, [], 0

            def written(task: asyncio.Future[None]) -> None:
                if task.cancelled() or task.exception() is not None:
                    return  # awaited by settle(), which sees the error
                if fetch.passthrough is None:
                    fetch.file_grew(size)
                # What arrived meanwhile goes to disk now, not when the next chunk comes:
                # an upstream that pauses must not hold back bytes the readers could have.
                if batch and pending is write:
                    start_write()

            write.add_done_callback(written)

        async def settle() -> None:
            nonlocal pending
            current = pending
            assert current is not None
            try:
                await current  # raises the write's error
            except CacheWriteFailed as failure:
                self._pass_through(fetch, failure)
                for chunk in (*pending_chunks, *batch):
                    await fetch.hold(chunk)
            finally:
                if pending is current:
                    pending = None

        received = fetch.end  # more than 0 when it goes on after the pump
        try:
            async for chunk in upstream.chunks():
                batch.append(chunk)
                batched += len(chunk)
                received += len(chunk)
                if fetch.size is not None and received > fetch.size:
                    break  # more than announced: verify's size check rejects it
                if fetch.passthrough is not None:
                    await fetch.hold(chunk)
                if pending is not None and (pending.done() or batched >= WRITE_BATCH):
                    await settle()
                if pending is None:
                    start_write()
            while pending is not None or batch:
                if pending is not None:
                    await settle()
                else:
                    start_write()
        finally:
            if pending is not None and not pending.done():
                pending.cancel()
                with suppress(asyncio.CancelledError, Exception):
                    await pending

    async def _run(self, fetch: BlobFetch, opener: BlobOpener) -> None:
        metrics.INFLIGHT_FETCHES.inc()
        writer: BlobWriter | None = None
        try:
            async with asyncio.timeout(self._timeout):
                # The opener's context spans the commit: a source that coordinates
                # with others (proxy.cluster) learns there whether the blob was stored.
                async with opener() as upstream:
                    fetch.size = upstream.size
                    writer = await self._store.create(fetch.digest, fetch.size)
                    fetch.attach(writer.temp_path)
                    if writer.failure is not None:
                        self._pass_through(fetch, writer.failure)
                    fetch.ready.set_result(None)
                    await self._copy(upstream, writer, fetch)
                    expected = Descriptor(fetch.digest, fetch.size or fetch.end)
                    await writer.verify(expected)
                    fetch.verified = True  # readers may send the last byte now
                    fetch._notify()
                    descriptor = expected
                    if fetch.passthrough is None:
                        try:
                            descriptor = await writer.commit(expected)
                        except CacheWriteFailed as failure:
                            # Every byte is in the file and verified: readers finish from it.
                            self._pass_through(fetch, failure)
                if fetch.passthrough is None:
                    await self._descriptors.set_descriptor(fetch.digest, descriptor)
            fetch.done.set_result(descriptor)
        except BaseException as exc:
            error = exc if isinstance(exc, Exception) else UpstreamUnavailable("fetch cancelled")
            if isinstance(exc, TimeoutError):
                error = UpstreamUnavailable(f"blob fetch exceeded {self._timeout:.0f}s")
            if not fetch.ready.done():
                fetch.ready.set_exception(error)
            if not fetch.done.done():
                fetch.done.set_exception(error)
            log.warning("blob fetch failed: %s", error, extra={"digest": str(fetch.digest)})
            if not isinstance(exc, Exception):
                raise
        finally:
            # Mark exceptions retrieved: readers may all have left already.
            for fut in (fetch.ready, fetch.done):
                if fut.done() and not fut.cancelled():
                    fut.exception()
            if self._fetches.get(fetch.digest) is fetch:
                del self._fetches[fetch.digest]
            metrics.INFLIGHT_FETCHES.dec()
            fetch._notify()
            fetch.close_file()
            if writer is not None:
                await writer.cancel()  # readers hold open descriptors; unlinking is safe
