"""The blobs of one (upstream, repository): three layers of one Protocol, outermost first.

::

    ScopedBlobs      may this repository see the digest?  (links: the only writer)
      LocalBlobs     the committed file (sendfile, Range); HEAD from the descriptor cache
        FetchedBlobs join or start the one fetch per digest; HEAD upstream

Each layer is a ``RepositoryBlobs`` and makes one decision; configured middleware (access
control, quotas) wraps the outermost. The chain is assembled in
``proxy.pullthrough.registry``.

Scoping (Distribution's linked blob store): bytes and descriptors are shared by every
repository, but a digest is handed out through ``<upstream>/<repo>`` only when that
repository is known to hold it. The proof is an upstream answer for this very repository:
a fetch started for it, a manifest fetched through it that references the digest, or a
HEAD. So content cached through one repository is never served through another by
guessing its digest, and no upstream request is spent on what a link already proves.

Presence is the local store's business: a file under its final name is complete, so a
GET asks the store (one ``stat``), not the descriptor caches, which may know of content
this disk does not hold (learned by a HEAD, or from another replica through Redis).
"""

from __future__ import annotations

from proxy.errors import BlobUnknown
from proxy.interfaces import (
    BlobDescriptorService,
    BlobSource,
    BlobStore,
    FetchingBlob,
    LinkService,
    LocalBlob,
    OpenedBlob,
    RepositoryBlobs,
)
from proxy.model import Descriptor, Digest, Outcome
from proxy.pullthrough.inflight import InflightBlobFetches


class RepositoryScope:
    """Which digests one (upstream, repository) may see; the only writer of its links.

    Blobs (``ScopedBlobs``) and manifests (``ProxyManifestService``) both decide here.
    """

    def __init__(self, links: LinkService, upstream: str, repo: str) -> None:
        self._links = links
        self.origin = (upstream, repo)

    async def holds(self, digest: Digest) -> bool:
        """Whether the repository is known to hold ``digest``. Never raises."""
        return await self._links.linked(*self.origin, digest)

    async def record(self, digests: list[Digest]) -> None:
        """The upstream proved the repository holds ``digests``. Idempotent."""
        await self._links.link(*self.origin, digests)


class ScopedBlobs(RepositoryBlobs):
    """Serves only digests the repository holds; confirms any other with the upstream.

    ``upstream`` is the innermost layer, asked directly so that no cache answers for a
    digest this repository is not known to hold.
    """

    def __init__(
        self, scope: RepositoryScope, inner: RepositoryBlobs, upstream: RepositoryBlobs
    ) -> None:
        self._scope = scope
        self._inner = inner
        self._upstream = upstream

    async def stat(self, digest: Digest) -> Descriptor:
        if await self._scope.holds(digest):
            return await self._inner.stat(digest)
        descriptor = await self._upstream.stat(digest)
        await self._scope.record([digest])
        return descriptor

    async def open(self, digest: Digest) -> OpenedBlob:
        held = await self._scope.holds(digest)
        opened = await self._inner.open(digest)
        if not held:
            # A fetch started for this repository got the upstream's 200: that is the
            # proof. Bytes held for another repository need the upstream's word first.
            proven = isinstance(opened, FetchingBlob) and opened.fetch.origin == self._scope.origin
            if not proven:
                await self._upstream.stat(digest)
            await self._scope.record([digest])
        return opened


class LocalBlobs(RepositoryBlobs):
    """The committed file when there is one; otherwise the layer below."""

    def __init__(
        self, store: BlobStore, descriptors: BlobDescriptorService, inner: RepositoryBlobs
    ) -> None:
        self._store = store
        self._descriptors = descriptors
        self._inner = inner

    async def stat(self, digest: Digest) -> Descriptor:
        try:
            return await self._descriptors.stat(digest)
        except BlobUnknown:
            return await self._inner.stat(digest)

    async def open(self, digest: Digest) -> OpenedBlob:
        try:
            descriptor = await self._store.stat(digest)
        except BlobUnknown:
            return await self._inner.open(digest)
        return LocalBlob(descriptor, self._store.path(digest))


class FetchedBlobs(RepositoryBlobs):
    """The bottom layer: the upstream, through the application's one fetch per digest."""

    def __init__(
        self,
        source: BlobSource,
        repo: str,
        inflight: InflightBlobFetches,
        descriptors: BlobDescriptorService,
    ) -> None:
        self._source = source
        self._repo = repo
        self._origin = (source.name, repo)
        self._inflight = inflight
        self._descriptors = descriptors

    async def stat(self, digest: Digest) -> Descriptor:
        """A HEAD upstream, unless a fetch for this repository has its answer already.
        What the upstream says is recorded in the descriptor caches."""
        fetch = self._inflight.get(digest)
        if fetch is not None and fetch.origin == self._origin and fetch.size is not None:
            return Descriptor(digest, fetch.size)  # arriving now: no need to ask
        head = await self._source.head_blob(self._repo, digest)
        if head.size is None:
            raise BlobUnknown(f"upstream gave no size for blob {digest}")
        descriptor = Descriptor(digest, head.size)
        await self._descriptors.set_descriptor(digest, descriptor)
        return descriptor

    async def open(self, digest: Digest) -> OpenedBlob:
        fetch, coalesced = self._inflight.join(
            digest, lambda: self._source.open_blob(self._repo, digest), self._origin
        )
        await fetch.wait_ready()
        return FetchingBlob(fetch, Outcome.COALESCED if coalesced else Outcome.MISS)
