"""One tag check per TTL across replicas, and manifest bodies shared through Redis.

Key layout (same prefix and version as ``proxy.cache.redis``)::

    <p>:v1:lease:tag:<upstream>:<repo>:<tag>    string  lease value (see leases)   PX TAG_LEASE_TTL
    <p>:v1:manifest:<alg>:<hex>                 hash    mt, body                   EX MANIFEST_TTL

Tag revalidation (``ClusterTagRevalidations``): a replica whose tag entry is past its TTL
takes a short lease on the tag before it sends the HEAD. Holding it, it first re-reads the
shared entry (another replica may have just revalidated it, and released); else it
revalidates, records the new entry (in Redis, through the tag store) and releases. A
replica that finds the lease held waits up to ``TAG_WAIT`` for a newer entry in Redis,
polling it, and otherwise serves the entry it has. So the cluster sends one HEAD per tag
per TTL window, and a slow or dead revalidator delays others by ``TAG_WAIT`` at most.

Manifest bodies (``RedisManifestBodies``): what one replica fetched from the upstream (up
to the 4 MiB manifest cap) is readable by the others, so a replica that learns a tag's
new digest from Redis does not fetch that manifest by digest upstream. The reader checks
the body's digest before storing it.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from proxy import metrics
from proxy.cache.redis import RedisLayer
from proxy.cluster.node import ClusterNode
from proxy.interfaces import ManifestBodies, TagEntry, TagRevalidations, TagService
from proxy.model import Digest

TAG_LEASE_TTL = 5.0
TAG_WAIT = 2.0
TAG_POLL = 0.05
MANIFEST_TTL = 7 * 86400
MAX_SHARED_MANIFEST = 4 << 20


class ClusterTagRevalidations(TagRevalidations):
    def __init__(
        self,
        node: ClusterNode,
        tags: TagService,
        *,
        wait: float = TAG_WAIT,
        lease_ttl: float = TAG_LEASE_TTL,
    ) -> None:
        self._node = node
        self._tags = tags
        self._wait = wait
        self._lease_ttl = lease_ttl

    async def _newer(self, upstream: str, repo: str, tag: str, seen: TagEntry) -> TagEntry | None:
        entry = await self._tags.get(upstream, repo, tag)
        return entry if entry is not None and entry.fetched_at > seen.fetched_at else None

    @asynccontextmanager
    async def turn(
        self, upstream: str, repo: str, tag: str, seen: TagEntry
    ) -> AsyncIterator[TagEntry | None]:
        leases = self._node.leases
        key = leases.key("tag", upstream, repo, tag)
        me = self._node.holder(upstream, repo)
        deadline = time.monotonic() + self._wait
        answer: TagEntry | None = None
        owned = False
        while True:
            current = await leases.acquire(key, me, ttl=self._lease_ttl)
            if current is None:
                metrics.CLUSTER_TAG_CHECKS.labels("unavailable").inc()
                break  # Redis did not answer: revalidate as a single process does
            answer = await self._newer(upstream, repo, tag, seen)
            if current == me:
                owned = answer is None
                if not owned:
                    await leases.release(key, me)
                metrics.CLUSTER_TAG_CHECKS.labels("checked" if owned else "shared").inc()
                break
            if answer is not None:
                metrics.CLUSTER_TAG_CHECKS.labels("shared").inc()
                break
            if time.monotonic() >= deadline:
                metrics.CLUSTER_TAG_CHECKS.labels("waited").inc()
                answer = seen
                break
            # Another replica is revalidating: its result lands in Redis; poll for it.
            await asyncio.sleep(TAG_POLL)
        try:
            yield answer
        finally:
            if owned:
                await leases.release(key, me)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class RedisManifestBodies(ManifestBodies):
    def __init__(self, layer: RedisLayer, *, ttl: int = MANIFEST_TTL) -> None:
        self._layer = layer
        self._ttl = ttl

    def _key(self, digest: Digest) -> str:
        return self._layer.key("manifest", digest.algorithm, digest.hex)

    async def get(self, digest: Digest) -> tuple[str, bytes] | None:
        key = self._key(digest)
        fields = await self._layer.run("get", lambda: self._layer.client.hgetall(key))
        if not fields or b"body" not in fields or b"mt" not in fields:
            return None
        body = fields[b"body"]
        if not isinstance(body, bytes):
            return None
        if digest.algorithm != "sha256" or hashlib.sha256(body).hexdigest() != digest.hex:
            return None  # never trusted: only a body with the digest asked for is used
        return _text(fields[b"mt"]), body

    async def put(self, digest: Digest, media_type: str, body: bytes) -> None:
        if len(body) > MAX_SHARED_MANIFEST:
            return
        await self._layer.set_hash(self._key(digest), {"mt": media_type, "body": body}, self._ttl)
