"""Manifests on disk, content-addressed like blobs, with an in-memory L1 of their bytes.

A manifest is stored byte for byte under its digest (never converted: the digest is its
identity). Its media type is not stored beside it: it is read back from the manifest's
own ``mediaType`` field or implied by its shape, so nothing can get out of step. The L1
holds whole manifests, bounded by total bytes, so a warm GET by digest costs no I/O.

With an index (``proxy.storage.index``), ``put`` records what the manifest references,
and marks it and its references used *before* the commit, so an eviction pass started by
that commit never takes the blobs of an image that is being pulled.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from cachetools import LRUCache

from proxy import metrics
from proxy.errors import BlobUnknown, CacheWriteFailed
from proxy.model import MEDIA_TYPE_OCTET_STREAM, Digest, references, sniff_media_type
from proxy.storage.disk import DiskBlobStore
from proxy.storage.index import CacheIndex

log = logging.getLogger(__name__)

MAX_MANIFEST_SIZE = 4 << 20
DEFAULT_MEMORY_BYTES = 64 << 20


@dataclass(frozen=True, slots=True)
class StoredManifest:
    digest: Digest
    media_type: str
    body: bytes


def _size(manifest: StoredManifest) -> int:
    return len(manifest.body) + 200


class ManifestStore:
    def __init__(
        self,
        store: DiskBlobStore,
        max_memory_bytes: int = DEFAULT_MEMORY_BYTES,
        *,
        index: CacheIndex | None = None,
        before_put: Callable[[Digest], Awaitable[None]] | None = None,
    ) -> None:
        self._store = store
        self._index = index
        self._before_put = before_put
        """Awaited before a put: an eviction removing the digest finishes first."""
        self._memory: LRUCache[Digest, StoredManifest] = LRUCache(max_memory_bytes, getsizeof=_size)
        self._memory_hits = metrics.CACHE_LOOKUPS.labels("manifest", "memory", "hit")

    async def get(self, digest: Digest) -> StoredManifest | None:
        """The manifest if it is cached locally, else None."""
        manifest = self._memory.get(digest)
        if manifest is not None:
            self._memory_hits.inc()
            return manifest
        metrics.CACHE_LOOKUPS.labels("manifest", "memory", "miss").inc()
        try:
            body = await self._store.read(digest, MAX_MANIFEST_SIZE)
        except BlobUnknown:
            metrics.CACHE_LOOKUPS.labels("manifest", "disk", "miss").inc()
            return None
        metrics.CACHE_LOOKUPS.labels("manifest", "disk", "hit").inc()
        media_type = sniff_media_type(body) or MEDIA_TYPE_OCTET_STREAM
        if self._index is not None:
            # A cold read (rare: the L1 holds manifests) also heals an index that never
            # saw this manifest (a cache from before the index). Idempotent.
            await self._index.record_manifest(digest, media_type, len(body), references(body))
        manifest = StoredManifest(digest, media_type, body)
        self._memory[digest] = manifest
        return manifest

    async def put(self, digest: Digest, media_type: str, body: bytes) -> StoredManifest:
        """Verify and store ``body`` under ``digest``; raises DigestMismatch when it differs.
        When the disk cannot take it, it is kept in memory only (and served from there),
        and the index does not record it (there is nothing on disk to evict)."""
        if self._before_put is not None:
            await self._before_put(digest)
        children = references(body) if self._index is not None else []
        if self._index is not None:
            self._index.times.touch([digest, *children])
        try:
            await self._store.put(digest, body)
        except CacheWriteFailed as failure:
            metrics.PASSTHROUGH_FETCHES.labels(failure.reason).inc()
            log.warning(
                "manifest kept in memory only: %s", failure.message, extra={"digest": str(digest)}
            )
        else:
            if self._index is not None:
                await self._index.record_manifest(digest, media_type, len(body), children)
        manifest = StoredManifest(digest, media_type, body)
        self._memory[digest] = manifest
        return manifest

    def in_memory(self, digest: Digest) -> bool:
        return digest in self._memory

    def cached(self, digest: Digest) -> StoredManifest | None:
        """``get`` when the manifest is in memory (counted as its hit), else None (then
        ``get``): the warm path without an await."""
        manifest = self._memory.get(digest)
        if manifest is not None:
            self._memory_hits.inc()
        return manifest

    def forget(self, digest: Digest) -> None:
        """Drop ``digest`` from memory (its file is being removed)."""
        self._memory.pop(digest, None)
