"""The fetch's copy loop in threads (``proxy.pullthrough.pump``), through
``InflightBlobFetches``: a body the test sends over a socket pair, read by the pump's
receiver thread with ``SocketBody`` exactly as an upstream's detached connection is."""

from __future__ import annotations

import asyncio
import errno
import os
import socket
import threading
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path

import pytest

from proxy.cache.memory import MemoryDescriptorCache
from proxy.errors import DigestMismatch, UpstreamUnavailable
from proxy.interfaces import DetachableBlob, UpstreamBlob
from proxy.model import Descriptor, Digest
from proxy.pullthrough import pump
from proxy.pullthrough.inflight import BlobFetch, InflightBlobFetches
from proxy.storage.disk import TMP_DIR, DiskBlobStore
from proxy.upstream.client import SocketBody
from tests.rig.process import async_wait_until

DATA = os.urandom(9 << 20) + b"tail"
DIGEST = Digest.of(DATA)


class Feeder:
    """The upstream's end of a socket pair: sends ``data`` (up to ``cut``, then closes)
    from a thread; ``gate`` holds it before the first byte."""

    def __init__(self, data: bytes, *, cut: int | None = None, stall: int | None = None) -> None:
        self.ours, self.theirs = socket.socketpair()
        self.data = data
        self.cut = cut
        self.stall = stall
        self.gate = threading.Event()
        self.release_stall = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        self.gate.wait()
        end = len(self.data) if self.cut is None else self.cut
        try:
            if self.stall is not None:
                self.ours.sendall(self.data[: self.stall])
                self.release_stall.wait()
                return
            view = memoryview(self.data)[:end]
            while view:
                n = self.ours.send(view[: 1 << 20])
                view = view[n:]
        except OSError:
            pass
        finally:
            self.ours.close()


class DetachedBody(UpstreamBlob, DetachableBlob):
    """Detaches into a ``SocketBody`` over the feeder's socket; ``chunks`` plays the
    resumed request (the rest of ``data`` from where the detached reader stopped)."""

    def __init__(self, data: bytes, feeder: Feeder, *, read_timeout: float | None = 5.0) -> None:
        self.data = data
        self.feeder = feeder
        self.read_timeout = read_timeout
        self.body: SocketBody | None = None
        self.resumed_at: int | None = None

    @property
    def size(self) -> int | None:
        return len(self.data)

    def detach(self) -> SocketBody | None:
        fd = self.feeder.theirs.detach()
        self.body = SocketBody(fd, b"", 0, len(self.data), "test", self.read_timeout)
        self.feeder.gate.set()
        return self.body

    async def chunks(self) -> AsyncIterator[bytes]:
        start = 0 if self.body is None else self.body.received
        self.resumed_at = start
        for i in range(start, len(self.data), 1 << 20):
            yield self.data[i : i + (1 << 20)]


def opener(body: UpstreamBlob) -> Callable[[], AbstractAsyncContextManager[UpstreamBlob]]:
    @asynccontextmanager
    async def _open() -> AsyncIterator[UpstreamBlob]:
        yield body

    return _open


@pytest.fixture
def store(tmp_path: Path) -> DiskBlobStore:
    store = DiskBlobStore(tmp_path / "cache")
    store.open_store()
    return store


@pytest.fixture
async def fetches(store: DiskBlobStore) -> AsyncIterator[InflightBlobFetches]:
    fetches = InflightBlobFetches(store, MemoryDescriptorCache(100))
    yield fetches
    await fetches.close()


async def read_all(fetch: BlobFetch) -> bytes:
    return b"".join([chunk async for chunk in fetch.read()])


def copy_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name in ("blob copy", "blob hash")]


async def no_copy_threads() -> None:
    await async_wait_until(lambda: not copy_threads(), within=5.0, what="copy threads gone")


async def test_a_detached_body_is_copied_by_the_threads_and_followed(
    fetches: InflightBlobFetches, store: DiskBlobStore
) -> None:
    body = DetachedBody(DATA, Feeder(DATA))
    fetch, _ = fetches.join(DIGEST, opener(body))
    await fetch.wait_ready()
    results = await asyncio.gather(*[read_all(fetch) for _ in range(3)])

    assert results == [DATA] * 3
    assert await fetch.done == Descriptor(DIGEST, len(DATA))
    assert body.resumed_at is None, "the pump read the whole body: no resume"
    assert store.path(DIGEST).read_bytes() == DATA
    await no_copy_threads()


async def test_a_follower_sees_bytes_before_the_body_ends(fetches: InflightBlobFetches) -> None:
    feeder = Feeder(DATA, stall=3 << 20)
    fetch, _ = fetches.join(DIGEST, opener(DetachedBody(DATA, feeder)))
    await fetch.wait_ready()
    first = await anext(aiter(fetch.read()))
    assert first == DATA[: len(first)] and first
    assert not fetch.done.done()
    feeder.release_stall.set()  # then closes early: the rest comes through chunks()
    await fetch.done


async def test_a_cut_body_resumes_from_where_the_threads_stopped(
    fetches: InflightBlobFetches, store: DiskBlobStore
) -> None:
    cut = (5 << 20) + 12345
    body = DetachedBody(DATA, Feeder(DATA, cut=cut))
    fetch, _ = fetches.join(DIGEST, opener(body))
    await fetch.wait_ready()

    assert await read_all(fetch) == DATA
    assert body.resumed_at == cut
    assert await fetch.done == Descriptor(DIGEST, len(DATA))
    assert store.path(DIGEST).read_bytes() == DATA


async def test_a_silent_upstream_times_out_and_resumes(fetches: InflightBlobFetches) -> None:
    feeder = Feeder(DATA, stall=1 << 20)
    body = DetachedBody(DATA, feeder, read_timeout=0.3)
    fetch, _ = fetches.join(DIGEST, opener(body))
    await fetch.wait_ready()
    try:
        assert await read_all(fetch) == DATA
    finally:
        feeder.release_stall.set()
    assert body.resumed_at == 1 << 20


async def test_wrong_bytes_never_reach_a_reader_whole_nor_the_store(
    fetches: InflightBlobFetches, store: DiskBlobStore
) -> None:
    wrong = DATA[:-1] + b"X"
    fetch, _ = fetches.join(DIGEST, opener(DetachedBody(wrong, Feeder(wrong))))
    await fetch.wait_ready()
    got = bytearray()
    with pytest.raises(DigestMismatch):
        async for chunk in fetch.read():
            got += chunk
    assert len(got) < len(DATA)
    with pytest.raises(DigestMismatch):
        await fetch.done
    assert not store.path(DIGEST).exists()
    assert list((store.root / TMP_DIR).iterdir()) == []


class FailingWrites:
    """``os.writev`` on the blob's temp file fails once ``budget`` bytes are in."""

    def __init__(self, budget: int) -> None:
        self.budget = budget
        self.written = 0
        self.failures = 0
        self._writev = os.writev

    def writev(self, fd: int, buffers: Sequence[memoryview | bytes]) -> int:
        if not os.readlink(f"/proc/self/fd/{fd}").endswith(".part"):
            return self._writev(fd, buffers)
        room = self.budget - self.written
        if room <= 0:
            self.failures += 1
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        n = os.write(fd, b"".join(buffers)[:room])
        self.written += n
        return n


@pytest.fixture
def failing_writes(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[int], FailingWrites]]:
    def install(budget: int) -> FailingWrites:
        writes = FailingWrites(budget)
        monkeypatch.setattr(os, "writev", writes.writev)
        return writes

    yield install


async def test_a_failed_write_goes_pass_through_and_every_reader_gets_the_blob(
    fetches: InflightBlobFetches,
    store: DiskBlobStore,
    failing_writes: Callable[[int], FailingWrites],
) -> None:
    writes = failing_writes(6 << 20)
    fetch, _ = fetches.join(DIGEST, opener(DetachedBody(DATA, Feeder(DATA))))
    await fetch.wait_ready()
    results = await asyncio.gather(*[read_all(fetch) for _ in range(2)])

    assert results == [DATA] * 2
    assert writes.failures == 1
    assert fetch.passthrough == "write_error"
    assert fetch.written <= 6 << 20
    assert await fetch.done == Descriptor(DIGEST, len(DATA))
    await asyncio.sleep(0)
    assert not store.path(DIGEST).exists()


async def test_close_stops_the_threads_and_leaves_no_temp_file(
    fetches: InflightBlobFetches, store: DiskBlobStore
) -> None:
    feeder = Feeder(DATA, stall=2 << 20)
    fetch, _ = fetches.join(DIGEST, opener(DetachedBody(DATA, feeder)))
    await fetch.wait_ready()
    await async_wait_until(lambda: fetch.written >= 2 << 20, within=5.0, what="2 MiB written")
    assert copy_threads()
    await fetches.close()
    await no_copy_threads()
    feeder.release_stall.set()
    assert list((store.root / TMP_DIR).iterdir()) == []
    with pytest.raises(UpstreamUnavailable):
        await fetch.done


async def test_a_body_that_cannot_detach_goes_through_chunks(
    fetches: InflightBlobFetches,
) -> None:
    class Undetachable(DetachedBody):
        def detach(self) -> None:
            return None

    body = Undetachable(DATA, Feeder(DATA))
    fetch, _ = fetches.join(DIGEST, opener(body))
    await fetch.wait_ready()
    assert await read_all(fetch) == DATA
    assert body.resumed_at == 0


def test_buffers_bound_the_memory_in_flight() -> None:
    assert pump.BUFFERS * pump.BUFFER_SIZE <= 8 << 20
