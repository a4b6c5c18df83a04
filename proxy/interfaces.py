"""The roles of the pull-through cache, after CNCF Distribution's ``blobs.go``.

Each Protocol is one role with one to three methods; implementations name the Protocols
they satisfy so mypy checks them where they are defined. Middleware takes and returns
the same Protocol and adds exactly one concern; chains are assembled in
``proxy.pullthrough.registry``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from proxy.model import Descriptor, Digest


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
    def path(self, digest: Digest) -> Path:
        """Where the committed blob lives. The file may be absent: opening it is the check."""
        ...

    async def read(self, digest: Digest, limit: int) -> bytes:
        """The whole committed blob, up to ``limit`` bytes (manifests, configs).

        Raises ``BlobUnknown`` when it is absent and ``TooLarge`` when it is bigger.
        """
        ...


class BlobWriter(Protocol):
    """A blob being ingested into a temp file. Exactly one of commit/cancel ends it."""

    @property
    def temp_path(self) -> Path:
        """The growing temp file; readers may follow it while it is written."""
        ...

    async def write(self, *chunks: bytes) -> None:
        """Append ``chunks`` (in order) and hash them."""
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


class BlobIngester(Protocol):
    async def create(self, digest: Digest) -> BlobWriter:
        """Start ingesting the blob ``digest``: a temp file on the store's filesystem."""
        ...


class BlobService(BlobStatter, BlobProvider, BlobIngester, Protocol):
    """Everything a local store does for blobs."""


class BlobStore(BlobService, Protocol):
    async def delete(self, digest: Digest) -> None:
        """Remove a committed blob. Idempotent."""
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


class LinkService(Protocol):
    """Which repositories are known to hold a digest (Distribution's linked blob store).

    A digest is served for ``<upstream>/<repo>`` only when linked there: content cached
    through one repository is not handed out through another by guessing its digest.
    """

    async def linked(self, upstream: str, repo: str, digest: Digest) -> bool:
        """Whether ``repo`` on ``upstream`` is known to hold ``digest``. Never raises."""
        ...

    async def link(self, upstream: str, repo: str, digests: list[Digest]) -> None:
        """Record that ``repo`` holds ``digests``. Idempotent; advisory layers never raise."""
        ...


class UpstreamBlob(Protocol):
    """An open upstream blob response: its size (when announced) and its body."""

    @property
    def size(self) -> int | None: ...

    def chunks(self) -> AsyncIterator[bytes]:
        """The body in chunks. Raises ``UpstreamUnavailable`` when cut off."""
        ...
