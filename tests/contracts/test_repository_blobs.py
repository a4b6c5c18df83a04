"""The RepositoryBlobs contract: one repository's blob chain, with and without middleware.

The upstream is a fake ``BlobSource`` that counts what it was asked; the store, the
descriptor cache, the links and the in-flight fetches are the real ones. Every chain the
registry can build must: fetch a blob once however many ask, serve it locally after, say
BlobUnknown for what the upstream does not have, never download on ``stat``, and hand a
digest out through a repository only once that repository is proven to hold it.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from proxy.cache.memory import MemoryDescriptorCache, MemoryLinkStore
from proxy.errors import BlobUnknown
from proxy.interfaces import (
    BlobMiddleware,
    BlobSource,
    FetchingBlob,
    LocalBlob,
    OpenedBlob,
    RepositoryBlobs,
    UpstreamBlob,
    UpstreamBlobHead,
)
from proxy.model import Descriptor, Digest, Outcome
from proxy.pullthrough.inflight import InflightBlobFetches
from proxy.pullthrough.registry import build_repository_blobs, local_statter
from proxy.storage.disk import DiskBlobStore

DATA = b"layer bytes " * 1000
DIGEST = Digest.of(DATA)


class Body(UpstreamBlob):
    def __init__(self, data: bytes, gate: asyncio.Event | None) -> None:
        self._data = data
        self._gate = gate

    @property
    def size(self) -> int | None:
        return len(self._data)

    async def chunks(self) -> AsyncIterator[bytes]:
        if self._gate is not None:
            await self._gate.wait()
        yield self._data


@dataclass
class FakeSource(BlobSource):
    """Blobs by (repository, digest); records every HEAD and GET."""

    name: str = "up"
    blobs: dict[tuple[str, Digest], bytes] = field(default_factory=dict)
    calls: list[tuple[str, str]] = field(default_factory=list)
    gate: asyncio.Event | None = None
    """While set and not yet released, GET bodies wait: fetches stay in flight."""

    async def head_blob(self, repo: str, digest: Digest) -> UpstreamBlobHead:
        self.calls.append(("HEAD", repo))
        data = self.blobs.get((repo, digest))
        if data is None:
            raise BlobUnknown(f"{digest} unknown to {repo}")
        return UpstreamBlobHead(len(data), digest)

    def open_blob(self, repo: str, digest: Digest) -> AbstractAsyncContextManager[UpstreamBlob]:
        @asynccontextmanager
        async def opened() -> AsyncIterator[UpstreamBlob]:
            self.calls.append(("GET", repo))
            data = self.blobs.get((repo, digest))
            if data is None:
                raise BlobUnknown(f"{digest} unknown to {repo}")
            yield Body(data, self.gate)

        return opened()


class PassingMiddleware(RepositoryBlobs):
    """A middleware that adds nothing: the chain must behave the same through it."""

    def __init__(self, inner: RepositoryBlobs) -> None:
        self._inner = inner

    async def stat(self, digest: Digest) -> Descriptor:
        return await self._inner.stat(digest)

    async def open(self, digest: Digest) -> OpenedBlob:
        return await self._inner.open(digest)


@dataclass
class Chain:
    source: FakeSource
    store: DiskBlobStore
    descriptors: MemoryDescriptorCache
    inflight: InflightBlobFetches
    build: Callable[[str], RepositoryBlobs]

    def __call__(self, repo: str) -> RepositoryBlobs:
        return self.build(repo)


MIDDLEWARE: dict[str, tuple[BlobMiddleware, ...]] = {
    "bare": (),
    "with middleware": (PassingMiddleware, PassingMiddleware),
}


@pytest.fixture(params=list(MIDDLEWARE.values()), ids=list(MIDDLEWARE))
async def chain(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Chain]:
    source = FakeSource()
    store = DiskBlobStore(tmp_path / "cache")
    store.open_store()
    descriptors = MemoryDescriptorCache(100)
    links = MemoryLinkStore(100)
    inflight = InflightBlobFetches(store, descriptors)
    middleware: tuple[BlobMiddleware, ...] = request.param

    def build(repo: str) -> RepositoryBlobs:
        return build_repository_blobs(
            source,
            repo,
            committed=local_statter(store),
            files=store,
            descriptors=descriptors,
            links=links,
            inflight=inflight,
            middleware=middleware,
        )

    yield Chain(source, store, descriptors, inflight, build)
    await inflight.close()


async def body_of(opened: OpenedBlob) -> bytes:
    if isinstance(opened, LocalBlob):
        return opened.path.read_bytes()
    return b"".join([chunk async for chunk in opened.fetch.read()])


async def test_cold_open_fetches_then_serves_locally(chain: Chain) -> None:
    chain.source.blobs[("team/app", DIGEST)] = DATA

    first = await chain("team/app").open(DIGEST)
    assert isinstance(first, FetchingBlob)
    assert first.outcome is Outcome.MISS
    assert await body_of(first) == DATA
    await chain.inflight.wait_idle()

    second = await chain("team/app").open(DIGEST)
    assert isinstance(second, LocalBlob)
    assert second.outcome is Outcome.HIT
    assert second.descriptor == Descriptor(DIGEST, len(DATA))
    assert await body_of(second) == DATA
    assert chain.source.calls == [("GET", "team/app")], "one GET, no HEAD: the fetch proved it"


async def test_concurrent_opens_share_one_fetch(chain: Chain) -> None:
    chain.source.blobs[("team/app", DIGEST)] = DATA
    chain.source.gate = asyncio.Event()

    opened = await asyncio.gather(*(chain("team/app").open(DIGEST) for _ in range(4)))
    outcomes = sorted(o.outcome.value for o in opened)
    assert outcomes == ["coalesced", "coalesced", "coalesced", "miss"]
    chain.source.gate.set()
    bodies = await asyncio.gather(*(body_of(o) for o in opened))
    assert bodies == [DATA] * 4
    assert chain.source.calls == [("GET", "team/app")]


async def test_unknown_upstream_blob_is_blob_unknown_and_not_stored(chain: Chain) -> None:
    with pytest.raises(BlobUnknown):
        await chain("team/app").open(DIGEST)
    with pytest.raises(BlobUnknown):
        await chain("team/app").stat(DIGEST)
    assert not chain.store.path(DIGEST).exists()


async def test_stat_asks_upstream_with_head_never_get(chain: Chain) -> None:
    chain.source.blobs[("team/app", DIGEST)] = DATA

    assert await chain("team/app").stat(DIGEST) == Descriptor(DIGEST, len(DATA))
    assert await chain("team/app").stat(DIGEST) == Descriptor(DIGEST, len(DATA))
    assert chain.source.calls == [("HEAD", "team/app")], "the second stat came from the cache"
    assert not chain.store.path(DIGEST).exists()


async def test_stat_of_a_blob_arriving_for_the_repository_needs_no_head(chain: Chain) -> None:
    chain.source.blobs[("team/app", DIGEST)] = DATA
    chain.source.gate = asyncio.Event()

    opened = await chain("team/app").open(DIGEST)
    assert await chain("team/app").stat(DIGEST) == Descriptor(DIGEST, len(DATA))
    assert chain.source.calls == [("GET", "team/app")]
    chain.source.gate.set()
    assert await body_of(opened) == DATA


async def test_a_blob_held_for_one_repository_needs_proof_for_another(chain: Chain) -> None:
    chain.source.blobs[("team/app", DIGEST)] = DATA
    await body_of(await chain("team/app").open(DIGEST))
    await chain.inflight.wait_idle()
    chain.source.calls.clear()

    # The upstream does not have it under other/repo: neither open nor stat hands it out.
    with pytest.raises(BlobUnknown):
        await chain("other/repo").open(DIGEST)
    with pytest.raises(BlobUnknown):
        await chain("other/repo").stat(DIGEST)
    assert chain.source.calls == [("HEAD", "other/repo"), ("HEAD", "other/repo")]

    # Once it does, one HEAD proves it; the bytes come from disk, and the link stays.
    chain.source.blobs[("other/repo", DIGEST)] = DATA
    chain.source.calls.clear()
    opened = await chain("other/repo").open(DIGEST)
    assert isinstance(opened, LocalBlob)
    await chain("other/repo").open(DIGEST)
    await chain("other/repo").stat(DIGEST)
    assert chain.source.calls == [("HEAD", "other/repo")]


async def test_joining_another_repositorys_fetch_needs_proof(chain: Chain) -> None:
    chain.source.blobs[("team/app", DIGEST)] = DATA
    chain.source.gate = asyncio.Event()
    first = await chain("team/app").open(DIGEST)

    with pytest.raises(BlobUnknown):
        await chain("other/repo").open(DIGEST)
    chain.source.blobs[("other/repo", DIGEST)] = DATA
    joined = await chain("other/repo").open(DIGEST)
    assert joined.outcome is Outcome.COALESCED
    chain.source.gate.set()
    assert await body_of(joined) == await body_of(first) == DATA
    proofs = [("HEAD", "other/repo"), ("HEAD", "other/repo")]  # refused, then confirmed
    assert chain.source.calls == [("GET", "team/app"), *proofs]


async def test_a_committed_file_removed_behind_the_cache_is_fetched_again(chain: Chain) -> None:
    chain.source.blobs[("team/app", DIGEST)] = DATA
    await body_of(await chain("team/app").open(DIGEST))
    await chain.inflight.wait_idle()
    await chain.store.delete(DIGEST)  # eviction's work

    again = await chain("team/app").open(DIGEST)
    assert again.outcome is Outcome.MISS
    assert await body_of(again) == DATA
    assert [method for method, _ in chain.source.calls] == ["GET", "GET"]
