"""The repository-scoped end of the descriptor chain.

``UpstreamBlobStatter`` is the bottom link: a HEAD on the upstream, for one repository.
``RepositoryScopedStatter`` sits above the shared caches and asks them only for digests
linked to its repository; any other digest must first be confirmed by the upstream for
this repository (which then links it). So content cached through one repository is never
handed out through another by guessing its digest, while the bytes stay shared on disk.
"""

from __future__ import annotations

from proxy.errors import BlobUnknown
from proxy.interfaces import BlobDescriptorService, LinkService
from proxy.model import Descriptor, Digest
from proxy.upstream.client import UpstreamClient


class UpstreamBlobStatter(BlobDescriptorService):
    """HEAD ``/v2/<repo>/blobs/<digest>`` upstream. Raises BlobUnknown on a 404."""

    def __init__(self, client: UpstreamClient, repo: str) -> None:
        self._client = client
        self._repo = repo

    async def stat(self, digest: Digest) -> Descriptor:
        head = await self._client.head_blob(self._repo, digest)
        if head.size is None:
            raise BlobUnknown(f"upstream gave no size for blob {digest}")
        return Descriptor(digest, head.size)

    async def set_descriptor(self, digest: Digest, descriptor: Descriptor) -> None:
        return None

    async def clear(self, digest: Digest) -> None:
        return None


class RepositoryScopedStatter(BlobDescriptorService):
    def __init__(
        self,
        links: LinkService,
        upstream_name: str,
        repo: str,
        cached: BlobDescriptorService,
        upstream: BlobDescriptorService,
    ) -> None:
        self._links = links
        self._upstream_name = upstream_name
        self._repo = repo
        self._cached = cached
        self._upstream = upstream

    async def stat(self, digest: Digest) -> Descriptor:
        if await self._links.linked(self._upstream_name, self._repo, digest):
            return await self._cached.stat(digest)
        descriptor = await self._upstream.stat(digest)
        await self._links.link(self._upstream_name, self._repo, [digest])
        await self._cached.set_descriptor(digest, descriptor)
        return descriptor

    async def set_descriptor(self, digest: Digest, descriptor: Descriptor) -> None:
        await self._links.link(self._upstream_name, self._repo, [digest])
        await self._cached.set_descriptor(digest, descriptor)

    async def clear(self, digest: Digest) -> None:
        await self._cached.clear(digest)
