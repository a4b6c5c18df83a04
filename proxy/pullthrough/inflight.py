"""One upstream fetch per blob, however many clients ask for it at once.

Protocol:

* ``InflightBlobFetches.join(digest, opener)`` returns the ``BlobFetch`` in progress for
  the digest or starts one. Check-and-insert happens without an ``await`` in between, so
  two requests on the event loop can never start two fetches for one digest.
* The fetch runs in a task owned by this registry (hence by the application), not by any
  request: a client hanging up never cancels it. It streams the upstream body into a
  temp file (hashing as it goes, in a worker thread), then verifies digest and size,
  fsyncs, renames into place and records the descriptor.
* Every client, the first included, follows the growing temp file from its own offset
  (``BlobFetch.read``): bytes reach all of them as they arrive from upstream, except
  the last byte, which waits for the digest check.
* On an upstream failure or a digest mismatch nothing is committed, the temp file is
  removed, and every reader's iterator raises, so the API layer aborts connections
  that already sent headers instead of finishing a complete-looking 200.
* A fetch is removed from the registry when it ends; a later miss starts a new one.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, suppress
from typing import BinaryIO

from proxy import metrics
from proxy.errors import UpstreamUnavailable
from proxy.interfaces import (
    ArrivingBlob,
    BlobDescriptorService,
    BlobStore,
    BlobWriter,
    UpstreamBlob,
)
from proxy.model import Descriptor, Digest

log = logging.getLogger(__name__)

READ_CHUNK = 1 << 20
WRITE_BATCH = 1 << 20
DEFAULT_FETCH_TIMEOUT = 3600.0

BlobOpener = Callable[[], AbstractAsyncContextManager[UpstreamBlob]]


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
        self.temp_path: os.PathLike[str] | None = None
        self.ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.done: asyncio.Future[Descriptor] = asyncio.get_running_loop().create_future()
        self._progress = asyncio.Event()
        self.readers = 0
        self.verified = False
        """Digest and size checked: the whole body may go out (fsync and rename follow)."""

    def _notify(self) -> None:
        event, self._progress = self._progress, asyncio.Event()
        event.set()

    async def wait_ready(self) -> None:
        """Wait for the upstream's headers; raises the fetch's error if it failed first."""
        await asyncio.shield(self.ready)

    async def spans(self, offset: int = 0) -> AsyncIterator[tuple[BinaryIO, int, int]]:
        """Yield (file, offset, length) of the blob's bytes as they are written, from
        ``offset`` to the end; raises the fetch's error if it fails.

        The caller sends each span (``loop.sendfile``, or reads it) before asking for the
        next. Must be called after ``wait_ready``. The temp file is opened once: a later
        rename (commit) or unlink (failure) does not affect an open file.
        """
        file = os.fdopen(self._open(), "rb", buffering=0)
        self.readers += 1
        metrics.INFLIGHT_READERS.inc()
        try:
            while True:
                if self.done.done():
                    self.done.result()  # raises the fetch's error, if any
                # The last byte is held back until the digest is verified, so a client
                # never receives a complete body that turns out to be wrong.
                complete = self.verified or self.done.done()
                available = self.written if complete else self.written - 1
                if offset < available:
                    yield file, offset, available - offset
                    offset = available
                    continue
                if complete:
                    return
                await self._progress.wait()
        finally:
            self.readers -= 1
            metrics.INFLIGHT_READERS.dec()
            file.close()

    async def read(self, offset: int = 0) -> AsyncIterator[bytes]:
        """The blob's bytes from ``offset`` as they are written, in chunks of at most
        ``READ_CHUNK``; raises if the fetch fails (see ``spans``)."""
        async for file, start, length in self.spans(offset):
            end = start + length
            while start < end:
                data = await asyncio.to_thread(
                    os.pread, file.fileno(), min(READ_CHUNK, end - start), start
                )
                if not data:
                    raise UpstreamUnavailable("blob temp file shorter than announced")
                start += len(data)
                yield data

    def _open(self) -> int:
        assert self.temp_path is not None
        try:
            return os.open(self.temp_path, os.O_RDONLY)
        except FileNotFoundError:
            pass
        try:
            return os.open(self._store.path(self.digest), os.O_RDONLY)
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

    async def _copy(self, upstream: UpstreamBlob, writer: BlobWriter, fetch: BlobFetch) -> None:
        """Upstream body into the temp file, hashed and written in a worker thread.

        Writes overlap reads: while one write runs, what arrives meanwhile is gathered
        and written next in one go (up to ``WRITE_BATCH`` bytes before the reader waits
        for the write), so an idle disk sees each chunk at once and a busy one gets fewer,
        larger writes. At most one write and one batch are held in memory.
        ``fetch.written`` only counts bytes that are in the file: readers rely on it.
        """
        batch: list[bytes] = []
        batched = 0
        pending: asyncio.Future[None] | None = None

        def start_write() -> None:
            nonlocal pending, batch, batched
            size = batched
            pending = asyncio.ensure_future(writer.write(*batch))
            batch, batched = [], 0

            def written(task: asyncio.Future[None]) -> None:
                if not task.cancelled() and task.exception() is None:
                    fetch.written += size
                    fetch._notify()

            pending.add_done_callback(written)

        received = 0
        try:
            async for chunk in upstream.chunks():
                batch.append(chunk)
                batched += len(chunk)
                received += len(chunk)
                if fetch.size is not None and received > fetch.size:
                    break  # more than announced: verify's size check rejects it
                if pending is not None and (pending.done() or batched >= WRITE_BATCH):
                    await pending  # raises the write's error
                    pending = None
                if pending is None:
                    start_write()
            if pending is not None:
                await pending
                pending = None
            if batch:
                start_write()
                assert pending is not None
                await pending
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
                    writer = await self._store.create(fetch.digest)
                    fetch.size = upstream.size
                    fetch.temp_path = writer.temp_path
                    fetch.ready.set_result(None)
                    await self._copy(upstream, writer, fetch)
                    expected = Descriptor(fetch.digest, fetch.size or fetch.written)
                    await writer.verify(expected)
                    fetch.verified = True  # readers may send the last byte now
                    fetch._notify()
                    descriptor = await writer.commit(expected)
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
            self._fetches.pop(fetch.digest, None)
            metrics.INFLIGHT_FETCHES.dec()
            fetch._notify()
            if writer is not None:
                await writer.cancel()  # readers hold open descriptors; unlinking is safe
