"""BlobDescriptorService contract suite, run against every implementation (after
Distribution's ``cache/cachecheck``). The TagService and LinkService suites are in
``test_tag_service.py`` and ``test_link_service.py``.

The descriptor contract, from ``proxy.interfaces``: ``stat`` of an unknown digest raises
``BlobUnknown``; ``set_descriptor`` then ``stat`` returns what was set; ``clear`` then
``stat`` misses; ``clear`` of an unknown digest and a repeated ``set_descriptor`` are fine.
"""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import fakeredis
import pytest

from proxy.cache.cached import CachedBlobStatter
from proxy.cache.instrumented import instrumented
from proxy.cache.memory import MemoryDescriptorCache
from proxy.cache.redis import RedisDescriptorCache, RedisLayer
from proxy.errors import BlobUnknown
from proxy.interfaces import BlobDescriptorService
from proxy.model import Descriptor, Digest
from proxy.pullthrough.registry import build_shared_descriptors
from proxy.storage.disk import DiskBlobStore


def digest_of(label: str) -> Digest:
    return Digest("sha256", hashlib.sha256(label.encode()).hexdigest())


class EmptyUpstream(BlobDescriptorService):
    """The bottom of a repository chain when the upstream knows nothing (HEAD is 404)."""

    async def stat(self, digest: Digest) -> Descriptor:
        raise BlobUnknown(f"blob {digest} is unknown upstream")

    async def set_descriptor(self, digest: Digest, descriptor: Descriptor) -> None:
        return None

    async def clear(self, digest: Digest) -> None:
        return None


class Backends:
    """What a factory may need: a scratch directory and Redis layers closed at teardown."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self._layers: list[RedisLayer] = []

    def redis(self) -> RedisLayer:
        layer = RedisLayer(fakeredis.FakeAsyncRedis())
        self._layers.append(layer)
        return layer

    def store(self) -> DiskBlobStore:
        store = DiskBlobStore(self.tmp / "cache")
        store.open_store()
        return store

    async def close(self) -> None:
        for layer in self._layers:
            await layer.close()


@pytest.fixture
async def backends(tmp_path: Path) -> AsyncIterator[Backends]:
    backends = Backends(tmp_path)
    yield backends
    await backends.close()


ServiceFactory = Callable[[Backends], BlobDescriptorService]

# The disk-backed chains: the disk is the bottom record, so for digests with no file on
# disk they must behave like any other descriptor service. (With a file, see below.)
DESCRIPTOR_SERVICES: dict[str, ServiceFactory] = {
    "MemoryDescriptorCache": lambda b: MemoryDescriptorCache(100),
    "RedisDescriptorCache": lambda b: RedisDescriptorCache(b.redis()),
    "CachedBlobStatter(Memory,Memory)": lambda b: CachedBlobStatter(
        MemoryDescriptorCache(100), MemoryDescriptorCache(100)
    ),
    "instrumented(Memory)": lambda b: instrumented("memory")(MemoryDescriptorCache(100)),
    "shared(memory,disk)": lambda b: build_shared_descriptors(b.store(), 100, None),
    "shared(memory,redis,disk)": lambda b: build_shared_descriptors(b.store(), 100, b.redis()),
    "CachedBlobStatter(Memory,EmptyUpstream)": lambda b: CachedBlobStatter(
        MemoryDescriptorCache(100), EmptyUpstream()
    ),
}


@pytest.fixture(params=list(DESCRIPTOR_SERVICES.values()), ids=list(DESCRIPTOR_SERVICES))
def service(request: pytest.FixtureRequest, backends: Backends) -> BlobDescriptorService:
    factory: ServiceFactory = request.param
    return factory(backends)


DIGEST = digest_of("one")
DESCRIPTOR = Descriptor(DIGEST, 1234, "application/vnd.oci.image.layer.v1.tar+gzip")


async def test_stat_of_unknown_raises_blob_unknown(service: BlobDescriptorService) -> None:
    with pytest.raises(BlobUnknown):
        await service.stat(DIGEST)


async def test_set_then_stat_returns_it(service: BlobDescriptorService) -> None:
    await service.set_descriptor(DIGEST, DESCRIPTOR)
    assert await service.stat(DIGEST) == DESCRIPTOR


async def test_clear_then_stat_misses(service: BlobDescriptorService) -> None:
    await service.set_descriptor(DIGEST, DESCRIPTOR)
    await service.clear(DIGEST)
    with pytest.raises(BlobUnknown):
        await service.stat(DIGEST)


async def test_clear_of_unknown_is_fine(service: BlobDescriptorService) -> None:
    await service.clear(digest_of("never set"))
    await service.clear(digest_of("never set"))


async def test_set_is_idempotent(service: BlobDescriptorService) -> None:
    await service.set_descriptor(DIGEST, DESCRIPTOR)
    await service.set_descriptor(DIGEST, DESCRIPTOR)
    assert await service.stat(DIGEST) == DESCRIPTOR
    await service.clear(DIGEST)
    with pytest.raises(BlobUnknown):
        await service.stat(DIGEST)


async def test_set_replaces(service: BlobDescriptorService) -> None:
    await service.set_descriptor(DIGEST, DESCRIPTOR)
    replaced = Descriptor(DIGEST, 99, "application/octet-stream")
    await service.set_descriptor(DIGEST, replaced)
    assert await service.stat(DIGEST) == replaced


async def test_digests_are_independent(service: BlobDescriptorService) -> None:
    other = digest_of("two")
    await service.set_descriptor(DIGEST, DESCRIPTOR)
    with pytest.raises(BlobUnknown):
        await service.stat(other)
    await service.set_descriptor(other, Descriptor(other, 1))
    await service.clear(DIGEST)
    assert await service.stat(other) == Descriptor(other, 1)


# --- the shared chain with files on disk -----------------------------------------------


@pytest.mark.parametrize("with_redis", [False, True], ids=["memory,disk", "memory,redis,disk"])
async def test_shared_chain_stats_committed_files_from_disk(
    backends: Backends, with_redis: bool
) -> None:
    store = backends.store()
    chain = build_shared_descriptors(store, 100, backends.redis() if with_redis else None)
    data = b"committed layer"
    digest = Digest.of(data)
    with pytest.raises(BlobUnknown):
        await chain.stat(digest)

    await store.put(digest, data)

    assert await chain.stat(digest) == Descriptor(digest, len(data))
    # The file is the record: clear() drops cached descriptors, not the content.
    await chain.clear(digest)
    assert await chain.stat(digest) == Descriptor(digest, len(data))


@pytest.mark.parametrize("with_redis", [False, True], ids=["memory,disk", "memory,redis,disk"])
async def test_shared_chain_clear_after_file_removal_is_a_miss(
    backends: Backends, with_redis: bool
) -> None:
    store = backends.store()
    chain = build_shared_descriptors(store, 100, backends.redis() if with_redis else None)
    data = b"evicted layer"
    digest = Digest.of(data)
    await store.put(digest, data)
    await chain.stat(digest)  # now also in the cache layers
    await store.delete(digest)

    await chain.clear(digest)

    with pytest.raises(BlobUnknown):
        await chain.stat(digest)


async def test_memory_cache_is_bounded() -> None:
    cache = MemoryDescriptorCache(2)
    digests = [digest_of(str(i)) for i in range(3)]
    for digest in digests:
        await cache.set_descriptor(digest, Descriptor(digest, 1))
    with pytest.raises(BlobUnknown):
        await cache.stat(digests[0])
    assert await cache.stat(digests[2]) == Descriptor(digests[2], 1)


async def test_cached_statter_fills_the_cache_from_the_backend() -> None:
    cache = MemoryDescriptorCache(10)
    backend = MemoryDescriptorCache(10)
    statter = CachedBlobStatter(cache, backend)
    await backend.set_descriptor(DIGEST, DESCRIPTOR)

    assert await statter.stat(DIGEST) == DESCRIPTOR
    await backend.clear(DIGEST)
    assert await cache.stat(DIGEST) == DESCRIPTOR
