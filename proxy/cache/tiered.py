"""Two-level caches for tags and links: the in-process L1 before the shared L2 (Redis).

Descriptors need no class of their own here: ``CachedBlobStatter`` composes any cache in
front of any backend, so memory -> redis -> disk is two of them nested.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from proxy import metrics
from proxy.interfaces import LinkService, TagEntry, TagService
from proxy.model import Digest


class TieredTagStore(TagService):
    """L1 answers while its entry is fresh; otherwise L2 may know a fresher one.

    This is what makes a tag revalidated by one replica fresh for all: a replica whose
    own entry has aged past the upstream's TTL asks Redis before it asks the upstream.
    """

    def __init__(
        self,
        l1: TagService,
        l2: TagService,
        ttl_of: Callable[[str], float],
        *,
        l2_layer: str,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._l1 = l1
        self._l2 = l2
        self._l2_hit = metrics.CACHE_LOOKUPS.labels("tag", l2_layer, "hit")
        self._l2_miss = metrics.CACHE_LOOKUPS.labels("tag", l2_layer, "miss")
        self._ttl_of = ttl_of
        self._clock = clock

    async def get(self, upstream: str, repo: str, tag: str) -> TagEntry | None:
        local = await self._l1.get(upstream, repo, tag)
        if local is not None and self._clock() - local.fetched_at < self._ttl_of(upstream):
            return local
        shared = await self._l2.get(upstream, repo, tag)
        if shared is None:
            self._l2_miss.inc()
            return local
        self._l2_hit.inc()
        if local is None or shared.fetched_at > local.fetched_at:
            await self._l1.set(upstream, repo, tag, shared)
            return shared
        return local

    async def set(self, upstream: str, repo: str, tag: str, entry: TagEntry) -> None:
        await self._l1.set(upstream, repo, tag, entry)
        await self._l2.set(upstream, repo, tag, entry)

    async def delete(self, upstream: str, repo: str, tag: str, digest: Digest) -> None:
        # L2 first: an L1 emptied first could be refilled from L2 in between.
        await self._l2.delete(upstream, repo, tag, digest)
        await self._l1.delete(upstream, repo, tag, digest)


class TieredLinkStore(LinkService):
    def __init__(self, l1: LinkService, l2: LinkService) -> None:
        self._l1 = l1
        self._l2 = l2

    def known(self, upstream: str, repo: str, digest: Digest) -> bool:
        return self._l1.known(upstream, repo, digest)

    async def linked(self, upstream: str, repo: str, digest: Digest) -> bool:
        if await self._l1.linked(upstream, repo, digest):
            return True
        if await self._l2.linked(upstream, repo, digest):
            await self._l1.link(upstream, repo, [digest])
            return True
        return False

    async def link(self, upstream: str, repo: str, digests: list[Digest]) -> None:
        await self._l1.link(upstream, repo, digests)
        await self._l2.link(upstream, repo, digests)

    async def unlink(self, upstream: str, repo: str, digests: list[Digest]) -> None:
        await self._l2.unlink(upstream, repo, digests)
        await self._l1.unlink(upstream, repo, digests)
