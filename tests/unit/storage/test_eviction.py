"""Size-bounded eviction: least recently used first, never the recently used."""

from __future__ import annotations

import os
from pathlib import Path

from proxy.model import Digest
from proxy.storage.disk import DiskBlobStore
from proxy.storage.eviction import Evictor


async def _put(store: DiskBlobStore, data: bytes, mtime: float) -> Digest:
    digest = Digest.of(data)
    await store.put(digest, data)
    os.utime(store.path(digest), (mtime, mtime))
    return digest


async def test_evicts_oldest_until_under_low_watermark(tmp_path: Path) -> None:
    store = DiskBlobStore(tmp_path)
    store.open_store()
    evicted: list[Digest] = []

    async def on_evict(digest: Digest) -> None:
        evicted.append(digest)

    now = 10_000.0
    evictor = Evictor(store, 3000, on_evict, min_age=100, clock=lambda: now)
    old = [await _put(store, os.urandom(1000), now - 1000 + i) for i in range(3)]
    recent = await _put(store, os.urandom(1000), now - 10)
    assert store.used_bytes == 4000

    evictor.maybe_start()
    await evictor.wait()

    # Under 90% of 3000 needs two of the oldest gone; the recent one is never a candidate.
    assert evicted == old[:2]
    assert not store.path(old[0]).exists() and not store.path(old[1]).exists()
    assert store.path(old[2]).exists() and store.path(recent).exists()
    assert store.used_bytes == 2000


async def test_recently_used_blobs_survive_even_over_the_limit(tmp_path: Path) -> None:
    store = DiskBlobStore(tmp_path)
    store.open_store()
    evicted: list[Digest] = []

    async def on_evict(digest: Digest) -> None:
        evicted.append(digest)

    now = 10_000.0
    evictor = Evictor(store, 1500, on_evict, min_age=100, clock=lambda: now)
    for _ in range(3):
        await _put(store, os.urandom(1000), now - 5)
    evictor.maybe_start()
    await evictor.wait()
    assert evicted == []
    assert store.used_bytes == 3000


async def test_used_bytes_counted_at_open(tmp_path: Path) -> None:
    store = DiskBlobStore(tmp_path)
    store.open_store()
    await _put(store, b"x" * 123, 1.0)
    reopened = DiskBlobStore(tmp_path)
    reopened.open_store()
    assert reopened.used_bytes == 123
    assert [d for d, _, _ in reopened.list_committed()] == [Digest.of(b"x" * 123)]
