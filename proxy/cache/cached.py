"""A cache in front of a backend descriptor service (Distribution's cachedBlobStatter).

``stat`` asks the cache, then the backend, and fills the cache on a backend hit.
``set_descriptor`` and ``clear`` go to both. The cache is advisory: its errors are
never the caller's problem, which is why a cache layer answers a miss, not an error.
"""

from __future__ import annotations

from proxy.errors import BlobUnknown
from proxy.interfaces import BlobDescriptorService
from proxy.model import Descriptor, Digest


class CachedBlobStatter(BlobDescriptorService):
    def __init__(self, cache: BlobDescriptorService, backend: BlobDescriptorService) -> None:
        self._cache = cache
        self._backend = backend

    async def stat(self, digest: Digest) -> Descriptor:
        try:
            return await self._cache.stat(digest)
        except BlobUnknown:
            pass
        descriptor = await self._backend.stat(digest)
        await self._cache.set_descriptor(digest, descriptor)
        return descriptor

    async def set_descriptor(self, digest: Digest, descriptor: Descriptor) -> None:
        await self._cache.set_descriptor(digest, descriptor)
        await self._backend.set_descriptor(digest, descriptor)

    async def clear(self, digest: Digest) -> None:
        await self._cache.clear(digest)
        await self._backend.clear(digest)
