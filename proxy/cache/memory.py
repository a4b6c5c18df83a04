"""In-process caches (cachetools): bounded, so memory stays flat however much is pulled."""

from __future__ import annotations

from cachetools import LRUCache

from proxy import metrics
from proxy.errors import BlobUnknown
from proxy.interfaces import BlobDescriptorService, LinkService, TagEntry, TagService
from proxy.model import Descriptor, Digest


class MemoryDescriptorCache(BlobDescriptorService):
    """Descriptors by digest in a bounded LRU."""

    def __init__(self, max_entries: int) -> None:
        self._entries: LRUCache[Digest, Descriptor] = LRUCache(max_entries)

    async def stat(self, digest: Digest) -> Descriptor:
        descriptor = self._entries.get(digest)
        if descriptor is None:
            raise BlobUnknown(f"blob {digest} is not cached")
        return descriptor

    async def set_descriptor(self, digest: Digest, descriptor: Descriptor) -> None:
        self._entries[digest] = descriptor

    async def clear(self, digest: Digest) -> None:
        self._entries.pop(digest, None)


class MemoryTagStore(TagService):
    """Tag mappings by (upstream, repository, tag) in a bounded LRU.

    Entries do not expire here: a mapping past its TTL is still what the tag pointed to
    last, and is what a stale serve needs. Freshness is the manifest service's decision.
    """

    def __init__(self, max_entries: int) -> None:
        self._entries: LRUCache[tuple[str, str, str], TagEntry] = LRUCache(max_entries)
        self._hits = metrics.CACHE_LOOKUPS.labels("tag", "memory", "hit")
        self._misses = metrics.CACHE_LOOKUPS.labels("tag", "memory", "miss")

    async def get(self, upstream: str, repo: str, tag: str) -> TagEntry | None:
        entry = self._entries.get((upstream, repo, tag))
        (self._misses if entry is None else self._hits).inc()
        return entry

    async def set(self, upstream: str, repo: str, tag: str, entry: TagEntry) -> None:
        self._entries[(upstream, repo, tag)] = entry

    async def delete(self, upstream: str, repo: str, tag: str, digest: Digest) -> None:
        entry = self._entries.get((upstream, repo, tag))
        if entry is not None and entry.digest == digest:
            del self._entries[(upstream, repo, tag)]


class MemoryLinkStore(LinkService):
    """Repository links in a bounded LRU of (upstream, repository, digest)."""

    def __init__(self, max_entries: int) -> None:
        self._entries: LRUCache[tuple[str, str, Digest], bool] = LRUCache(max_entries)

    async def linked(self, upstream: str, repo: str, digest: Digest) -> bool:
        return self._entries.get((upstream, repo, digest), False)

    def known(self, upstream: str, repo: str, digest: Digest) -> bool:
        return self._entries.get((upstream, repo, digest), False)

    async def link(self, upstream: str, repo: str, digests: list[Digest]) -> None:
        for digest in digests:
            self._entries[(upstream, repo, digest)] = True

    async def unlink(self, upstream: str, repo: str, digests: list[Digest]) -> None:
        for digest in digests:
            self._entries.pop((upstream, repo, digest), None)
