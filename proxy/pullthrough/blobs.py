"""Blobs of one upstream: served from disk when cached, else through one shared fetch."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from proxy.errors import BlobUnknown
from proxy.interfaces import BlobDescriptorService
from proxy.model import Descriptor, Digest
from proxy.pullthrough.inflight import BlobFetch, InflightBlobFetches
from proxy.storage.disk import DiskBlobStore
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
    def __init__(
        self,
        upstream: UpstreamClient,
        store: DiskBlobStore,
        descriptors: BlobDescriptorService,
        inflight: InflightBlobFetches,
    ) -> None:
        self._upstream = upstream
        self._store = store
        self._descriptors = descriptors
        self._inflight = inflight

    async def local(self, digest: Digest) -> LocalBlob | None:
        try:
            descriptor = await self._descriptors.stat(digest)
        except BlobUnknown:
            return None
        return LocalBlob(descriptor, self._store.path(digest))

    async def forget(self, digest: Digest) -> None:
        """The descriptor said cached but the file is gone (evicted, deleted by hand)."""
        await self._descriptors.clear(digest)

    async def open(self, repo: str, digest: Digest) -> LocalBlob | FetchingBlob:
        """The blob from cache, or the fetch that is bringing it (joined or started).

        Raises BlobUnknown and upstream errors when the fetch cannot start.
        """
        local = await self.local(digest)
        if local is not None:
            return local
        path = self._store.path(digest)
        if self._inflight.get(digest) is None and path.exists():
            # The fetch committed and left the registry between our stat and now.
            return LocalBlob(await self._store.stat(digest), path)
        fetch, coalesced = self._inflight.join(
            digest, lambda: self._upstream.open_blob(repo, digest)
        )
        await fetch.wait_ready()
        return FetchingBlob(fetch, coalesced)

    async def head(self, repo: str, digest: Digest) -> Descriptor:
        """Describe the blob without downloading it: cache, fetch in progress, upstream HEAD."""
        local = await self.local(digest)
        if local is not None:
            return local.descriptor
        fetch = self._inflight.get(digest)
        ready = fetch is not None and fetch.ready.done() and not fetch.ready.exception()
        if ready and fetch is not None and fetch.size is not None:
            return Descriptor(digest, fetch.size)
        head = await self._upstream.head_blob(repo, digest)
        if head.size is None:
            raise BlobUnknown(f"upstream gave no size for blob {digest}")
        return Descriptor(digest, head.size)
