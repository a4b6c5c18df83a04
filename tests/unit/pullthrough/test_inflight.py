"""InflightBlobFetches: one upstream fetch per digest, followed by every reader.

The upstream is a fake whose body is fed chunk by chunk from the test through a queue,
so every interleaving below is forced by the test, never by timing.
"""

from __future__ import annotations

import asyncio
import errno
import os
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Sequence
from contextlib import AbstractAsyncContextManager, aclosing, asynccontextmanager
from pathlib import Path
from typing import cast

import pytest
from prometheus_client import REGISTRY
from typing_extensions import Buffer

from proxy.cache.memory import MemoryDescriptorCache
from proxy.errors import BlobUnknown, DigestMismatch, UpstreamUnavailable
from proxy.interfaces import BlobDescriptorService, UpstreamBlob
from proxy.model import Descriptor, Digest
from proxy.pullthrough import inflight
from proxy.pullthrough.inflight import BlobFetch, InflightBlobFetches
from proxy.storage.disk import TMP_DIR, DiskBlobStore
from tests.rig.process import async_wait_until

CHUNKS = [b"a" * 1000, b"b" * 1000, b"c" * 1000, b"d" * 7]
DATA = b"".join(CHUNKS)
DIGEST = Digest.of(DATA)
END = None


class FakeBody(UpstreamBlob):
    """A body the test feeds: ``bytes`` are chunks, an exception is raised, END ends it."""

    def __init__(self, size: int | None) -> None:
        self._size = size
        self.queue: asyncio.Queue[bytes | BaseException | None] = asyncio.Queue()

    @property
    def size(self) -> int | None:
        return self._size

    async def chunks(self) -> AsyncIterator[bytes]:
        while True:
            item = await self.queue.get()
            if item is END:
                return
            if isinstance(item, BaseException):
                raise item
            yield item

    def feed(self, *items: bytes | BaseException | None) -> None:
        for item in items:
            self.queue.put_nowait(item)


class FakeOpener:
    """Counts opens; each open yields ``body`` (or raises ``error``) and records exits."""

    def __init__(self, body: FakeBody, *, error: BaseException | None = None) -> None:
        self.body = body
        self.error = error
        self.opened = 0
        self.closed = 0
        self.entered = asyncio.Event()
        self.gate: asyncio.Event | None = None

    def __call__(self) -> AbstractAsyncContextManager[UpstreamBlob]:
        return self._open()

    @asynccontextmanager
    async def _open(self) -> AsyncIterator[UpstreamBlob]:
        self.opened += 1
        self.entered.set()
        if self.gate is not None:
            await self.gate.wait()
        if self.error is not None:
            raise self.error
        try:
            yield self.body
        finally:
            self.closed += 1


class GatedDescriptors(BlobDescriptorService):
    """A descriptor service whose ``set_descriptor`` waits for the test (a slow Redis)."""

    def __init__(self) -> None:
        self.inner = MemoryDescriptorCache(100)
        self.entered = asyncio.Event()
        self.release = asyncio.Event()

    async def stat(self, digest: Digest) -> Descriptor:
        return await self.inner.stat(digest)

    async def set_descriptor(self, digest: Digest, descriptor: Descriptor) -> None:
        self.entered.set()
        await self.release.wait()
        await self.inner.set_descriptor(digest, descriptor)

    async def clear(self, digest: Digest) -> None:
        await self.inner.clear(digest)


@pytest.fixture
def store(tmp_path: Path) -> DiskBlobStore:
    store = DiskBlobStore(tmp_path / "cache")
    store.open_store()
    return store


@pytest.fixture
def descriptors() -> MemoryDescriptorCache:
    return MemoryDescriptorCache(100)


@pytest.fixture
async def fetches(
    store: DiskBlobStore, descriptors: MemoryDescriptorCache
) -> AsyncIterator[InflightBlobFetches]:
    fetches = InflightBlobFetches(store, descriptors)
    yield fetches
    await fetches.close()


def follow(fetch: BlobFetch) -> AsyncGenerator[bytes, None]:
    """``fetch.read()``, typed as the async generator it is (so it can be aclosed)."""
    return cast(AsyncGenerator[bytes, None], fetch.read())


async def read_all(fetch: BlobFetch) -> bytes:
    return b"".join([chunk async for chunk in fetch.read()])


async def settled(fetches: InflightBlobFetches) -> None:
    """Wait until every fetch task has finished its clean-up (not only set ``done``)."""
    await asyncio.gather(*list(fetches._tasks), return_exceptions=True)


def temp_files(store: DiskBlobStore) -> list[Path]:
    return list((store.root / TMP_DIR).iterdir())


async def test_concurrent_joins_share_one_upstream_fetch(
    fetches: InflightBlobFetches, store: DiskBlobStore, descriptors: MemoryDescriptorCache
) -> None:
    opener = FakeOpener(FakeBody(len(DATA)))
    joined = [fetches.join(DIGEST, opener) for _ in range(10)]

    first, coalesced = joined[0]
    assert coalesced is False
    assert all(fetch is first and was for fetch, was in joined[1:])
    assert fetches.get(DIGEST) is first
    await asyncio.gather(*(fetch.wait_ready() for fetch, _ in joined))
    assert opener.opened == 1
    assert first.size == len(DATA)

    readers = [asyncio.create_task(read_all(fetch)) for fetch, _ in joined]
    opener.body.feed(*CHUNKS, END)
    results = await asyncio.gather(*readers)

    assert results == [DATA] * 10
    assert await first.done == Descriptor(DIGEST, len(DATA))
    assert opener.opened == 1
    await settled(fetches)
    assert opener.closed == 1
    assert store.path(DIGEST).read_bytes() == DATA
    assert (await descriptors.stat(DIGEST)).size == len(DATA)
    assert temp_files(store) == []
    assert fetches.get(DIGEST) is None


async def test_readers_see_bytes_before_the_fetch_ends(fetches: InflightBlobFetches) -> None:
    opener = FakeOpener(FakeBody(len(DATA)))
    fetch, _ = fetches.join(DIGEST, opener)
    await fetch.wait_ready()

    async with aclosing(follow(fetch)) as reader:
        opener.body.feed(CHUNKS[0])
        received = await anext(reader)
        # Streaming, not store-and-forward: the first bytes arrive while the upstream
        # has sent only one chunk and the fetch is far from done.
        assert DATA.startswith(received)
        assert 0 < len(received) <= len(CHUNKS[0])
        assert not fetch.done.done()
        opener.body.feed(*CHUNKS[1:], END)
        rest = b"".join([chunk async for chunk in reader])
    assert received + rest == DATA


async def test_last_byte_is_released_once_verified_before_the_fetch_ends(
    store: DiskBlobStore,
) -> None:
    descriptors = GatedDescriptors()
    fetches = InflightBlobFetches(store, descriptors)
    opener = FakeOpener(FakeBody(len(DATA)))
    try:
        fetch, _ = fetches.join(DIGEST, opener)
        await fetch.wait_ready()
        async with aclosing(follow(fetch)) as reader:
            opener.body.feed(CHUNKS[0])
            first = await anext(reader)  # the reader holds the temp file open from here
            assert first == CHUNKS[0][:-1]
            opener.body.feed(*CHUNKS[1:], END)
            await descriptors.entered.wait()  # all bytes written, verified, committed
            # Once the digest is verified the whole body may go out, though the fetch has
            # not finished (it is recording the descriptor): clients do not wait on fsync.
            rest = b"".join([chunk async for chunk in reader])
            assert first + rest == DATA
            assert not fetch.done.done()
            descriptors.release.set()
    finally:
        descriptors.release.set()
        await fetches.close()


async def test_reader_joining_between_commit_and_done_gets_the_blob(
    store: DiskBlobStore,
) -> None:
    # The temp file has been renamed into place but the fetch is not yet marked done
    # (set_descriptor is awaiting a slow Redis). A client that joins now must still be
    # served: the blob is complete under its final name.
    descriptors = GatedDescriptors()
    fetches = InflightBlobFetches(store, descriptors)
    opener = FakeOpener(FakeBody(len(DATA)))
    try:
        fetch, _ = fetches.join(DIGEST, opener)
        await fetch.wait_ready()
        opener.body.feed(*CHUNKS, END)
        await descriptors.entered.wait()
        assert store.path(DIGEST).exists()
        late, coalesced = fetches.join(DIGEST, opener)
        assert late is fetch and coalesced
        await late.wait_ready()

        reader = asyncio.create_task(read_all(late))
        descriptors.release.set()
        assert await reader == DATA
    finally:
        descriptors.release.set()
        await fetches.close()


async def test_reader_that_stops_early_does_not_stop_the_commit(
    fetches: InflightBlobFetches, store: DiskBlobStore
) -> None:
    opener = FakeOpener(FakeBody(len(DATA)))
    fetch, _ = fetches.join(DIGEST, opener)
    await fetch.wait_ready()
    patient = asyncio.create_task(read_all(fetch))

    async with aclosing(follow(fetch)) as quitter:
        opener.body.feed(CHUNKS[0])
        await anext(quitter)
    # The quitter has closed its iterator (its client hung up).
    opener.body.feed(*CHUNKS[1:], END)

    assert await patient == DATA
    assert await fetch.done == Descriptor(DIGEST, len(DATA))
    assert store.path(DIGEST).read_bytes() == DATA


async def test_fetch_survives_every_reader_leaving(
    fetches: InflightBlobFetches, store: DiskBlobStore
) -> None:
    opener = FakeOpener(FakeBody(len(DATA)))
    fetch, _ = fetches.join(DIGEST, opener)
    await fetch.wait_ready()
    reader = asyncio.create_task(read_all(fetch))
    opener.body.feed(CHUNKS[0])
    reader.cancel()
    with pytest.raises(asyncio.CancelledError):
        await reader

    opener.body.feed(*CHUNKS[1:], END)
    assert await fetch.done == Descriptor(DIGEST, len(DATA))
    assert store.path(DIGEST).read_bytes() == DATA


@pytest.mark.parametrize(
    ("chunks", "size"),
    [
        ([b"x" * len(DATA)], len(DATA)),  # right size, wrong bytes
        (CHUNKS[:-1], len(DATA)),  # connection closed early
        ([*CHUNKS, b"extra"], len(DATA)),  # more than announced
        ([b"x" * len(DATA)], None),  # no Content-Length
    ],
    ids=["wrong-bytes", "short", "long", "no-length"],
)
async def test_digest_mismatch_fails_every_reader_and_commits_nothing(
    fetches: InflightBlobFetches,
    store: DiskBlobStore,
    descriptors: MemoryDescriptorCache,
    chunks: list[bytes],
    size: int | None,
) -> None:
    opener = FakeOpener(FakeBody(size))
    fetch, _ = fetches.join(DIGEST, opener)
    await fetch.wait_ready()
    readers = [asyncio.create_task(read_all(fetch)) for _ in range(3)]
    opener.body.feed(*chunks, END)

    results = await asyncio.gather(*readers, return_exceptions=True)

    assert all(isinstance(r, DigestMismatch) for r in results), results
    with pytest.raises(DigestMismatch):
        await fetch.done
    await settled(fetches)
    assert not store.path(DIGEST).exists()
    assert temp_files(store) == []
    with pytest.raises(BlobUnknown):
        await descriptors.stat(DIGEST)
    assert fetches.get(DIGEST) is None


async def test_readers_never_get_the_whole_of_a_wrong_body(
    fetches: InflightBlobFetches,
) -> None:
    wrong = b"x" * len(DATA)
    opener = FakeOpener(FakeBody(len(DATA)))
    fetch, _ = fetches.join(DIGEST, opener)
    await fetch.wait_ready()
    received: list[bytes] = []

    async def reader() -> None:
        async for chunk in fetch.read():
            received.append(chunk)

    task = asyncio.create_task(reader())
    opener.body.feed(wrong, END)
    with pytest.raises(DigestMismatch):
        await task
    assert len(b"".join(received)) < len(wrong)


async def test_upstream_cut_off_fails_every_reader(
    fetches: InflightBlobFetches, store: DiskBlobStore
) -> None:
    opener = FakeOpener(FakeBody(len(DATA)))
    fetch, _ = fetches.join(DIGEST, opener)
    await fetch.wait_ready()
    readers = [asyncio.create_task(read_all(fetch)) for _ in range(2)]
    opener.body.feed(CHUNKS[0], UpstreamUnavailable("connection reset"))

    results = await asyncio.gather(*readers, return_exceptions=True)

    assert all(isinstance(r, UpstreamUnavailable) for r in results), results
    await settled(fetches)
    assert not store.path(DIGEST).exists()
    assert temp_files(store) == []
    assert opener.closed == 1


async def test_opener_error_propagates_to_wait_ready(
    fetches: InflightBlobFetches, store: DiskBlobStore
) -> None:
    opener = FakeOpener(FakeBody(None), error=BlobUnknown("no such blob upstream"))
    first, _ = fetches.join(DIGEST, opener)
    second, coalesced = fetches.join(DIGEST, opener)
    assert coalesced

    for fetch in (first, second):
        with pytest.raises(BlobUnknown):
            await fetch.wait_ready()
    await settled(fetches)
    assert opener.opened == 1
    assert temp_files(store) == []
    assert fetches.get(DIGEST) is None


async def test_a_later_miss_after_a_failure_starts_a_new_fetch(
    fetches: InflightBlobFetches, store: DiskBlobStore
) -> None:
    failing = FakeOpener(FakeBody(None), error=BlobUnknown("not yet"))
    fetch, _ = fetches.join(DIGEST, failing)
    with pytest.raises(BlobUnknown):
        await fetch.wait_ready()
    await settled(fetches)

    working = FakeOpener(FakeBody(len(DATA)))
    retry, coalesced = fetches.join(DIGEST, working)
    assert retry is not fetch and not coalesced
    await retry.wait_ready()
    working.body.feed(*CHUNKS, END)
    assert await read_all(retry) == DATA
    await retry.done  # the client has every byte once verified; commit follows
    assert store.path(DIGEST).read_bytes() == DATA


async def test_close_cancels_fetches_and_leaves_no_temp_files(
    store: DiskBlobStore, descriptors: MemoryDescriptorCache
) -> None:
    fetches = InflightBlobFetches(store, descriptors)
    opener = FakeOpener(FakeBody(len(DATA)))
    fetch, _ = fetches.join(DIGEST, opener)
    await fetch.wait_ready()
    reader = asyncio.create_task(read_all(fetch))
    opener.body.feed(CHUNKS[0])
    assert len(temp_files(store)) == 1

    await fetches.close()

    assert temp_files(store) == []
    assert not store.path(DIGEST).exists()
    assert opener.closed == 1
    with pytest.raises(UpstreamUnavailable):
        await reader
    with pytest.raises(UpstreamUnavailable):
        await fetch.done
    assert fetches.get(DIGEST) is None


async def test_close_while_the_upstream_has_not_answered(
    store: DiskBlobStore, descriptors: MemoryDescriptorCache
) -> None:
    fetches = InflightBlobFetches(store, descriptors)
    opener = FakeOpener(FakeBody(len(DATA)))
    opener.gate = asyncio.Event()  # never set: the upstream never answers
    fetch, _ = fetches.join(DIGEST, opener)
    waiter = asyncio.create_task(fetch.wait_ready())
    await opener.entered.wait()

    await fetches.close()

    with pytest.raises(UpstreamUnavailable):
        await waiter
    assert temp_files(store) == []
    assert fetches.get(DIGEST) is None


async def test_close_right_after_join_fails_waiters_instead_of_hanging(
    store: DiskBlobStore, descriptors: MemoryDescriptorCache
) -> None:
    # join() creates the task; close() may cancel it before it ever runs, and then
    # _run's except/finally never execute: nothing completes fetch.ready or fetch.done.
    fetches = InflightBlobFetches(store, descriptors)
    opener = FakeOpener(FakeBody(len(DATA)))
    fetch, _ = fetches.join(DIGEST, opener)
    waiter = asyncio.create_task(fetch.wait_ready())

    await fetches.close()

    try:
        assert fetch.ready.done(), "close() left a waiter hanging on fetch.ready"
        assert fetch.done.done(), "close() left readers hanging on fetch.done"
        with pytest.raises(UpstreamUnavailable):
            await waiter
        assert fetches.get(DIGEST) is None
    finally:
        waiter.cancel()


async def test_fetch_timeout_fails_it(
    store: DiskBlobStore, descriptors: MemoryDescriptorCache
) -> None:
    fetches = InflightBlobFetches(store, descriptors, timeout=0)
    opener = FakeOpener(FakeBody(len(DATA)))
    opener.gate = asyncio.Event()  # never set
    try:
        fetch, _ = fetches.join(DIGEST, opener)
        with pytest.raises(UpstreamUnavailable):
            await fetch.wait_ready()
    finally:
        await fetches.close()
    assert temp_files(store) == []


async def test_read_from_an_offset(fetches: InflightBlobFetches) -> None:
    opener = FakeOpener(FakeBody(len(DATA)))
    fetch, _ = fetches.join(DIGEST, opener)
    await fetch.wait_ready()
    opener.body.feed(*CHUNKS, END)
    assert b"".join([c async for c in fetch.read(1500)]) == DATA[1500:]


# --- pass-through: the cache cannot take the blob ------------------------------------------

BIG_CHUNKS = [bytes([65 + i]) * 1000 for i in range(12)]
BIG_DATA = b"".join(BIG_CHUNKS)
BIG_DIGEST = Digest.of(BIG_DATA)


class FullDisk:
    """``os.writev`` of a filesystem that fills up after ``budget`` bytes: the write that
    crosses it writes what fits, the next one fails with ``error``."""

    def __init__(self, budget: int, error: int = errno.ENOSPC) -> None:
        self.budget = budget
        self.error = error
        self.written = 0
        self.failures = 0
        self._writev = os.writev

    def writev(self, fd: int, buffers: Sequence[Buffer]) -> int:
        data = b"".join(bytes(b) for b in buffers)
        room = self.budget - self.written
        if room <= 0:
            self.failures += 1
            raise OSError(self.error, os.strerror(self.error))
        n = self._writev(fd, [data[:room]])
        self.written += n
        return n


@pytest.fixture
def full_disk(monkeypatch: pytest.MonkeyPatch) -> Callable[[int, int], FullDisk]:
    def install(budget: int, error: int = errno.ENOSPC) -> FullDisk:
        disk = FullDisk(budget, error)
        monkeypatch.setattr(os, "writev", disk.writev)
        return disk

    return install


def passthrough_count(reason: str) -> float:
    value = REGISTRY.get_sample_value(
        "registry_proxy_passthrough_fetches_total", {"reason": reason}
    )
    return value or 0.0


@pytest.mark.parametrize("error", [errno.ENOSPC, errno.EIO, errno.EDQUOT])
async def test_a_failed_cache_write_streams_the_rest_to_every_reader(
    fetches: InflightBlobFetches,
    store: DiskBlobStore,
    descriptors: MemoryDescriptorCache,
    full_disk: Callable[[int, int], FullDisk],
    error: int,
) -> None:
    disk = full_disk(2500, error)
    before = passthrough_count("write_error")
    opener = FakeOpener(FakeBody(len(BIG_DATA)))
    fetch, _ = fetches.join(BIG_DIGEST, opener)
    await fetch.wait_ready()
    readers = [asyncio.create_task(read_all(fetch)) for _ in range(3)]
    opener.body.feed(*BIG_CHUNKS, END)

    results = await asyncio.gather(*readers)

    assert results == [BIG_DATA] * 3
    assert disk.failures == 1, "the writer stops writing after the first failure"
    assert fetch.passthrough == "write_error"
    assert await fetch.done == Descriptor(BIG_DIGEST, len(BIG_DATA))
    await settled(fetches)
    assert not store.path(BIG_DIGEST).exists()
    assert temp_files(store) == []
    with pytest.raises(BlobUnknown):
        await descriptors.stat(BIG_DIGEST)
    assert passthrough_count("write_error") == before + 1


async def test_a_reader_behind_the_failure_reads_the_file_then_memory(
    fetches: InflightBlobFetches,
    store: DiskBlobStore,
    full_disk: Callable[[int, int], FullDisk],
) -> None:
    full_disk(1500)
    opener = FakeOpener(FakeBody(len(BIG_DATA)))
    fetch, _ = fetches.join(BIG_DIGEST, opener)
    await fetch.wait_ready()
    fed = 0
    # A write fails while the next chunk arrives: feed one at a time until it has.
    while fetch.passthrough is None:
        assert fed < len(BIG_CHUNKS) - 1, "no write failed"
        opener.body.feed(BIG_CHUNKS[fed])
        fed += 1
        await async_wait_until(opener.body.queue.empty, within=5, what="the chunk taken")
        await async_wait_until(
            lambda: fetch.passthrough is not None or fetch.written == fetch.end,
            within=5,
            what="the write to settle",
        )
    assert 0 < fetch.written < fetch.end
    assert temp_files(store) == [], "the temp file is unlinked at the failure"
    late = asyncio.create_task(read_all(fetch))  # from offset 0: file, then memory
    opener.body.feed(*BIG_CHUNKS[fed:], END)
    assert await late == BIG_DATA
    assert fetches.get(BIG_DIGEST) is None, "a pass-through fetch takes no new joiners"


async def test_under_min_free_no_cache_write_starts(
    tmp_path: Path, descriptors: MemoryDescriptorCache
) -> None:
    store = DiskBlobStore(tmp_path / "full", min_free=1 << 60)
    store.open_store()
    fetches = InflightBlobFetches(store, descriptors)
    before = passthrough_count("low_space")
    try:
        opener = FakeOpener(FakeBody(len(BIG_DATA)))
        fetch, _ = fetches.join(BIG_DIGEST, opener)
        await fetch.wait_ready()
        assert fetch.temp_path is None and fetch.passthrough == "low_space"
        assert temp_files(store) == []
        reader = asyncio.create_task(read_all(fetch))
        opener.body.feed(*BIG_CHUNKS, END)
        assert await reader == BIG_DATA
        await settled(fetches)
        assert not store.path(BIG_DIGEST).exists()
        assert passthrough_count("low_space") == before + 1
    finally:
        await fetches.close()


async def test_pass_through_memory_is_bounded_by_the_slowest_reader(
    tmp_path: Path, descriptors: MemoryDescriptorCache, monkeypatch: pytest.MonkeyPatch
) -> None:
    window = 2500
    monkeypatch.setattr(inflight, "PASSTHROUGH_WINDOW", window)
    store = DiskBlobStore(tmp_path / "full", min_free=1 << 60)
    store.open_store()
    fetches = InflightBlobFetches(store, descriptors)
    try:
        opener = FakeOpener(FakeBody(len(BIG_DATA)))
        fetch, _ = fetches.join(BIG_DIGEST, opener)
        await fetch.wait_ready()
        slow = follow(fetch)
        taking = asyncio.create_task(anext(slow))
        await async_wait_until(lambda: fetch.readers == 1, within=5, what="the slow reader")
        opener.body.feed(*BIG_CHUNKS, END)
        first = await taking  # the slow reader takes one chunk, then stops
        fast = asyncio.create_task(read_all(fetch))
        await async_wait_until(
            lambda: fetch._memory_bytes > window, within=5, what="the window to fill"
        )
        assert not fast.done(), "the fast reader waits with the slow one"
        assert fetch._memory_bytes <= window + len(BIG_CHUNKS[0])
        assert not opener.body.queue.empty(), "the fetch stopped reading from upstream"
        rest = [chunk async for chunk in slow]
        assert first + b"".join(rest) == BIG_DATA
        assert await fast == BIG_DATA
    finally:
        await fetches.close()


async def test_wrong_bytes_in_pass_through_never_reach_a_reader_whole(
    tmp_path: Path, descriptors: MemoryDescriptorCache
) -> None:
    store = DiskBlobStore(tmp_path / "full", min_free=1 << 60)
    store.open_store()
    fetches = InflightBlobFetches(store, descriptors)
    try:
        wrong = [b"x" * 1000 for _ in BIG_CHUNKS]
        opener = FakeOpener(FakeBody(len(BIG_DATA)))
        fetch, _ = fetches.join(BIG_DIGEST, opener)
        await fetch.wait_ready()
        received: list[bytes] = []

        async def reader() -> None:
            async for chunk in fetch.read():
                received.append(chunk)

        task = asyncio.create_task(reader())
        opener.body.feed(*wrong, END)
        with pytest.raises(DigestMismatch):
            await task
        assert len(b"".join(received)) == len(BIG_DATA) - 1
    finally:
        await fetches.close()


class CommitWitness(FakeOpener):
    """Records whether the blob was committed when the opener's context exited."""

    def __init__(self, body: FakeBody, store: DiskBlobStore) -> None:
        super().__init__(body)
        self.store = store
        self.committed_at_exit: list[bool] = []

    @asynccontextmanager
    async def _open(self) -> AsyncIterator[UpstreamBlob]:
        async with super()._open() as body:
            try:
                yield body
            finally:
                self.committed_at_exit.append(self.store.path(DIGEST).exists())


async def test_the_opener_context_spans_the_commit(
    fetches: InflightBlobFetches, store: DiskBlobStore
) -> None:
    """A coordinating source (proxy.cluster) learns at its context's exit whether the
    blob was stored: it records itself as a holder then, and only then lets go."""
    opener = CommitWitness(FakeBody(len(DATA)), store)
    fetch, _ = fetches.join(DIGEST, opener)
    await fetch.wait_ready()
    opener.body.feed(*CHUNKS, END)
    await fetch.done
    await settled(fetches)
    assert opener.committed_at_exit == [True]


async def test_settle_lets_a_verified_fetch_commit_before_shutdown(
    store: DiskBlobStore,
) -> None:
    descriptors = GatedDescriptors()
    fetches = InflightBlobFetches(store, descriptors)
    verified = FakeOpener(FakeBody(len(DATA)))
    fetch, _ = fetches.join(DIGEST, verified)
    await fetch.wait_ready()
    verified.body.feed(*CHUNKS, END)
    await descriptors.entered.wait()  # verified and renamed; recording the descriptor
    assert fetch.verified and not fetch.done.done()
    other = Digest.of(b"other")
    unverified = FakeOpener(FakeBody(10))
    pending, _ = fetches.join(other, unverified)
    await pending.wait_ready()

    await fetches.settle(0.01)  # bounded: back although the commit is still held up
    assert not fetch.done.done()
    settling = asyncio.create_task(fetches.settle(5.0))
    descriptors.release.set()
    await settling
    assert fetch.done.done()  # settle returned only once the verified fetch had ended
    assert fetch.done.result() == Descriptor(DIGEST, len(DATA))
    assert not pending.done.done()  # still waiting for bytes: close() cancels it
    await fetches.close()
    assert store.path(DIGEST).exists() and not store.path(other).exists()
