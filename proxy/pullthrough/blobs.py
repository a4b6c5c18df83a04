"""Blobs of one upstream repository: from disk when cached and linked, else one shared fetch.

Presence is the disk's business (a file under its final name is complete); knowledge
(size, media type, which repositories hold a digest) is the descriptor chain's. A GET
therefore checks the file, and the repository link: a digest on disk that this
repository is not known to hold is confirmed with an upstream HEAD first.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from proxy import metrics
from proxy.errors import BlobUnknown
from proxy.interfaces import BlobDescriptorService, LinkService
from proxy.model import Descriptor, Digest
from proxy.pullthrough.inflight import BlobFetch, InflightBlobFetches
from proxy.storage.disk import DiskBlobStore
from proxy.storage.eviction import touch
from proxy.upstream.client import UpstreamClient


@dataclass(frozen=True, slots=True)
class LocalBlob:
    """A committed blob: serve the file (sendfile, Range)."""

    descriptor: Descriptor
    path: Path


@dataclass(frozen=True, slots=True)
class FetchingBlob:
    """A blob arriving from upstream: follow the fetch (``fetch.read``)."""

    fetch: BlobFetch
    coalesced: bool


class ProxyBlobStore:
    """One (upstream, repository): what the API's blob handlers ask."""

    def __init__(
        self,
        upstream: UpstreamClient,
        repo: str,
        store: DiskBlobStore,
        descriptors: BlobDescriptorService,
        links: LinkService,
        inflight: InflightBlobFetches,
    ) -> None:
        self._upstream = upstream
        self._repo = repo
        self._store = store
        self._descriptors = descriptors
        self._links = links
        self._inflight = inflight

    async def open(self, digest: Digest) -> LocalBlob | FetchingBlob:
        """The blob from cache, or the fetch that is bringing it (joined or started).

        Raises BlobUnknown (this repository does not have it) and upstream errors.
        """
        origin = (self._upstream.name, self._repo)
        linked = await self._links.linked(*origin, digest)
        inflight = self._inflight.get(digest)
        # A fetch for this very repository proves it has the digest once it is ready.
        proven = linked or (inflight is not None and inflight.origin == origin)
        if not proven and (inflight is not None or self._store.path(digest).exists()):
            # Held for another repository: only the upstream can say this one has it.
            await self._descriptors.stat(digest)
            linked = True
        if self._inflight.get(digest) is None:
            try:
                st = self._store.stat_file(digest)
            except BlobUnknown:
                metrics.CACHE_LOOKUPS.labels("blob", "disk", "miss").inc()
            else:
                metrics.CACHE_LOOKUPS.labels("blob", "disk", "hit").inc()
                path = self._store.path(digest)
                touch(path, st.st_mtime, time.time())
                return LocalBlob(Descriptor(digest, st.st_size), path)
        fetch, coalesced = self._inflight.join(
            digest, lambda: self._upstream.open_blob(self._repo, digest), origin
        )
        await fetch.wait_ready()
        if not linked:
            await self._links.link(self._upstream.name, self._repo, [digest])
        return FetchingBlob(fetch, coalesced)

    async def head(self, digest: Digest) -> Descriptor:
        """Describe the blob without downloading it: the descriptor chain, whose bottom
        link is an upstream HEAD for this repository."""
        fetch = self._inflight.get(digest)
        size = fetch.size if fetch is not None and fetch.ready.done() else None
        if size is not None and await self._links.linked(self._upstream.name, self._repo, digest):
            return Descriptor(digest, size)  # arriving now: no need to ask upstream
        return await self._descriptors.stat(digest)
