"""The copy loop of a fetch off the event loop: two threads per fetch.

``pump`` takes a body that one thread can read straight from its socket
(``BlockingBody``) and a writer that threads may feed (``BlockingBlobWriter``):

* The **receiver** thread fills buffers with ``recv_into`` and writes each
  one to the temp file as soon as it is full, or as soon as the socket has had nothing
  more for ``FLUSH_WAIT`` (an upstream that pauses never holds back bytes the readers
  could have). It then tells the event loop how far the file has grown: one callback
  at a time (``call_soon_threadsafe``), however many buffers were written meanwhile, so
  followers wake per few MiB, not per chunk.
* The **hasher** thread hashes each buffer after it was written, in order, and hands it
  back. SHA-256 is the slowest step of the byte path (about 1.7 GB/s here), so it runs
  side by side with receiving and writing on the second core, and the digest is ready
  right after the last byte arrives. The buffers bound what is in flight between the
  two (at most ``BUFFERS`` x ``BUFFER_SIZE``, allocated as the hasher falls behind, freed
  when the fetch ends); a slower hasher slows the receiver, it never grows memory.

``fetch.written`` still only counts bytes in the file, and the fetch still holds the last
byte back until ``verify`` (after both threads stopped). A write that fails turns the
fetch pass-through from the event loop (``on_write_failure``), and from then on each
buffer is handed to ``BlobFetch.hold`` on the loop (which waits while the readers'
window is full) while the hasher goes on hashing it.

The pump returns True when the whole body is in; False when the body stopped early
(the connection was cut or went silent for ``read_timeout``): every byte received until
then is written (or held) and hashed, and the caller goes on from ``body.received``.
Cancelling the pump stops both threads (within ``POLL_SLICE``) before it returns.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
import time
from collections.abc import Callable, Coroutine
from typing import Any, Protocol

from proxy.errors import CacheWriteFailed
from proxy.interfaces import BlockingBlobWriter, BlockingBody

log = logging.getLogger(__name__)

BUFFER_SIZE = 2 << 20
BUFFERS = 4
FLUSH_WAIT = 0.002
"""How long a part-filled buffer waits for more bytes before it goes to the file."""
POLL_SLICE = 0.2
"""How often a waiting thread checks whether the pump was cancelled."""


class FetchProgress(Protocol):
    """What the pump tells the fetch its readers follow (``BlobFetch``), on the loop."""

    written: int
    passthrough: str | None

    def file_grew(self, size: int) -> None: ...

    async def hold(self, chunk: bytes) -> None: ...


class _Stopped(Exception):
    """The pump was cancelled: the threads leave."""


class _Pump:
    def __init__(
        self,
        body: BlockingBody,
        writer: BlockingBlobWriter,
        fetch: FetchProgress,
        on_write_failure: Callable[[CacheWriteFailed], None],
        read_timeout: float | None,
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        self._body = body
        self._writer = writer
        self._fetch = fetch
        self._on_write_failure = on_write_failure
        self._read_timeout = read_timeout
        self._loop = loop
        self._stop = threading.Event()
        self._free: queue.SimpleQueue[bytearray] = queue.SimpleQueue()
        self._hash: queue.SimpleQueue[tuple[bytearray, int] | None] = queue.SimpleQueue()
        self._buffers = 0  # allocated so far: only as many as the hasher lags behind
        self._written = fetch.written
        self._grow_scheduled = False
        self._caching = fetch.passthrough is None
        self.cut: BaseException | None = None
        self.hash_error: BaseException | None = None

    # --- event loop side ---------------------------------------------------------------

    def _grow(self) -> None:
        self._grow_scheduled = False  # before reading _written: no update is missed
        grew = self._written - self._fetch.written
        if grew > 0 and self._fetch.passthrough is None:
            self._fetch.file_grew(grew)

    async def _switch(self, failure: CacheWriteFailed, written: int, chunk: bytes) -> None:
        grew = written - self._fetch.written
        if grew > 0:
            self._fetch.file_grew(grew)
        self._writer.write_failed()
        self._on_write_failure(failure)
        await self._fetch.hold(chunk)

    # --- threads -----------------------------------------------------------------------

    def _call(self, coro_factory: Callable[[], Coroutine[Any, Any, None]]) -> None:
        """Run a coroutine on the loop and wait for it, checking for cancellation."""
        future = asyncio.run_coroutine_threadsafe(coro_factory(), self._loop)
        while True:
            try:
                future.result(POLL_SLICE)
                return
            except TimeoutError:
                if self._stop.is_set():
                    future.cancel()
                    raise _Stopped() from None

    def _fill(self, view: memoryview) -> int:
        """Fill ``view`` from the body: until full, the body's end, or a pause. A cut
        (``OSError``: ConnectionError, TimeoutError) is kept in ``cut`` and ends the
        filling; the bytes read before it are returned like any others."""
        body = self._body
        filled = 0
        silent_since = time.monotonic()
        try:
            while filled < len(view) and not body.done:
                n = body.readinto(view[filled:])
                if n:
                    filled += n
                    continue
                if filled:
                    if not body.wait(FLUSH_WAIT):
                        return filled  # a pause: what is here goes out now
                    continue
                if body.wait(POLL_SLICE):
                    silent_since = time.monotonic()
                    continue
                if self._stop.is_set():
                    raise _Stopped()
                if self._read_timeout and time.monotonic() - silent_since > self._read_timeout:
                    raise TimeoutError(f"no upstream bytes for {self._read_timeout:.0f}s")
        except OSError as exc:
            self.cut = exc
        return filled

    def _receive(self) -> None:
        try:
            while not self._body.done and self.cut is None:
                buffer = self._take_free()
                view = memoryview(buffer)
                filled = self._fill(view)
                if not filled:
                    self._free.put(buffer)
                    continue
                self._deliver(view[:filled])
                self._hash.put((buffer, filled))
        finally:
            self._hash.put(None)

    def _take_free(self) -> bytearray:
        while True:
            try:
                return self._free.get_nowait()
            except queue.Empty:
                if self._buffers < BUFFERS:
                    self._buffers += 1
                    return bytearray(BUFFER_SIZE)
            try:
                return self._free.get(timeout=POLL_SLICE)
            except queue.Empty:
                if self._stop.is_set():
                    raise _Stopped() from None

    def _deliver(self, chunk: memoryview) -> None:
        if self._caching:
            failure = self._writer.write_blocking(chunk)
            if failure is None:
                self._written += len(chunk)
                if not self._grow_scheduled:
                    self._grow_scheduled = True
                    with contextlib.suppress(RuntimeError):  # the loop is closed
                        self._loop.call_soon_threadsafe(self._grow)
                return
            self._caching = False
            data, written = bytes(chunk), self._written
            self._call(lambda: self._switch(failure, written, data))
            return
        data = bytes(chunk)
        self._call(lambda: self._fetch.hold(data))

    def _hasher(self) -> None:
        while True:
            item = self._hash.get()
            if item is None:
                return
            buffer, filled = item
            if self.hash_error is None:
                try:
                    self._writer.hash_blocking(memoryview(buffer)[:filled])
                except BaseException as exc:  # the receiver raises it
                    self.hash_error = exc
                    self._stop.set()
            self._free.put(buffer)

    def run(self, done: asyncio.Future[None]) -> None:
        """The receiver thread's body; starts the hasher and joins it."""
        error: BaseException | None = None
        hasher = threading.Thread(target=self._hasher, name="blob hash", daemon=True)
        hasher.start()
        try:
            self._receive()
        except BaseException as exc:  # handed to the loop
            error = exc
        finally:
            hasher.join()
            self._body.close()
        error = self.hash_error or error
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits
            self._loop.call_soon_threadsafe(_settle, done, error)


def _settle(done: asyncio.Future[None], error: BaseException | None) -> None:
    if done.done():
        return
    if error is None:
        done.set_result(None)
    else:
        done.set_exception(error)


async def pump(
    body: BlockingBody,
    writer: BlockingBlobWriter,
    fetch: FetchProgress,
    on_write_failure: Callable[[CacheWriteFailed], None],
) -> bool:
    """Copy ``body`` into ``writer`` in two threads (see the module docstring); True when
    the body is complete, False when it stopped early at ``body.received``."""
    loop = asyncio.get_running_loop()
    worker = _Pump(body, writer, fetch, on_write_failure, body.read_timeout, loop)
    done: asyncio.Future[None] = loop.create_future()
    thread = threading.Thread(target=worker.run, args=(done,), name="blob copy", daemon=True)
    thread.start()
    try:
        await asyncio.shield(done)
    except asyncio.CancelledError:
        worker._stop.set()
        # The threads touch the writer and the fetch: they must be gone before the
        # caller cleans up. Each checks the flag at least every POLL_SLICE.
        with contextlib.suppress(BaseException):
            await asyncio.shield(done)
        raise
    # Whatever the threads announced is applied before the caller reads ``written``.
    worker._grow()
    if worker.cut is not None:
        log.info(
            "upstream body stopped after %d bytes: %s; resuming",
            body.received,
            worker.cut,
        )
        return False
    return True
