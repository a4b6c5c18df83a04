"""Stats middleware: hits, misses, errors and latency of one descriptor layer."""

from __future__ import annotations

import time

from proxy import metrics
from proxy.errors import BlobUnknown, RegistryError
from proxy.interfaces import BlobDescriptorService, DescriptorMiddleware
from proxy.model import Descriptor, Digest


class InstrumentedDescriptorService(BlobDescriptorService):
    def __init__(self, inner: BlobDescriptorService, layer: str, kind: str = "blob") -> None:
        self._inner = inner
        self._hit = metrics.CACHE_LOOKUPS.labels(kind, layer, "hit")
        self._miss = metrics.CACHE_LOOKUPS.labels(kind, layer, "miss")
        self._error = metrics.CACHE_LOOKUPS.labels(kind, layer, "error")
        self._seconds = metrics.CACHE_SECONDS.labels(layer)

    async def stat(self, digest: Digest) -> Descriptor:
        started = time.perf_counter()
        try:
            descriptor = await self._inner.stat(digest)
        except BlobUnknown:
            self._miss.inc()
            raise
        except RegistryError:
            self._error.inc()
            raise
        finally:
            self._seconds.observe(time.perf_counter() - started)
        self._hit.inc()
        return descriptor

    async def set_descriptor(self, digest: Digest, descriptor: Descriptor) -> None:
        await self._inner.set_descriptor(digest, descriptor)

    async def clear(self, digest: Digest) -> None:
        await self._inner.clear(digest)


def instrumented(layer: str, kind: str = "blob") -> DescriptorMiddleware:
    """The middleware form: ``instrumented("redis")(service)``."""

    def wrap(inner: BlobDescriptorService) -> BlobDescriptorService:
        return InstrumentedDescriptorService(inner, layer, kind)

    return wrap
