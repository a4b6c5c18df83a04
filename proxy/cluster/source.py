"""``ClusterBlobSource``: one upstream fetch per blob across replicas.

It wraps an upstream ``BlobSource`` and is what ``FetchedBlobs`` opens a blob through when
the cluster is configured. Each ``open_blob`` is a ``ClusterFetch`` that asks Redis for
the digest's lease and then:

* **acquired**: this replica fetches. First from a replica that holds the digest
  committed (peer fill), else from the upstream. The lease is renewed while the fetch
  runs and released (compare-and-delete) when it ends, after the commit, so a replica
  that asks at any moment either follows the fetch or finds the holder record.
* **held elsewhere**: follow the owner's fetch over its peer endpoint (``PeerBlob``). The
  bytes go through this replica's own ``BlobWriter`` and digest check, and its clients are
  served as local followers are (they read this replica's temp file).
* **Redis did not answer**: fetch from the upstream, as a single process does.

Takeover: when a peer stream fails (the owner died, was cut off, or answered that it has
no such fetch), the follower asks for the lease *replacing the owner it saw fail*. One
follower wins and continues from the bytes it already has with an upstream ``Range``;
the others follow the new owner from their own offsets. A dead owner's lease is also
taken once it expires. The consumer sees one uninterrupted stream of the whole blob.

Repository scoping: what this source yields is proven to be held by *its* (upstream,
repository): fetched from the upstream for it, or followed from an owner that fetched it
for the same origin, or else confirmed with an upstream HEAD first. So
``ScopedBlobs``'s proof (a fetch started for this repository) stays true.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, AsyncExitStack, asynccontextmanager, suppress
from typing import Literal, Protocol

from proxy import metrics
from proxy.cluster.leases import LeaseHolder
from proxy.cluster.node import ClusterNode
from proxy.cluster.peer import PeerBlob, PeerUnavailable, open_peer_blob
from proxy.errors import BlobUnknown
from proxy.interfaces import BlobSource, BlobStatter, UpstreamBlob, UpstreamBlobHead
from proxy.model import Digest

log = logging.getLogger(__name__)

MAX_SWITCHES = 8
"""Sources one fetch may move through (owner, new owner, upstream) before it fails."""

HOLDER_ANSWER_TIMEOUT = 5.0
"""How long a holder may take to answer (headers); then the next holder, or upstream."""

SegmentKind = Literal["upstream", "owner", "holder"]


class ResumableBlobSource(BlobSource, Protocol):
    def open_blob_from(
        self, repo: str, digest: Digest, offset: int
    ) -> AbstractAsyncContextManager[UpstreamBlob]:
        """The blob's bytes from ``offset``; ``size`` is None unless ``offset`` is 0."""
        ...


class ClusterBlobSource(BlobSource):
    """An upstream ``BlobSource`` whose blob fetches are coordinated across replicas."""

    def __init__(
        self, inner: ResumableBlobSource, node: ClusterNode, committed: BlobStatter
    ) -> None:
        """``committed`` says whether this replica's store holds a blob (its ``stat``):
        only then is the replica recorded as a holder."""
        self._inner = inner
        self._node = node
        self._committed = committed
        self.name = inner.name

    async def head_blob(self, repo: str, digest: Digest) -> UpstreamBlobHead:
        return await self._inner.head_blob(repo, digest)

    def open_blob(self, repo: str, digest: Digest) -> AbstractAsyncContextManager[UpstreamBlob]:
        return self.open_blob_from(repo, digest, 0)

    @asynccontextmanager
    async def open_blob_from(
        self, repo: str, digest: Digest, offset: int
    ) -> AsyncIterator[UpstreamBlob]:
        """The blob from ``offset`` (a worker continuing a dead sibling's fetch: the same
        lease rules, every source asked from there; ``size`` None unless 0)."""
        fetch = ClusterFetch(self._inner, self._node, repo, digest, start=offset)
        try:
            await fetch.open()
            yield fetch
            # The consumer's block (it spans the commit) ended without an error: the
            # blob is stored, unless the cache could not take it (disk full).
            with suppress(BlobUnknown):
                await self._committed.stat(digest)
                await fetch.committed()
        finally:
            await fetch.close()


class ClusterFetch(UpstreamBlob):
    """One blob's bytes, from wherever the cluster says, as one stream from offset 0."""

    def __init__(
        self,
        inner: ResumableBlobSource,
        node: ClusterNode,
        repo: str,
        digest: Digest,
        *,
        start: int = 0,
    ) -> None:
        self._inner = inner
        self._node = node
        self._repo = repo
        self._digest = digest
        self._me = node.holder(inner.name, repo)
        self._key = node.leases.blob_key(digest)
        self._owned = False
        self._followed: LeaseHolder | None = None
        self._proven = False
        self._stack = AsyncExitStack()
        self._segment: UpstreamBlob | None = None
        self._kind: SegmentKind = "upstream"
        self._kinds: set[SegmentKind] = set()
        self._switches = 0
        self._size: int | None = None
        self._renewal: asyncio.Task[None] | None = None
        self._watcher: asyncio.Task[None] | None = None
        self.received = start

    @property
    def size(self) -> int | None:
        return self._size

    # Opening ----------------------------------------------------------------------------

    async def open(self) -> None:
        """Decide where the bytes come from and open that source; raises as the upstream
        would (``BlobUnknown`` on its 404)."""
        current = None
        if not self._node.closing:
            current = await self._node.leases.acquire(self._key, self._me)
        if current is None:
            metrics.CLUSTER_LEASES.labels("unavailable").inc()
            await self._open_upstream()
        elif current == self._me:
            self._own("acquired")
            if not await self._fill_from_holder():
                await self._open_upstream()
        else:
            metrics.CLUSTER_LEASES.labels("followed").inc()
            await self._follow(current)

    async def _prove(self, origin: tuple[str, str]) -> None:
        """Bytes fetched for another origin: confirm ours holds the digest (HEAD)."""
        if origin != self._me.origin and not self._proven:
            await self._inner.head_blob(self._repo, self._digest)
        self._proven = True

    async def _follow(self, owner: LeaseHolder) -> None:
        self._followed = owner
        if owner.address == self._me.address:
            # Our own address under another node id: a former life of this replica.
            await self._after_peer_failure()
            return
        await self._prove(owner.origin)
        try:
            segment = await self._stack.enter_async_context(
                open_peer_blob(
                    self._node.session,
                    self._node.signer,
                    owner.address,
                    self._digest,
                    self.received,
                )
            )
        except (BlobUnknown, PeerUnavailable) as exc:
            log.info(
                "cannot follow the fetch at %s: %s",
                owner.address,
                exc.message,
                extra={"digest": str(self._digest)},
            )
            await self._after_peer_failure()
            return
        self._use(segment, "owner")
        self._watch(segment, owner)

    def _watch(self, segment: PeerBlob, owner: LeaseHolder) -> None:
        """While following ``owner``: if it stops renewing its lease (hung, or dead with
        its connection still open) and no byte arrives for a renewal interval, give the
        stream up so that ``chunks`` takes over. A lease released after a commit is no
        reason: the rest of the stream is arriving then."""
        self._stop_watching()

        async def watch() -> None:
            seen = segment.received
            while True:
                await asyncio.sleep(self._node.leases.ttl / 3)  # a timer, like renewal
                stalled = segment.received == seen
                seen = segment.received
                if stalled and await self._node.leases.held_by(self._key, owner) is False:
                    segment.cut("the owner's lease lapsed and its stream stalled")
                    return

        self._watcher = asyncio.create_task(watch(), name=f"watch lease {self._digest}")

    def _stop_watching(self) -> None:
        if self._watcher is not None:
            self._watcher.cancel()
            self._watcher = None

    async def _fill_from_holder(self) -> bool:
        holders = await self._node.holders.get(self._digest)
        for address, origin in holders.items():
            if address == self._me.address:
                continue
            await self._prove(origin)
            try:
                # A holder serves a committed file: it answers at once, or it is hung.
                async with asyncio.timeout(HOLDER_ANSWER_TIMEOUT):
                    segment = await self._stack.enter_async_context(
                        open_peer_blob(
                            self._node.session,
                            self._node.signer,
                            address,
                            self._digest,
                            self.received,
                        )
                    )
            except BlobUnknown:
                await self._node.holders.remove(self._digest, address)
                continue
            except (PeerUnavailable, TimeoutError):
                continue
            self._use(segment, "holder")
            return True
        return False

    async def _open_upstream(self) -> None:
        segment = await self._stack.enter_async_context(
            self._inner.open_blob_from(self._repo, self._digest, self.received)
        )
        self._proven = True
        self._use(segment, "upstream")

    def _use(self, segment: UpstreamBlob, kind: SegmentKind) -> None:
        if self._size is None and self.received == 0:
            self._size = segment.size
        self._segment = segment
        self._kind = kind
        self._kinds.add(kind)

    async def _after_peer_failure(self) -> None:
        """The peer we read from failed: continue from ``received`` elsewhere."""
        self._stop_watching()
        await self._stack.aclose()
        self._stack = AsyncExitStack()
        self._switches += 1
        if self._switches > MAX_SWITCHES:
            raise PeerUnavailable(f"gave up after {MAX_SWITCHES} sources")
        if self._owned:  # a holder failed us: the upstream it is
            await self._open_upstream()
            return
        current = await self._node.leases.acquire(self._key, self._me, replacing=self._followed)
        if current is None:
            metrics.CLUSTER_LEASES.labels("unavailable").inc()
            await self._open_upstream()
        elif current == self._me:
            log.info(
                "took over the fetch from %s at byte %d",
                self._followed.address if self._followed else "?",
                self.received,
                extra={"digest": str(self._digest)},
            )
            self._own("takeover")
            await self._open_upstream()
        else:
            await self._follow(current)

    # Streaming --------------------------------------------------------------------------

    async def chunks(self) -> AsyncIterator[bytes]:
        while True:
            segment = self._segment
            assert segment is not None, "open() first"
            try:
                async for chunk in segment.chunks():
                    self.received += len(chunk)
                    yield chunk
                return
            except PeerUnavailable as exc:
                if self._kind == "upstream":
                    raise
                log.info(
                    "peer stream failed at byte %d: %s",
                    self.received,
                    exc.message,
                    extra={"digest": str(self._digest)},
                )
                await self._after_peer_failure()

    # Lease --------------------------------------------------------------------------------

    def _own(self, result: str) -> None:
        self._owned = True
        metrics.CLUSTER_LEASES.labels(result).inc()
        self._renewal = asyncio.create_task(self._renew(), name=f"lease {self._digest}")

    async def _renew(self) -> None:
        interval = self._node.leases.ttl / 3
        while True:
            await asyncio.sleep(interval)  # a timer: the lease must be renewed on time
            if await self._node.leases.renew(self._key, self._me) is False:
                log.warning("lost the fetch lease", extra={"digest": str(self._digest)})
                return

    async def committed(self) -> None:
        """The blob is stored here: record this replica as a holder."""
        await self._node.holders.add(self._digest, self._me.address, self._me.origin)
        source = next(iter(self._kinds)) if len(self._kinds) == 1 else "mixed"
        metrics.CLUSTER_FETCHES.labels(source).inc()

    async def close(self) -> None:
        """Stop renewing, close the source, release the lease if ours. Idempotent."""
        self._stop_watching()
        if self._renewal is not None:
            self._renewal.cancel()
            with suppress(asyncio.CancelledError):
                await self._renewal
            self._renewal = None
        await self._stack.aclose()
        if self._owned:
            self._owned = False
            await self._node.leases.release(self._key, self._me)
