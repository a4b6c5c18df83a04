"""The roles of the pull-through cache, after CNCF Distribution's ``blobs.go``.

Each Protocol is one role with one to three methods; implementations name the Protocols
they satisfy so mypy checks them where they are defined. Middleware takes and returns
the same Protocol and adds exactly one concern; chains are assembled in
``proxy.pullthrough.registry``.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Protocol, runtime_checkable

from proxy.errors import CacheWriteFailed
from proxy.model import Descriptor, Digest, Outcome


class BlobStatter(Protocol):
    async def stat(self, digest: Digest) -> Descriptor:
        """Describe the blob. Raises ``BlobUnknown`` when this layer does not know it.

        Read-only and idempotent; a layer that fails for its own reasons (a cache that
        is down) reports a miss rather than an error.
        """
        ...


class BlobDescriptorService(BlobStatter, Protocol):
    async def set_descriptor(self, digest: Digest, descriptor: Descriptor) -> None:
        """Record what is known of ``digest``. Idempotent; advisory layers never raise."""
        ...

    async def clear(self, digest: Digest) -> None:
        """Forget ``digest`` (its content is gone). Idempotent; never raises for a miss."""
        ...


DescriptorMiddleware = Callable[[BlobDescriptorService], BlobDescriptorService]
"""Distribution's ``BlobDescriptorServiceFactory.BlobAccessController``: wrap a service."""


class BlobProvider(Protocol):
    """The read side of the local store: committed blobs."""

    def path(self, digest: Digest) -> Path:
        """Where the committed blob lives. The file may be absent: opening it is the check."""
        ...

    async def read(self, digest: Digest, limit: int) -> bytes:
        """The whole committed blob, up to ``limit`` bytes (manifests, configs).

        Raises ``BlobUnknown`` when it is absent and ``TooLarge`` when it is bigger.
        """
        ...


class BlobWriter(Protocol):
    """A blob being ingested into a temp file. Exactly one of commit/cancel ends it.

    When the cache cannot take the blob (no space, a failed write) the writer has no file
    and only hashes, so what is streamed past the cache can still be verified; ``commit``
    then raises ``CacheWriteFailed``.
    """

    @property
    def temp_path(self) -> Path | None:
        """The growing temp file, which readers may follow while it is written; None when
        the writer has no file (never had one, or dropped it after a failed write)."""
        ...

    failure: CacheWriteFailed | None
    """Why the writer has no file (None while it has one)."""

    async def write(self, *chunks: bytes) -> None:
        """Append ``chunks`` (in order) and hash them. Raises ``CacheWriteFailed`` once,
        when writing fails (the file is dropped); afterwards it only hashes."""
        ...

    async def verify(self, expected: Descriptor) -> None:
        """Check digest and size of what was written, without committing.

        Raises ``DigestMismatch`` (and removes the temp file) when the bytes are wrong.
        """
        ...

    async def commit(self, expected: Descriptor) -> Descriptor:
        """Verify digest and size, fsync, rename into place; returns the stored descriptor.

        Raises ``DigestMismatch`` (and removes the temp file) when the bytes are wrong.
        """
        ...

    async def cancel(self) -> None:
        """Remove the temp file. Idempotent; safe after a failed commit."""
        ...


@runtime_checkable
class BlockingBlobWriter(Protocol):
    """A ``BlobWriter`` that worker threads may feed directly, writing and hashing apart
    (so the two can run side by side on two cores).

    Each byte of the blob goes through ``hash_blocking`` exactly once and in order, and
    through ``write_blocking`` in the same order until a write fails; ``verify`` and
    ``commit`` are then called on the event loop as usual, after both threads stopped.
    """

    def write_blocking(self, data: memoryview) -> CacheWriteFailed | None:
        """Append ``data`` to the file, without hashing it; blocks (a worker thread).
        Returns the failure once when the write fails (the file is dropped; later calls
        do nothing); ``write_failed`` must then be called on the event loop."""
        ...

    def hash_blocking(self, data: memoryview) -> None:
        """Add ``data`` to the digest and the size; blocks (a worker thread)."""
        ...

    def write_failed(self) -> None:
        """The event loop's side of a failed ``write_blocking`` (space bookkeeping)."""
        ...


class BlobIngester(Protocol):
    async def create(self, digest: Digest, size: int | None = None) -> BlobWriter:
        """Start ingesting the blob ``digest`` (``size`` bytes, when known): a temp file on
        the store's filesystem, or a writer without one when the space is short."""
        ...

    async def put(self, digest: Digest, data: bytes) -> Descriptor:
        """Store a small blob held in memory (a manifest) with the same verify-then-commit.

        Raises ``DigestMismatch`` (and stores nothing) when ``data`` is not ``digest``.
        """
        ...


class BlobStore(BlobStatter, BlobProvider, BlobIngester, Protocol):
    """What the pull-through needs from the local store: ``stat`` says whether a blob is
    committed (``BlobUnknown`` when not), the rest reads and writes it."""

    async def delete(self, digest: Digest) -> None:
        """Remove a committed blob. Idempotent."""
        ...


# --------------------------------------------------------------------- one repository


class ArrivingBlob(Protocol):
    """A blob fetch in progress that clients follow (``proxy.pullthrough.inflight``)."""

    digest: Digest
    size: int | None
    """The announced size; None when the upstream sent none (chunked)."""
    origin: tuple[str, str]
    """The (upstream, repository) the fetch asked upstream for: its success proves that
    repository holds the digest, and no other."""

    def spans(
        self, offset: int = 0
    ) -> AsyncGenerator[tuple[BinaryIO, int, int] | memoryview, None]:
        """The bytes as they arrive: (file, offset, length) of what is in the temp file,
        then, when the cache could not take the rest, the bytes themselves; raises if the
        fetch fails."""
        ...

    def read(self, offset: int = 0) -> AsyncGenerator[bytes, None]:
        """The bytes as they are written, in bounded chunks; raises if it fails."""
        ...

    async def wait_done(self) -> Descriptor:
        """Wait for the fetch to end: its descriptor, or the fetch's error. Raises
        ``CacheWriteFailed`` when the bytes arrived but the cache could not keep them
        (the fetch went pass-through)."""
        ...


@dataclass(frozen=True, slots=True)
class LocalBlob:
    """A committed blob: serve the file (sendfile, Range)."""

    descriptor: Descriptor
    path: Path

    @property
    def outcome(self) -> Outcome:
        return Outcome.HIT


@dataclass(frozen=True, slots=True)
class FetchingBlob:
    """A blob arriving from upstream: follow the fetch. ``outcome`` is MISS for the
    request that started it, COALESCED for the others."""

    fetch: ArrivingBlob
    outcome: Outcome


OpenedBlob = LocalBlob | FetchingBlob


class RepositoryBlobs(BlobStatter, Protocol):
    """The blobs of one (upstream, repository): what the API's blob handlers ask.

    One chain of these per request, outermost first: [middleware from settings] ->
    repository scoping -> local store -> in-flight fetch / upstream
    (``proxy.pullthrough.registry``). ``stat`` answers HEAD and never downloads;
    ``open`` answers GET. Both raise ``BlobUnknown`` when this repository does not have
    the digest, and upstream errors (``UpstreamError``, ``TooManyRequests``) when the
    answer needed the upstream and it failed.
    """

    async def open(self, digest: Digest) -> OpenedBlob:
        """The committed blob, or the fetch bringing it (joined or started, its upstream
        headers received). Never buffers the body."""
        ...


class ColdFetchGate(Protocol):
    """Asked before a request makes the proxy fetch from upstream (a cold fetch), never
    for a cache hit or for joining a fetch in progress: per-identity quotas."""

    async def admit(self) -> None:
        """Raise ``TooManyRequests`` when this request may not start an upstream fetch."""
        ...

    async def charge(self, size: int) -> None:
        """Count ``size`` bytes fetched from upstream for this request."""
        ...


BlobMiddleware = Callable[[RepositoryBlobs], RepositoryBlobs]
"""Distribution's ``BlobAccessController``: wrap a repository's blob service in one more
concern (access control, quotas, stats). Configured middleware is the outermost."""


# --------------------------------------------------------------------- upstream side


@dataclass(frozen=True, slots=True)
class UpstreamBlobHead:
    size: int | None
    digest: Digest | None


@dataclass(frozen=True, slots=True)
class UpstreamManifest:
    """A manifest as the upstream answered it; ``body`` is None for HEAD."""

    digest: Digest
    media_type: str
    size: int
    body: bytes | None


class UpstreamBlob(Protocol):
    """An open upstream blob response: its size (when announced) and its body."""

    @property
    def size(self) -> int | None: ...

    def chunks(self) -> AsyncIterator[bytes]:
        """The body in chunks. Raises ``UpstreamUnavailable`` when cut off."""
        ...


class BlockingBody(Protocol):
    """The rest of an upstream body, read by one worker thread straight from its socket
    (``DetachableBlob.detach``). Every method but ``close`` blocks at most ``wait``'s
    timeout; none may be called on the event loop."""

    received: int
    """Bytes of the whole blob received so far (where a resume continues)."""

    read_timeout: float | None
    """Longest silence of the upstream before the reader gives up (``sock_read``)."""

    @property
    def done(self) -> bool:
        """Every byte of the body has been received."""
        ...

    def readinto(self, view: memoryview) -> int:
        """Bytes read into ``view`` now, 0 when none are waiting (never more than the
        body has left). Raises ``OSError`` when the connection failed or ended early."""
        ...

    def wait(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for bytes; whether some are waiting."""
        ...

    def close(self) -> None:
        """Release the socket (the reader's end; idempotent)."""
        ...


@runtime_checkable
class DetachableBlob(Protocol):
    """An ``UpstreamBlob`` whose body can be read off the event loop (plain HTTP)."""

    def detach(self) -> BlockingBody | None:
        """The body's socket, handed to a blocking reader, or None when this body cannot
        be (TLS, no length, too short to be worth it, or ``chunks`` has started).

        After a detach the event loop no longer reads that connection and it is never
        reused. ``chunks`` may still be called after the reader stopped early: it
        resumes the body from ``BlockingBody.received`` as it would after a cut.
        """
        ...


class BlobSource(Protocol):
    """What the pull-through needs from an upstream for blobs (``UpstreamClient``)."""

    name: str
    """The upstream's configured name (the key of its tags, links and metrics)."""

    async def head_blob(self, repo: str, digest: Digest) -> UpstreamBlobHead:
        """HEAD the blob in ``repo``; raises ``BlobUnknown`` on a 404, upstream errors."""
        ...

    def open_blob(self, repo: str, digest: Digest) -> AbstractAsyncContextManager[UpstreamBlob]:
        """GET the blob in ``repo``; entering raises ``BlobUnknown`` on a 404. Leaving
        releases the connection."""
        ...


class UpstreamBudget(Protocol):
    """The upstream's health and pull budget, as the manifest service consults it."""

    def budget_low(self) -> bool:
        """Whether the upstream's reported pull budget is under the configured floor."""
        ...

    def refuse_cold_pull(self) -> None:
        """Raise ``TooManyRequests`` (or ``UpstreamUnavailable`` while the breaker is
        open) when a pull that must reach the upstream should not be tried."""
        ...


class ManifestSource(Protocol):
    """What the pull-through needs from an upstream for manifests (``UpstreamClient``)."""

    name: str
    health: UpstreamBudget

    async def get_manifest(
        self, repo: str, reference: str, accept: str | None, *, head: bool = False
    ) -> UpstreamManifest:
        """GET (or HEAD) a manifest, its digest checked; raises ``ManifestUnknown`` on a
        404 and upstream errors."""
        ...


@dataclass(frozen=True, slots=True)
class TagEntry:
    """What a tag pointed to when it was last checked upstream."""

    digest: Digest
    media_type: str
    size: int
    fetched_at: float


class TagService(Protocol):
    async def get(self, upstream: str, repo: str, tag: str) -> TagEntry | None:
        """The last known mapping of the tag, fresh or not; None when unknown."""
        ...

    async def set(self, upstream: str, repo: str, tag: str, entry: TagEntry) -> None:
        """Record a mapping. Advisory: never raises for a cache failure."""
        ...

    async def delete(self, upstream: str, repo: str, tag: str, digest: Digest) -> None:
        """Forget the mapping if it still points to ``digest`` (its content was evicted);
        a mapping repointed meanwhile is kept. Idempotent; never raises for a miss."""
        ...


class LinkService(Protocol):
    """Which repositories are known to hold a digest (Distribution's linked blob store).

    A digest is served for ``<upstream>/<repo>`` only when linked there: content cached
    through one repository is not handed out through another by guessing its digest.
    """

    async def linked(self, upstream: str, repo: str, digest: Digest) -> bool:
        """Whether ``repo`` on ``upstream`` is known to hold ``digest``. Never raises."""
        ...

    def known(self, upstream: str, repo: str, digest: Digest) -> bool:
        """True when this process already knows (in memory, without waiting on anything)
        that ``repo`` holds ``digest``; False means: ask ``linked``. For the warm path,
        where the await chain of ``linked`` costs more than the look-up."""
        return False

    async def link(self, upstream: str, repo: str, digests: list[Digest]) -> None:
        """Record that ``repo`` holds ``digests``. Idempotent; advisory layers never raise."""
        ...

    async def unlink(self, upstream: str, repo: str, digests: list[Digest]) -> None:
        """Forget that ``repo`` holds ``digests`` (their content was evicted). Idempotent."""
        ...


class TagRevalidations(Protocol):
    """Who revalidates a tag past its TTL, when several processes share the cache."""

    def turn(
        self, upstream: str, repo: str, tag: str, seen: TagEntry
    ) -> AbstractAsyncContextManager[TagEntry | None]:
        """Enter: None when the caller should revalidate now (others wait until the
        block exits); else the entry to use instead of asking the upstream: one another
        process revalidated meanwhile, or ``seen`` itself when waiting for that ran out.
        Never raises for a coordination failure (then: None)."""
        ...


class ManifestBodies(Protocol):
    """Manifest bodies shared between processes, by digest (advisory)."""

    async def get(self, digest: Digest) -> tuple[str, bytes] | None:
        """(media type, body) if known; the caller verifies the body's digest."""
        ...

    async def put(self, digest: Digest, media_type: str, body: bytes) -> None:
        """Share a verified body. Never raises."""
        ...
