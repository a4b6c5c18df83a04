"""InflightBlobFetches with workers: two registries on one cache directory stand for two
worker processes (their ``flock`` locks conflict as two processes' would). The upstream is
the fake of ``test_inflight``, fed by the test, so every interleaving is forced."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path

import pytest

from proxy.cache.memory import MemoryDescriptorCache
from proxy.errors import UpstreamUnavailable
from proxy.interfaces import UpstreamBlob
from proxy.model import Descriptor
from proxy.pullthrough.inflight import InflightBlobFetches
from proxy.storage.disk import DiskBlobStore
from tests.rig.process import async_wait_until

from .test_inflight import CHUNKS, DATA, DIGEST, END, FakeBody, FakeOpener, read_all


class Worker:
    def __init__(self, root: Path) -> None:
        self.store = DiskBlobStore(root)
        self.store.open_store()
        self.descriptors = MemoryDescriptorCache(100)
        self.fetches = InflightBlobFetches(self.store, self.descriptors, shared=self.store)


@pytest.fixture
async def workers(tmp_path: Path) -> AsyncIterator[tuple[Worker, Worker]]:
    pair = (Worker(tmp_path / "cache"), Worker(tmp_path / "cache"))
    yield pair
    for worker in pair:
        await worker.fetches.close()


async def test_the_second_worker_follows_the_first_and_never_asks_upstream(
    workers: tuple[Worker, Worker],
) -> None:
    a, b = workers
    body = FakeBody(len(DATA))
    upstream_a, upstream_b = FakeOpener(body), FakeOpener(FakeBody(len(DATA)))
    fetch_a, _ = a.fetches.join(DIGEST, upstream_a, ("up", "repo"))
    await fetch_a.wait_ready()
    fetch_b, coalesced = b.fetches.join(DIGEST, upstream_b, ("up", "other"))
    assert not coalesced
    await fetch_b.wait_ready()
    assert fetch_b.followed and fetch_b.size == len(DATA)
    assert fetch_b.origin == ("up", "repo")  # the owner's: ScopedBlobs proves its own
    reader = asyncio.create_task(read_all(fetch_b))
    body.feed(*CHUNKS[:2])
    await async_wait_until(lambda: fetch_b.written >= 2000, within=5, what="b sees the bytes")
    body.feed(*CHUNKS[2:], END)
    assert await reader == DATA
    assert await fetch_b.wait_done() == Descriptor(DIGEST, len(DATA))
    assert upstream_a.opened == 1 and upstream_b.opened == 0
    assert b.store.path(DIGEST).read_bytes() == DATA
    assert await b.descriptors.stat(DIGEST) == Descriptor(DIGEST, len(DATA))
    assert b.fetches.get(DIGEST) is None


async def test_a_follower_of_a_failed_fetch_is_cut_never_completed(
    workers: tuple[Worker, Worker],
) -> None:
    a, b = workers
    body = FakeBody(len(DATA))
    fetch_a, _ = a.fetches.join(DIGEST, FakeOpener(body))
    await fetch_a.wait_ready()
    fetch_b, _ = b.fetches.join(DIGEST, FakeOpener(FakeBody(len(DATA))))
    await fetch_b.wait_ready()
    reader = asyncio.create_task(read_all(fetch_b))
    body.feed(*CHUNKS[:3], b"WRONG", END)  # right size, wrong bytes
    with pytest.raises(UpstreamUnavailable):
        await reader
    assert not a.store.path(DIGEST).exists()


async def test_a_dead_owner_is_taken_over_with_the_rest_from_its_offset(
    workers: tuple[Worker, Worker], tmp_path: Path
) -> None:
    """The owner here is a claim and a writer driven by hand; its "death" closes every
    descriptor of the file (what the kernel does), leaving file and bytes behind."""
    _a, b = workers
    dead = DiskBlobStore(tmp_path / "cache")
    claim = dead.claims.take(DIGEST)
    assert claim is not None and claim.owned
    writer = await dead.create(DIGEST, len(DATA), claim=claim)
    claim.publish(len(DATA), ("up", "repo"))
    await writer.write(CHUNKS[0], CHUNKS[1])
    resumed: list[int] = []
    rest = FakeBody(None)

    @asynccontextmanager
    async def resume_from(offset: int) -> AsyncIterator[UpstreamBlob]:
        resumed.append(offset)
        yield rest

    def resume(offset: int) -> AbstractAsyncContextManager[UpstreamBlob]:
        return resume_from(offset)

    upstream = FakeOpener(FakeBody(len(DATA)))
    fetch, _ = b.fetches.join(DIGEST, upstream, ("up", "repo"), resume)
    await fetch.wait_ready()
    reader = asyncio.create_task(read_all(fetch))
    await async_wait_until(lambda: fetch.written == 2000, within=5, what="b follows")
    assert writer._fd is not None and claim.fd is not None
    os.close(writer._fd)
    writer._fd = None
    os.close(claim.fd)
    claim.fd = None
    await async_wait_until(lambda: resumed == [2000], within=5, what="the takeover")
    rest.feed(CHUNKS[2], CHUNKS[3], END)
    assert await reader == DATA
    assert await fetch.wait_done() == Descriptor(DIGEST, len(DATA))
    assert b.store.path(DIGEST).read_bytes() == DATA
    assert upstream.opened == 0
