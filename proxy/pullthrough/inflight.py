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

Workers (``workers`` > 1: processes sharing the cache directory). Before it asks the
upstream, a fetch claims the digest's temp file (``proxy.storage.claims``: the file is the
lock). When another worker holds it, the fetch *follows* that worker's file instead: the
same ``BlobFetch``, whose ``written`` grows as the file does (``FOLLOW_POLL``), whose last
byte waits for the owner's commit (the committed file is the same inode), and which fails
when the owner removed the file without committing. When the owner dies mid-fetch (its
lock is free, the file uncommitted) the follower takes the lock and continues the fetch
itself: the bytes in the file are hashed, the rest comes with an upstream ``Range`` (or,
without a way to resume, from the start again, over the same bytes), and it commits. So
readers in any worker see one stream of the whole blob, or an error; never a wrong end.

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
from proxy.storage.claims import Claim, FileState
from proxy.storage.disk import DiskBlobStore

log = logging.getLogger(__name__)

READ_CHUNK = 1 << 20
WRITE_BATCH = 1 << 20
DEFAULT_FETCH_TIMEOUT = 3600.0
PASSTHROUGH_WINDOW = 8 << 20
"""Bytes a pass-through fetch holds in memory past its slowest reader."""
FOLLOW_POLL = 0.01
"""How often a fetch followed in another worker's file looks at it (a few syscalls)."""
CLAIM_ATTEMPTS = 4
"""Owners a fetch may see fail before it has any byte, before it gives up."""

BlobOpener = Callable[[], AbstractAsyncContextManager[UpstreamBlob]]
BlobResumer = Callable[[int], AbstractAsyncContextManager[UpstreamBlob]]
"""The blob's bytes from an offset (``size`` None unless the offset is 0)."""
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
        self.followed = False
        """Another worker's fetch, followed through its file (at least for a while)."""

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

    def fail(self, error: Exception) -> None:
        """End the fetch with ``error`` for every reader (what is not settled yet),
        marked retrieved: the readers may all have left already."""
        for fut in (self.ready, self.done):
            if not fut.done():
                fut.set_exception(error)
                fut.exception()

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

    def follow_file(self, claim: Claim) -> None:
        """Read another worker's file through a descriptor of its own, valid whatever
        happens to the file's name. Not a ``dup`` of the claim's: that would share the
        file position with the writer of a takeover, and ``loop.sendfile`` seeks it."""
        assert claim.fd is not None
        self.temp_path = claim.path
        self._fd = os.open(f"/proc/self/fd/{claim.fd}", os.O_RDONLY)

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
        shared: DiskBlobStore | None = None,
    ) -> None:
        """``shared``: the store's directory is shared with other workers; fetches claim
        their temp files there (``store`` must be that store)."""
        self._store = store
        self._descriptors = descriptors
        self._timeout = timeout
        self._shared = shared
        self._fetches: dict[Digest, BlobFetch] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    def get(self, digest: Digest) -> BlobFetch | None:
        return self._fetches.get(digest)

    def join(
        self,
        digest: Digest,
        opener: BlobOpener,
        origin: tuple[str, str] = ("", ""),
        resume: BlobResumer | None = None,
    ) -> tuple[BlobFetch, bool]:
        """The fetch in progress for ``digest`` (and True), or a new one started with
        ``opener`` (and False). ``origin`` (upstream, repository) is what the new fetch
        asks upstream for; a joiner from elsewhere must prove its own access first.
        ``resume`` continues a fetch another worker left half done (workers only).

        With workers the new fetch may turn out to follow another worker's (``followed``
        once ready; its ``origin`` is then that worker's)."""
        fetch = self._fetches.get(digest)
        if fetch is not None:
            metrics.COALESCED.labels("blob").inc()
            return fetch, True
        fetch = BlobFetch(digest, self._store, origin)
        self._fetches[digest] = fetch
        run = (
            self._run(fetch, opener)
            if self._shared is None
            else self._run_shared(self._shared, fetch, opener, resume)
        )
        task = asyncio.create_task(run, name=f"fetch {digest}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return fetch, False

    async def follow_elsewhere(self, digest: Digest) -> BlobFetch | None:
        """Workers: the fetch of ``digest`` in progress here, or the one another worker
        of this node runs, followed (for the peer endpoint: a replica asks this node's
        address and any worker may answer); None when no worker fetches it. A fetch
        followed this way is not taken over if its owner dies: it fails, and the asking
        replica takes the fetch over by its own rules."""
        fetch = self._fetches.get(digest)
        if fetch is not None or self._shared is None:
            return fetch
        claim = await asyncio.to_thread(self._shared.claims.held, digest)
        if claim is None:
            return None
        fetch = self._fetches.get(digest)
        if fetch is not None:  # started while we looked
            claim.release()
            return fetch
        fetch = BlobFetch(digest, self._store)
        self._fetches[digest] = fetch
        task = asyncio.create_task(self._follow_only(fetch, claim), name=f"follow {digest}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return fetch

    async def _follow_only(self, fetch: BlobFetch, claim: Claim) -> None:
        try:
            if await self._follow(fetch, claim) is not None:
                # The owner died (or failed first): leave its file to a worker that can
                # continue it with an upstream of its own.
                raise UpstreamUnavailable("the worker fetching this blob is gone")
        except BaseException as exc:
            fetch.fail(
                exc if isinstance(exc, Exception) else UpstreamUnavailable("fetch cancelled")
            )
            if not isinstance(exc, Exception):
                raise
        finally:
            claim.release()
            self._forget(fetch)

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
            fetch.fail(error)
            fetch._notify()
        self._fetches.clear()

    def _forget(self, fetch: BlobFetch) -> None:
        """A fetch's task ended: out of the registry (if still there), readers woken,
        its read descriptor closed."""
        if self._fetches.get(fetch.digest) is fetch:
            del self._fetches[fetch.digest]
        fetch._notify()
        fetch.close_file()

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

    async def _run(self, fetch: BlobFetch, opener: BlobOpener, claim: Claim | None = None) -> None:
        """Fetch from the upstream into a temp file (the ``claim``'s with workers, after
        the ``claim.offset`` bytes already in it), verify, commit; tell the readers."""
        metrics.INFLIGHT_FETCHES.inc()
        writer: BlobWriter | None = None
        try:
            async with asyncio.timeout(self._timeout):
                # The opener's context spans the commit: a source that coordinates
                # with others (proxy.cluster) learns there whether the blob was stored.
                async with opener() as upstream:
                    if claim is None or claim.offset == 0:
                        fetch.size = upstream.size
                    if claim is not None and self._shared is not None:
                        writer = await self._shared.create(fetch.digest, fetch.size, claim=claim)
                        await self._claimed(fetch, claim, writer)
                    else:
                        writer = await self._store.create(fetch.digest, fetch.size)
                    if fetch._fd is None:
                        fetch.attach(writer.temp_path)
                    if writer.failure is not None:
                        self._pass_through(fetch, writer.failure)
                    if not fetch.ready.done():
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
            metrics.INFLIGHT_FETCHES.dec()
            self._forget(fetch)
            if writer is not None:
                await writer.cancel()  # readers hold open descriptors; unlinking is safe
            if claim is not None:
                # After the rename (commit) or the unlink: then the lock may go.
                await asyncio.to_thread(claim.abandon if writer is None else claim.release)

    # --- workers: the fetch of a claimed file ---------------------------------------------

    async def _claimed(self, fetch: BlobFetch, claim: Claim, writer: BlobWriter) -> None:
        """The owner's writer is on the claimed file: say so to the followers."""
        fetch.written = fetch.end = claim.offset
        fetch._notify()
        if writer.failure is None:
            await asyncio.to_thread(claim.publish, fetch.size, fetch.origin)
        else:
            await asyncio.to_thread(claim.abandon)  # no file here: followers fetch alone

    async def _run_shared(
        self,
        store: DiskBlobStore,
        fetch: BlobFetch,
        opener: BlobOpener,
        resume: BlobResumer | None,
    ) -> None:
        """Claim the digest's temp file: own the fetch, follow another worker's, or find
        the blob committed. A followed owner that dies is taken over."""
        claim: Claim | None = None
        try:
            for _attempt in range(CLAIM_ATTEMPTS):
                claim = await asyncio.to_thread(store.claims.take, fetch.digest)
                if claim is None:
                    await self._found_committed(store, fetch)
                    return
                if not claim.owned:
                    outcome = await self._follow(fetch, claim)
                    if outcome is None:
                        return  # committed or failed: the readers know
                    if outcome is False:
                        claim.release()
                        claim = None
                        continue  # the owner failed before any byte: claim again
                    metrics.WORKER_FETCHES.labels("takeover").inc()
                    log.info(
                        "taking over the fetch of a dead worker at byte %d",
                        claim.offset,
                        extra={"digest": str(fetch.digest)},
                    )
                else:
                    metrics.WORKER_FETCHES.labels("owned").inc()
                owned, claim = claim, None  # _run releases it
                if owned.offset and resume is not None:
                    await self._run(fetch, functools.partial(resume, owned.offset), owned)
                else:
                    owned.offset = 0  # no way to resume: the same bytes again, from 0
                    await self._run(fetch, opener, owned)
                return
            raise UpstreamUnavailable("the workers fetching this blob kept failing")
        except BaseException as exc:
            fetch.fail(
                exc if isinstance(exc, Exception) else UpstreamUnavailable("fetch cancelled")
            )
            if not isinstance(exc, Exception):
                raise
        finally:
            if claim is not None:
                claim.release()
            self._forget(fetch)

    async def _found_committed(self, store: DiskBlobStore, fetch: BlobFetch) -> None:
        """The blob was committed between the miss and the claim: serve the file."""
        descriptor = await store.stat(fetch.digest)
        fetch.size = fetch.written = fetch.end = descriptor.size
        fetch.verified = True
        fetch.ready.set_result(None)
        fetch.done.set_result(descriptor)

    async def _follow(self, fetch: BlobFetch, claim: Claim) -> bool | None:
        """Follow another worker's fetch through its file until it ends. None: it ended
        (committed, or failed: the readers were told); False: it failed before the
        readers had anything (claim again); True: the owner died, the lock is ours now
        (``claim.offset`` bytes are in the file)."""
        fetch.followed = True
        fetch.follow_file(claim)
        metrics.WORKER_FETCHES.labels("followed").inc()
        async with asyncio.timeout(self._timeout):
            while True:
                if not fetch.ready.done():
                    meta = claim.meta()
                    if meta is not None:
                        fetch.size, fetch.origin = meta.size, meta.origin
                        fetch.ready.set_result(None)
                size = claim.size_now()
                if size > fetch.written:
                    fetch.written = fetch.end = size
                    fetch._notify()
                locked = claim.try_lock()
                complete = fetch.size is not None and size >= fetch.size
                if locked or complete:
                    state = claim.state()
                    if state is FileState.COMMITTED:
                        descriptor = Descriptor(fetch.digest, size)
                        fetch.size = fetch.written = fetch.end = size
                        fetch.verified = True
                        if not fetch.ready.done():
                            fetch.ready.set_result(None)
                        fetch.done.set_result(descriptor)
                        await self._descriptors.set_descriptor(fetch.digest, descriptor)
                        return None
                    if state is FileState.REMOVED:
                        if not fetch.ready.done():
                            return False
                        raise UpstreamUnavailable("the worker fetching this blob failed")
                    if locked:
                        # Dead; before it had the upstream's answer, nothing to continue.
                        return fetch.ready.done()
                await asyncio.sleep(FOLLOW_POLL)  # a poll: the file tells no one it grew
