"""The composition of the pull-through services: the one place chains are assembled.

The descriptor cache, shared by every repository, is built once::

    CachedBlobStatter(memory, CachedBlobStatter(redis, disk))     (redis only if configured)

with each layer wrapped in ``instrumented(<layer>)``. A blob request gets one chain for its
(upstream, repository), outermost first (``proxy.pullthrough.blobs``)::

    [middleware ...]                      the registry's, then the request's:
                                          AccessControlledBlobs (proxy.access.control)
      -> ScopedBlobs(links)               only digests this repository holds
        -> LocalBlobs(store, descriptors) the committed file; HEAD from the cache
          -> FetchedBlobs(upstream, gate) join or start the fetch (quotas are asked
                                          before one is started); HEAD upstream

Tags and links: an in-memory L1 before an L2 that is Redis when configured, else a
SQLite file in the cache directory. The disk's own index (``proxy.storage.index``: which
digests are manifests, what they reference, which tags name them, when each was used) is
always local: tags are recorded in it on the way to the tag stores, manifests by the
manifest store, uses in memory (flushed every ``FLUSH_INTERVAL``). Eviction
(``proxy.storage.eviction``) reads it and makes every layer forget what it removes
(``RegistryLayers``).

Blob bytes and manifests are shared by every upstream (content-addressed); tag mappings
and links are keyed by upstream name, so one repository name on two upstreams never
collides.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from proxy import metrics
from proxy.cache.cached import CachedBlobStatter
from proxy.cache.instrumented import instrumented
from proxy.cache.memory import MemoryDescriptorCache, MemoryLinkStore, MemoryTagStore
from proxy.cache.redis import (
    RedisDescriptorCache,
    RedisLayer,
    RedisLinkStore,
    RedisTagStore,
    connect,
)
from proxy.cache.tiered import TieredLinkStore, TieredTagStore
from proxy.cluster.manifests import ClusterTagRevalidations, RedisManifestBodies
from proxy.cluster.node import ClusterNode
from proxy.cluster.source import ClusterBlobSource
from proxy.interfaces import (
    BlobDescriptorService,
    BlobMiddleware,
    BlobProvider,
    BlobSource,
    BlobStatter,
    ColdFetchGate,
    LinkService,
    ManifestBodies,
    RepositoryBlobs,
    TagRevalidations,
    TagService,
)
from proxy.model import Digest
from proxy.pullthrough.blobs import FetchedBlobs, LocalBlobs, RepositoryScope, ScopedBlobs
from proxy.pullthrough.inflight import InflightBlobFetches
from proxy.pullthrough.manifests import ProxyManifestService
from proxy.pullthrough.relays import RelayCache
from proxy.settings import Settings, UpstreamSettings
from proxy.storage.disk import DiskBlobStore, DiskDescriptorService
from proxy.storage.eviction import Evictor
from proxy.storage.index import FLUSH_INTERVAL, CacheIndex, IndexedTagStore, TagName
from proxy.storage.lock import DirectoryLock
from proxy.storage.maintenance import POLL_INTERVAL, RECOUNT_INTERVAL, MaintenanceLock
from proxy.storage.manifests import ManifestStore
from proxy.storage.pins import Pins
from proxy.storage.state import SqliteState
from proxy.upstream.client import UpstreamClient

if TYPE_CHECKING:
    from proxy.workers import WorkerRole

log = logging.getLogger(__name__)

COMMIT_GRACE = 5.0
"""On shutdown, how long a fetch whose bytes are all in may take to commit."""


def local_statter(store: DiskBlobStore) -> BlobDescriptorService:
    """The committed files as a descriptor layer, instrumented as ``disk``."""
    return instrumented("disk")(DiskDescriptorService(store))


def build_shared_descriptors(
    store: DiskBlobStore, max_entries: int, redis: RedisLayer | None
) -> BlobDescriptorService:
    """memory -> [redis ->] disk, each layer instrumented."""
    backend = local_statter(store)
    if redis is not None:
        backend = CachedBlobStatter(instrumented("redis")(RedisDescriptorCache(redis)), backend)
    memory = instrumented("memory")(MemoryDescriptorCache(max_entries))
    return CachedBlobStatter(memory, backend)


def build_repository_blobs(
    source: BlobSource,
    repo: str,
    *,
    committed: BlobStatter,
    files: BlobProvider,
    descriptors: BlobDescriptorService,
    links: LinkService,
    inflight: InflightBlobFetches,
    middleware: Sequence[BlobMiddleware] = (),
    gate: ColdFetchGate | None = None,
) -> RepositoryBlobs:
    """One repository's blob chain; the first middleware in the list is the outermost.

    ``committed`` says whether the local store holds a blob (``local_statter``) and
    ``files`` where; ``descriptors`` is the shared descriptor cache; ``gate`` is asked
    before a fetch is started (quotas)."""
    fetched = FetchedBlobs(source, repo, inflight, descriptors, gate)
    scope = RepositoryScope(links, source.name, repo)
    service: RepositoryBlobs = ScopedBlobs(
        scope, LocalBlobs(committed, files, descriptors, fetched), fetched
    )
    for wrap in reversed(middleware):
        service = wrap(service)
    return service


class DirectoryBusy(OSError):
    """The cache directory's lock is held: by a running proxy (for the CLI), or by an
    operator command (for a proxy starting). An OSError (EBUSY), so ``serve`` reports it
    as the start-up error it is."""

    def __init__(self, directory: Path, exclusive: bool) -> None:
        holder = "a running proxy" if exclusive else "an operator command (registry-proxy cache)"
        super().__init__(errno.EBUSY, f"{directory} is in use by {holder}")
        self.directory = directory


class RegistryLayers:
    """The layers eviction must make forget what it removes (``CacheLayers``)."""

    def __init__(self, registry: PullThroughRegistry) -> None:
        self._registry = registry

    async def forget_tag(self, tag: TagName, digest: Digest) -> None:
        await self._registry.tags.delete(*tag, digest)

    async def forget_content(self, digest: Digest) -> None:
        self._registry.manifest_store.forget(digest)
        await self._registry.descriptors.clear(digest)
        if self._registry.cluster is not None:
            await self._registry.cluster.forget(digest)  # no longer a holder for peers

    async def unlink(self, upstream: str, repo: str, digests: list[Digest]) -> None:
        await self._registry.links.unlink(upstream, repo, digests)


@dataclass
class UpstreamServices:
    settings: UpstreamSettings
    client: UpstreamClient
    manifests: ProxyManifestService
    tag_lists: RelayCache
    referrers: RelayCache


class PullThroughRegistry:
    """Everything the API needs, built from settings; opened and closed by the app."""

    def __init__(self, settings: Settings, *, middleware: Sequence[BlobMiddleware] = ()) -> None:
        self.settings = settings
        self.middleware = tuple(middleware)
        self.store = DiskBlobStore(settings.cache_dir, min_free=settings.min_free)
        self.redis = RedisLayer(connect(settings.redis_url)) if settings.redis_url else None
        entries = settings.memory_entries
        self.descriptors = build_shared_descriptors(self.store, entries, self.redis)
        self.committed = local_statter(self.store)
        self.directory_lock = DirectoryLock(settings.cache_dir)
        self.index = CacheIndex(settings.cache_dir)
        self.store.on_use = lambda digest: self.index.times.touch((digest,))
        self.manifest_store = ManifestStore(
            self.store, index=self.index, before_put=lambda d: self.evictor.settled(d)
        )
        ttls = {up.name: up.tag_ttl for up in settings.upstreams}
        # L2 for tags and links: Redis when configured (shared by replicas), else the
        # SQLite file beside the blobs (survives restarts on the embedded defaults).
        self.state: SqliteState | None = None
        tags_l2: TagService
        links_l2: LinkService
        if self.redis is not None:
            tags_l2, links_l2 = RedisTagStore(self.redis), RedisLinkStore(self.redis)
        else:
            self.state = tags_l2 = links_l2 = SqliteState(settings.cache_dir)
        tiered = TieredTagStore(
            MemoryTagStore(entries),
            tags_l2,
            lambda name: ttls.get(name, 0.0),
            l2_layer="disk" if self.redis is None else "redis",
        )
        self.tags: TagService = IndexedTagStore(tiered, self.index, self._manifest_on_disk)
        self.links: LinkService = TieredLinkStore(MemoryLinkStore(entries * 4), links_l2)
        # Workers share the directory: fetches claim their temp files there.
        shared = self.store if settings.workers > 1 else None
        self.inflight = InflightBlobFetches(self.store, self.descriptors, shared=shared)
        # Replicas as one cache (proxy.cluster): needs Redis and the cluster section.
        self.cluster: ClusterNode | None = None
        self.tag_revalidations: TagRevalidations | None = None
        self.manifest_bodies: ManifestBodies | None = None
        if self.redis is not None and settings.cluster.enabled:
            self.cluster = ClusterNode(settings.cluster, self.redis)
            self.tag_revalidations = ClusterTagRevalidations(self.cluster, self.tags)
            self.manifest_bodies = RedisManifestBodies(self.redis)
        self.blob_sources: dict[str, BlobSource] = {}
        self.pins = Pins(settings.pin)
        self.evictor = Evictor(
            self.store,
            settings.max_size,
            self.index,
            RegistryLayers(self),
            high_watermark=settings.high_watermark,
            low_watermark=settings.low_watermark,
            min_age=settings.min_age,
            pinned=self.pins.image_pinned,
            busy=lambda digest: self.inflight.get(digest) is not None,
        )
        # Workers: only the one holding the maintenance lock evicts on its own.
        self.store.on_commit = self._committed
        self.store.on_space_needed = self._space_needed
        self.worker: WorkerRole | None = None
        """Set by the app when this is one of several workers (``settings.workers``)."""
        self.maintenance = MaintenanceLock(settings.cache_dir)
        self._maintainer: asyncio.Task[None] | None = None
        self._on_maintaining: list[tuple[Callable[[], None], Callable[[], Awaitable[None]]]] = []
        metrics.DISK_LIMIT_BYTES.set(settings.max_size or 0)
        self.upstreams: dict[str, UpstreamServices] = {}
        self._flusher: asyncio.Task[None] | None = None
        self._counting: asyncio.Task[None] | None = None
        self.draining = False

    async def open(self, *, exclusive: bool = False) -> None:
        """Take the directory's lock (shared by serving processes; ``exclusive`` for the
        operator CLI), create directories, remove leftover temp files, open one session
        per upstream. Raises ``DirectoryBusy`` when the lock is held the other way."""
        if not await asyncio.to_thread(self.directory_lock.acquire, exclusive=exclusive):
            raise DirectoryBusy(self.settings.cache_dir, exclusive)
        # Workers: the supervisor removed the leftovers before any worker ran; a worker
        # restarting beside live ones must not (their fetches' files are there).
        shared = self.settings.workers > 1 and not exclusive
        await asyncio.to_thread(self.store.prepare, remove_leftovers=not shared)
        if shared:
            self.store.publishes_usage = False
            self._maintainer = asyncio.create_task(self._maintain(), name="maintenance")
        if self.state is not None:
            await asyncio.to_thread(self.state.open)
        await asyncio.to_thread(self.index.open_sync)
        self._flusher = asyncio.create_task(self._flush_times(), name="index-flush")
        # Counting what is stored walks every file: it runs while the proxy serves
        # (a hit needs only the file's own stat). Eviction waits for it.
        self._counting = asyncio.create_task(self._count(evict=not exclusive), name="count")
        _precreate_series([up.name for up in self.settings.upstreams])
        if self.cluster is not None:
            await self.cluster.open()
        for up in self.settings.upstreams:
            client = UpstreamClient.create(up)
            self.blob_sources[up.name] = (
                client
                if self.cluster is None
                else ClusterBlobSource(client, self.cluster, self.store)
            )
            manifests = ProxyManifestService(
                up,
                client,
                self.manifest_store,
                self.tags,
                self.links,
                clock=time.time,
                on_pull=self.index.times.pulled,
                revalidations=self.tag_revalidations,
                bodies=self.manifest_bodies,
            )
            self.upstreams[up.name] = UpstreamServices(
                up, client, manifests, RelayCache(up, "tags"), RelayCache(up, "referrers")
            )

    def _committed(self) -> None:
        if self.maintaining:
            self.evictor.maybe_start()

    def _space_needed(self) -> None:
        if self.maintaining:
            self.evictor.maybe_start(low_space=True)

    @property
    def maintaining(self) -> bool:
        """Whether this process does the directory's background maintenance: always
        alone; with workers, while it holds the maintenance lock."""
        return self.settings.workers == 1 or self.maintenance.held

    def maintenance_task(
        self, start: Callable[[], None], stop: Callable[[], Awaitable[None]]
    ) -> None:
        """Run ``start`` once this process maintains the directory (at once when alone);
        ``stop`` is called at close."""
        self._on_maintaining.append((start, stop))
        if self.maintaining:
            start()

    async def _maintain(self) -> None:
        """Workers: take the maintenance lock when it is free, then recount and evict."""
        while True:
            if await asyncio.to_thread(self.maintenance.try_acquire):
                break
            await asyncio.sleep(POLL_INTERVAL)  # a timer: the holder may die at any time
        log.info("this worker maintains the cache directory")
        self.store.publishes_usage = True
        for start, _stop in self._on_maintaining:
            start()
        await self.counted()
        while True:
            count, size, _seen = await asyncio.to_thread(self.store._count_sync)
            self.store.recounted(count, size)
            self.evictor.maybe_start()
            if await asyncio.to_thread(self.store.low_on_space):
                self.evictor.maybe_start(low_space=True)
            await asyncio.sleep(RECOUNT_INTERVAL)

    async def _manifest_on_disk(self, digest: Digest) -> bool:
        """Whether the manifest ``digest`` is held, once no removal of it is under way: on
        disk, or in memory only (the disk could not take it: served from there)."""
        await self.evictor.settled(digest)
        if self.manifest_store.in_memory(digest):
            return True
        return await asyncio.to_thread(self.store.path(digest).exists)

    async def _count(self, *, evict: bool) -> None:
        started = time.perf_counter()
        await self.store.count()
        log.info(
            "cache indexed: %d files, %d bytes in %.2fs",
            self.store.blob_count,
            self.store.used_bytes,
            time.perf_counter() - started,
            extra={"dir": str(self.settings.cache_dir)},
        )
        if evict and self.maintaining:  # an operator command removes only what it is asked to
            self.evictor.maybe_start()

    async def counted(self) -> None:
        """Wait until the start-up count of the store has ended."""
        if self._counting is not None:
            await asyncio.shield(self._counting)

    async def _flush_times(self) -> None:
        """Write the access times gathered in memory, every ``FLUSH_INTERVAL``."""
        while True:
            await asyncio.sleep(FLUSH_INTERVAL)
            await self.index.flush()

    async def close(self) -> None:
        if self._maintainer is not None:
            self._maintainer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._maintainer
            self._maintainer = None
        for _start, stop in self._on_maintaining:
            await stop()
        if self._counting is not None and not self._counting.done():
            self._counting.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._counting
        if self._flusher is not None:
            self._flusher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._flusher
            self._flusher = None
        await self.evictor.close()
        await self.inflight.settle(COMMIT_GRACE)
        await self.inflight.close()
        for services in self.upstreams.values():
            await services.manifests.close()
            await services.tag_lists.close()
            await services.referrers.close()
            await services.client.close()
        self.upstreams.clear()
        self.blob_sources.clear()
        if self.cluster is not None:
            await self.cluster.close()
        if self.redis is not None:
            await self.redis.close()
        if self.state is not None:
            await asyncio.to_thread(self.state.close)
        await self.index.flush()
        await asyncio.to_thread(self.index.close_sync)
        self.maintenance.release()
        self.directory_lock.release()

    def drain(self) -> None:
        """Shutting down: unready, and no new fetch leases (others fetch instead)."""
        self.draining = True
        if self.cluster is not None:
            self.cluster.closing = True

    async def readiness(self) -> tuple[bool, dict[str, object]]:
        """Ready means the cache can be served: its directory is writable, and the
        process is not shutting down. Upstream and Redis states are reported; neither
        makes the proxy unready, since it serves its cache without them. Nor does low
        space: misses are then served pass-through."""
        writable = await asyncio.to_thread(self.store.writable)
        free, min_free = await asyncio.to_thread(self.store.space)
        report: dict[str, object] = {
            "cache": {
                "dir": str(self.settings.cache_dir),
                "writable": writable,
                "indexed": not self.store.counting,
                "files": self.store.blob_count,
                "bytes": self.store.used_bytes,
                "free_bytes": max(free, 0),
                "min_free_bytes": min_free,
                "low_space": free < min_free,
            },
            "draining": self.draining,
            "upstreams": {name: s.client.health.report() for name, s in self.upstreams.items()},
        }
        if self.evictor.max_bytes is not None:
            eviction: dict[str, object] = {
                "max_size": self.evictor.max_bytes,
                "used": self.store.used_bytes,
                "pins_over_limit": self.evictor.pins_over_limit,
            }
            if self.evictor.pins_over_limit and self.evictor.last_plan is not None:
                eviction["detail"] = (
                    f"pinned images take {self.evictor.last_plan.pinned_bytes} bytes,"
                    f" more than cache.max_size ({self.evictor.max_bytes}): they are kept"
                )
            report["eviction"] = eviction
        if self.redis is not None:
            report["redis"] = {"reachable": await self.redis.ping()}
        if self.cluster is not None:
            report["cluster"] = {"advertise": self.cluster.address}
        if self.worker is not None:
            report["worker"] = {
                "index": self.worker.index,
                "workers": self.worker.count,
                "pid": os.getpid(),
                "maintains": self.maintaining,
            }
        return writable and not self.draining, report

    def services(self, upstream: UpstreamSettings) -> UpstreamServices:
        return self.upstreams[upstream.name]

    def blobs(
        self,
        upstream: UpstreamSettings,
        repo: str,
        *,
        middleware: Sequence[BlobMiddleware] = (),
        gate: ColdFetchGate | None = None,
    ) -> RepositoryBlobs:
        """The blob chain for one request to ``<upstream>/<repo>``: the registry's
        middleware outermost, then the request's (access control), then the layers."""
        return build_repository_blobs(
            self.blob_sources[upstream.name],
            repo,
            committed=self.committed,
            files=self.store,
            descriptors=self.descriptors,
            links=self.links,
            inflight=self.inflight,
            middleware=(*self.middleware, *middleware),
            gate=gate,
        )


def _precreate_series(upstreams: list[str]) -> None:
    """Create every labelled series at 0, so dashboards show 0 rather than "no data" and
    ``increase()`` sees the first event."""
    for name in upstreams:
        metrics.STALE_SERVES.labels(name)
        metrics.UPSTREAM_BYTES.labels(name)
        for kind in ("request", "resume"):
            metrics.UPSTREAM_RETRIES.labels(name, kind)
    for kind in ("blob", "manifest", "tags", "referrers"):
        metrics.COALESCED.labels(kind)
    for route in ("manifest", "blob", "tags", "referrers"):
        for result in ("hit", "miss", "coalesced", "revalidated", "stale", "error"):
            metrics.CACHE_RESPONSES.labels(route, result)
    for reason in ("size", "space", "manual", "gc", "corrupt"):
        metrics.EVICTED_BYTES.labels(reason)
        for kind in ("image", "loose"):
            metrics.EVICTED_IMAGES.labels(reason, kind)
    for state in ("pinned", "evictable", "recent"):
        metrics.CACHE_STATE_BYTES.labels(state)
    for kind in ("temp", "blob", "image"):
        metrics.GC_REMOVED.labels(kind)
    for result in ("ok", "failed"):
        metrics.PREWARM_IMAGES.labels(result)
