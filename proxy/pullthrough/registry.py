"""The composition of the pull-through services: the one place chains are assembled.

Descriptor chain for blobs, outermost first (each link takes and returns a
BlobDescriptorService; middleware from settings wraps the outside):

    [middleware ...] -> CachedBlobStatter(MemoryDescriptorCache, DiskDescriptorService)

Blob bytes and manifests are shared by every upstream (content-addressed); tag mappings
are keyed by upstream name, so one repository name on two upstreams never collides.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from proxy.cache.cached import CachedBlobStatter
from proxy.cache.memory import MemoryDescriptorCache, MemoryTagStore
from proxy.interfaces import BlobDescriptorService, DescriptorMiddleware, TagService
from proxy.pullthrough.blobs import ProxyBlobStore
from proxy.pullthrough.inflight import InflightBlobFetches
from proxy.pullthrough.manifests import ProxyManifestService
from proxy.settings import Settings, UpstreamSettings
from proxy.storage.disk import DiskBlobStore, DiskDescriptorService
from proxy.storage.manifests import ManifestStore
from proxy.upstream.client import UpstreamClient


def build_descriptor_chain(
    store: DiskBlobStore,
    max_entries: int,
    middleware: Sequence[DescriptorMiddleware] = (),
) -> BlobDescriptorService:
    """memory -> disk, wrapped by ``middleware`` (first in the list is outermost)."""
    service: BlobDescriptorService = CachedBlobStatter(
        MemoryDescriptorCache(max_entries), DiskDescriptorService(store)
    )
    for wrap in reversed(middleware):
        service = wrap(service)
    return service


@dataclass
class UpstreamServices:
    settings: UpstreamSettings
    client: UpstreamClient
    manifests: ProxyManifestService
    blobs: ProxyBlobStore


class PullThroughRegistry:
    """Everything the API needs, built from settings; opened and closed by the app."""

    def __init__(
        self,
        settings: Settings,
        *,
        middleware: Sequence[DescriptorMiddleware] = (),
        tags: TagService | None = None,
    ) -> None:
        self.settings = settings
        self.store = DiskBlobStore(settings.cache_dir)
        self.descriptors = build_descriptor_chain(self.store, settings.memory_entries, middleware)
        self.manifest_store = ManifestStore(self.store)
        self.tags = tags if tags is not None else MemoryTagStore(settings.memory_entries)
        self.inflight = InflightBlobFetches(self.store, self.descriptors)
        self.upstreams: dict[str, UpstreamServices] = {}

    async def open(self) -> None:
        """Create directories, remove leftover temp files, open one session per upstream."""
        self.store.open_store()
        for up in self.settings.upstreams:
            client = UpstreamClient.create(up)
            self.upstreams[up.name] = UpstreamServices(
                settings=up,
                client=client,
                manifests=ProxyManifestService(up, client, self.manifest_store, self.tags),
                blobs=ProxyBlobStore(client, self.store, self.descriptors, self.inflight),
            )

    async def close(self) -> None:
        await self.inflight.close()
        for services in self.upstreams.values():
            await services.manifests.close()
            await services.client.close()
        self.upstreams.clear()

    def services(self, upstream: UpstreamSettings) -> UpstreamServices:
        return self.upstreams[upstream.name]
