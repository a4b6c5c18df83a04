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
this disk does not hold (learned by a HEAD, or from another replica through Redis). Both
the store's ``stat`` and the upstream HEAD are descriptor layers wrapped in
``instrumented``, so look-ups are counted per layer (disk, upstream) in one place.
"""

from __future__ import annotations

from contextlib import AbstractAsyncContextManager

from proxy.cache.instrumented import instrumented
from proxy.errors import BlobUnknown
from proxy.interfaces import (
    BlobDescriptorService,
    BlobProvider,
    BlobSource,
    BlobStatter,
    ColdFetchGate,
    FetchingBlob,
    LinkService,
    LocalBlob,
    OpenedBlob,
    RepositoryBlobs,
    UpstreamBlob,
)
from proxy.model import Descriptor, Digest, Outcome
from proxy.pullthrough.inflight import BlobResumer, InflightBlobFetches


class RepositoryScope:
    """Which digests one (upstream, repository) may see; the only writer of its links.

    Blobs (``ScopedBlobs``) and manifests (``ProxyManifestService``) both decide here.
    """

    def __init__(self, links: LinkService, upstream: str, repo: str) -> None:
        self._links = links
        self._upstream = upstream
        self._repo = repo
        self.origin = (upstream, repo)

    async def holds(self, digest: Digest) -> bool:
        """Whether the repository is known to hold ``digest``. Never raises."""
        if self._links.known(self._upstream, self._repo, digest):
            return True
        return await self._links.linked(self._upstream, self._repo, digest)

    def known(self, digest: Digest) -> bool:
        """``holds`` as far as this process knows without asking (see ``LinkService.known``):
        True is an answer, False is not (then ``holds``)."""
        return self._links.known(self._upstream, self._repo, digest)

    async def record(self, digests: list[Digest]) -> None:
        """The upstream proved the repository holds ``digests``. Idempotent."""
        await self._links.link(self._upstream, self._repo, digests)


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
    """The committed file when there is one; otherwise the layer below.

    ``committed`` answers whether the file is there (the store's ``stat``, instrumented as
    the disk layer); ``files`` says where it is.
    """

    def __init__(
        self,
        committed: BlobStatter,
        files: BlobProvider,
        descriptors: BlobDescriptorService,
        inner: RepositoryBlobs,
    ) -> None:
        self._committed = committed
        self._files = files
        self._descriptors = descriptors
        self._inner = inner

    async def stat(self, digest: Digest) -> Descriptor:
        try:
            return await self._descriptors.stat(digest)
        except BlobUnknown:
            return await self._inner.stat(digest)

    async def open(self, digest: Digest) -> OpenedBlob:
        try:
            descriptor = await self._committed.stat(digest)
        except BlobUnknown:
            return await self._inner.open(digest)
        return LocalBlob(descriptor, self._files.path(digest))


class FetchedBlobs(RepositoryBlobs):
    """The bottom layer: the upstream, through the application's one fetch per digest."""

    def __init__(
        self,
        source: BlobSource,
        repo: str,
        inflight: InflightBlobFetches,
        descriptors: BlobDescriptorService,
        gate: ColdFetchGate | None = None,
    ) -> None:
        self._source = source
        self._repo = repo
        self._origin = (source.name, repo)
        self._inflight = inflight
        self._descriptors = descriptors
        self._gate = gate

    async def stat(self, digest: Digest) -> Descriptor:
        """A HEAD upstream, unless a fetch for this repository has its answer already.
        What the upstream says is recorded in the descriptor caches."""
        fetch = self._inflight.get(digest)
        if fetch is not None and fetch.origin == self._origin and fetch.size is not None:
            return Descriptor(digest, fetch.size)  # arriving now: no need to ask
        upstream = instrumented("upstream")(UpstreamBlobStatter(self._source, self._repo))
        descriptor = await upstream.stat(digest)
        await self._descriptors.set_descriptor(digest, descriptor)
        return descriptor

    async def open(self, digest: Digest) -> OpenedBlob:
        """Join the fetch of ``digest`` in progress, or start one for this repository;
        returns once the upstream's headers are in (``BlobUnknown`` on its 404).

        Only starting a fetch passes the ``gate`` (quotas): joining one costs nothing."""
        if self._gate is not None and self._inflight.get(digest) is None:
            await self._gate.admit()
        resume: BlobResumer | None = None
        open_from = getattr(self._source, "open_blob_from", None)
        if open_from is not None:  # sources that can continue at an offset (Range)

            def resume(offset: int) -> AbstractAsyncContextManager[UpstreamBlob]:
                opened: AbstractAsyncContextManager[UpstreamBlob] = open_from(
                    self._repo, digest, offset
                )
                return opened

        fetch, coalesced = self._inflight.join(
            digest, lambda: self._source.open_blob(self._repo, digest), self._origin, resume
        )
        await fetch.wait_ready()
        # Following another worker's fetch is coalescing too, across processes.
        joined = coalesced or fetch.followed
        return FetchingBlob(fetch, Outcome.COALESCED if joined else Outcome.MISS)


class UpstreamBlobStatter(BlobDescriptorService):
    """HEAD ``/v2/<repo>/blobs/<digest>`` upstream, as a descriptor layer (so that
    ``instrumented("upstream")`` counts it). Raises BlobUnknown on a 404."""

    def __init__(self, source: BlobSource, repo: str) -> None:
        self._source = source
        self._repo = repo

    async def stat(self, digest: Digest) -> Descriptor:
        head = await self._source.head_blob(self._repo, digest)
        if head.size is None:
            raise BlobUnknown(f"upstream gave no size for blob {digest}")
        return Descriptor(digest, head.size)

    async def set_descriptor(self, digest: Digest, descriptor: Descriptor) -> None:
        return None

    async def clear(self, digest: Digest) -> None:
        return None
