"""Redis layer: descriptors, tag mappings and repository links shared by every replica.

Key layout (``<p>`` is the configured prefix, ``rp`` by default; ``v1`` versions the
layout so a change of it never misreads old data)::

    <p>:v1:blob:<alg>:<hex>                  hash  size, mt          EX blob_ttl
    <p>:v1:tag:<upstream>:<repo>:<tag>       hash  digest, mt, size, at   EX tag_retention
    <p>:v1:link:<upstream>:<repo>:<alg>:<hex>  "1"                   EX link_ttl

Repository and upstream names are validated by the spec's grammar (no ``:``), so keys
cannot collide. Every look-up is one round trip (HGETALL, or one pipeline); every write of
a hash is one MULTI/EXEC transaction on that one key that sets the value and its TTL
together (a string gets both in one SET ... EX); every key has a TTL, so nothing grows
without bound. No transaction or script touches two keys, so every key may live on a
different node of a Redis Cluster: the layout has no hash tags and is the same for a
single server, a sentinel-managed one and a cluster.

The layer is advisory. A Redis error is counted, logged at most once per interval, and
reported to the caller as a miss (look-ups) or ignored (writes). After
``BREAKER_FAILURES`` consecutive errors the breaker opens: Redis is skipped entirely for
``BREAKER_COOLDOWN`` seconds, so a dead Redis adds no latency; then one request probes it
(half-open) and a success closes the breaker again.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, TypeVar
from urllib.parse import urlsplit

import redis.asyncio as aioredis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel
from redis.backoff import NoBackoff
from redis.exceptions import RedisClusterException, RedisError, WatchError
from redis.typing import EncodableT, FieldT

from proxy import metrics
from proxy.breaker import CLOSED, HALF_OPEN, OPEN, Breaker
from proxy.errors import BlobUnknown, RegistryError
from proxy.interfaces import BlobDescriptorService, LinkService, TagEntry, TagService
from proxy.model import Descriptor, Digest
from proxy.settings import CLUSTER_SCHEMES, SENTINEL_SCHEME, ClusterUrl, SentinelUrl

log = logging.getLogger(__name__)

T = TypeVar("T")

KEY_VERSION = "v1"
DEFAULT_PREFIX = "rp"
DEFAULT_SOCKET_TIMEOUT = 0.25
BLOB_TTL = 30 * 86400
LINK_TTL = 30 * 86400
DEFAULT_TAG_RETENTION = 8 * 86400
BREAKER_FAILURES = 3
BREAKER_COOLDOWN = 5.0
LOG_INTERVAL = 30.0
MAX_CONNECTIONS = 64
"""Per server: the one server, the sentinels' master, or each node of a cluster."""

RedisClient = aioredis.Redis | RedisCluster
"""What the Redis-backed services are given; both speak the same commands for one key."""

ERRORS: tuple[type[BaseException], ...] = (
    RedisError,  # ConnectionError, TimeoutError, ResponseError, ClusterDownError, ...
    RedisClusterException,  # not a RedisError: no node reachable, slot not covered, ...
    OSError,
    TimeoutError,
)
"""What a Redis call may raise when Redis, or a part of it, is unusable."""


def connect(url: str, *, timeout: float = DEFAULT_SOCKET_TIMEOUT) -> RedisClient:
    """A client with short timeouts and no retries of its own: the breaker decides.

    ``redis+sentinel://[:password@]host[:port][,host[:port]...]/<service>[/<db>]`` asks
    the sentinels for the service's master (redis-py's ``Sentinel``) and asks again after
    a failover: a connection to a demoted or dead master fails, the breaker counts it,
    and the next connection goes to the master the sentinels name then.

    ``redis+cluster://[[user]:password@]host[:port][,host[:port]...]/`` is a Redis
    Cluster (redis-py's ``RedisCluster``): the startup nodes tell it the others and the
    slot map; each command goes to the node owning its key's slot, and after a node
    fails the client learns the new map from the nodes left."""
    scheme = urlsplit(url).scheme
    if scheme == SENTINEL_SCHEME:
        return _sentinel_master(url, timeout)
    if scheme in CLUSTER_SCHEMES:
        return _cluster(url, timeout)
    return aioredis.from_url(
        url,
        socket_timeout=timeout,
        socket_connect_timeout=timeout,
        retry=Retry(NoBackoff(), 0),
        retry_on_timeout=False,
        max_connections=MAX_CONNECTIONS,
    )


def _cluster(url: str, timeout: float) -> RedisCluster:
    parsed = ClusterUrl.parse(url)
    return RedisCluster(
        startup_nodes=[ClusterNode(host, port) for host, port in parsed.nodes],
        username=parsed.username,
        password=parsed.password,
        ssl=parsed.tls,
        # Use the slots that are served while some are not (a node down): the keys on
        # the other nodes keep working, if the cluster allows it (its own default,
        # cluster-require-full-coverage yes, refuses all); those on the missing node
        # fail, and are counted.
        require_full_coverage=False,
        retry=Retry(NoBackoff(), 0),
        max_connections=MAX_CONNECTIONS,
        socket_timeout=timeout,
        socket_connect_timeout=timeout,
    )


def _sentinel_master(url: str, timeout: float) -> aioredis.Redis:
    parsed = SentinelUrl.parse(url)
    quick = {"socket_timeout": timeout, "socket_connect_timeout": timeout}
    sentinel = Sentinel(  # type: ignore[no-untyped-call]  # redis-py leaves it untyped
        list(parsed.sentinels), sentinel_kwargs=quick, **quick
    )
    master: aioredis.Redis = sentinel.master_for(
        parsed.service,
        db=parsed.db,
        password=parsed.password,
        retry=Retry(NoBackoff(), 0),
        retry_on_timeout=False,
        max_connections=MAX_CONNECTIONS,
        socket_timeout=timeout,
        socket_connect_timeout=timeout,
    )
    return master


_STATE_VALUES = {CLOSED: 0, OPEN: 1, HALF_OPEN: 2}


def _state_changed(old: str, new: str) -> None:
    metrics.REDIS_BREAKER_STATE.set(_STATE_VALUES[new])
    if new == OPEN and old == CLOSED:
        log.warning("redis breaker open: skipping redis for a cool-down")
    elif new == CLOSED:
        log.info("redis is reachable again; using it")


class RedisBreaker(Breaker):
    """The breaker with Redis's defaults, reporting to ``redis_breaker_state``."""

    def __init__(
        self,
        *,
        failures: int = BREAKER_FAILURES,
        cooldown: float = BREAKER_COOLDOWN,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__(
            failures=failures, cooldown=cooldown, clock=clock, on_change=_state_changed
        )
        metrics.REDIS_BREAKER_STATE.set(0)


class RedisLayer:
    """The client, key prefix and breaker shared by the Redis-backed services."""

    def __init__(
        self,
        client: RedisClient,
        *,
        prefix: str = DEFAULT_PREFIX,
        breaker: Breaker | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.client = client
        self.prefix = f"{prefix}:{KEY_VERSION}"
        self.breaker = breaker or RedisBreaker(clock=clock)
        self._clock = clock
        self._last_log = -LOG_INTERVAL

    def key(self, *parts: str) -> str:
        return ":".join((self.prefix, *parts))

    async def run(self, op: str, call: Callable[[], Awaitable[T]]) -> T | None:
        """Run ``call`` unless the breaker is open; None when skipped or failed."""
        if not self.breaker.allow():
            metrics.REDIS_OPERATIONS.labels(op, "skipped").inc()
            return None
        started = time.perf_counter()
        try:
            result = await call()
        except ERRORS as exc:
            self.breaker.failure()
            metrics.REDIS_OPERATIONS.labels(op, "error").inc()
            now = self._clock()
            if now - self._last_log >= LOG_INTERVAL:
                self._last_log = now
                log.warning("redis %s failed (%s); going on without it", op, type(exc).__name__)
            return None
        self.breaker.success()
        metrics.REDIS_OPERATIONS.labels(op, "ok").inc()
        metrics.REDIS_SECONDS.labels(op).observe(time.perf_counter() - started)
        return result

    async def set_hash(self, key: str, fields: Mapping[FieldT, EncodableT], ttl: int) -> None:
        """Write a hash and its TTL in one MULTI/EXEC; advisory like every write."""

        async def write() -> None:
            async with self.client.pipeline(transaction=True) as pipe:
                pipe.hset(key, mapping=fields)
                pipe.expire(key, ttl)
                await pipe.execute()

        await self.run("set", write)

    async def ping(self) -> bool:
        return bool(await self.run("ping", self.client.ping))

    async def close(self) -> None:
        await self.client.aclose()  # a cluster's: every node's connections
        # A sentinel-backed client also holds one client per sentinel.
        pool = getattr(self.client, "connection_pool", None)  # a cluster has none
        manager = getattr(pool, "sentinel_manager", None)
        for sentinel in getattr(manager, "sentinels", ()):
            await sentinel.aclose()


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class RedisDescriptorCache(BlobDescriptorService):
    def __init__(self, layer: RedisLayer, *, ttl: int = BLOB_TTL) -> None:
        self._layer = layer
        self._ttl = ttl

    def _key(self, digest: Digest) -> str:
        return self._layer.key("blob", digest.algorithm, digest.hex)

    async def stat(self, digest: Digest) -> Descriptor:
        fields = await self._layer.run("get", lambda: self._layer.client.hgetall(self._key(digest)))
        if not fields:
            raise BlobUnknown(f"blob {digest} is not in redis")
        try:
            return Descriptor(digest, int(fields[b"size"]), _text(fields[b"mt"]))
        except (KeyError, ValueError):
            raise BlobUnknown(f"blob {digest} has an unreadable redis entry") from None

    async def set_descriptor(self, digest: Digest, descriptor: Descriptor) -> None:
        fields: dict[FieldT, EncodableT] = {"size": descriptor.size, "mt": descriptor.media_type}
        await self._layer.set_hash(self._key(digest), fields, self._ttl)

    async def clear(self, digest: Digest) -> None:
        await self._layer.run("clear", lambda: self._layer.client.delete(self._key(digest)))


class RedisTagStore(TagService):
    def __init__(self, layer: RedisLayer, *, retention: int = DEFAULT_TAG_RETENTION) -> None:
        self._layer = layer
        self._retention = retention

    async def get(self, upstream: str, repo: str, tag: str) -> TagEntry | None:
        key = self._layer.key("tag", upstream, repo, tag)
        fields = await self._layer.run("get", lambda: self._layer.client.hgetall(key))
        if not fields:
            return None
        try:
            return TagEntry(
                Digest.parse(_text(fields[b"digest"])),
                _text(fields[b"mt"]),
                int(fields[b"size"]),
                float(fields[b"at"]),
            )
        except (KeyError, ValueError, RegistryError):
            return None  # unreadable entry: a miss; the next set overwrites it

    async def set(self, upstream: str, repo: str, tag: str, entry: TagEntry) -> None:
        fields: dict[FieldT, EncodableT] = {
            "digest": str(entry.digest),
            "mt": entry.media_type,
            "size": entry.size,
            "at": repr(entry.fetched_at),
        }
        await self._layer.set_hash(
            self._layer.key("tag", upstream, repo, tag), fields, ttl=self._retention
        )

    async def delete(self, upstream: str, repo: str, tag: str, digest: Digest) -> None:
        """Delete the mapping only while it still names ``digest`` (WATCH, then MULTI): a
        replica that repointed the tag meanwhile keeps its mapping."""
        key = self._layer.key("tag", upstream, repo, tag)

        async def delete() -> None:
            async with self._layer.client.pipeline(transaction=True) as pipe:
                try:
                    await pipe.watch(key)
                    current = await pipe.hget(key, "digest")
                    if current is None or _text(current) != str(digest):
                        return
                    pipe.multi()  # type: ignore[no-untyped-call]
                    pipe.delete(key)
                    await pipe.execute()
                except WatchError:
                    return  # changed meanwhile: repointed, so it stays

        await self._layer.run("clear", delete)


class RedisLinkStore(LinkService):
    def __init__(self, layer: RedisLayer, *, ttl: int = LINK_TTL) -> None:
        self._layer = layer
        self._ttl = ttl

    def _key(self, upstream: str, repo: str, digest: Digest) -> str:
        return self._layer.key("link", upstream, repo, digest.algorithm, digest.hex)

    async def linked(self, upstream: str, repo: str, digest: Digest) -> bool:
        key = self._key(upstream, repo, digest)
        found = await self._layer.run("get", lambda: self._layer.client.exists(key))
        return bool(found)

    async def link(self, upstream: str, repo: str, digests: list[Digest]) -> None:
        if not digests:
            return

        async def write() -> None:
            # Not a transaction: the links are independent facts, each SET carries its
            # TTL, and in a cluster their keys are in different slots (a MULTI across
            # slots is refused). Still one round trip per server.
            async with self._layer.client.pipeline(transaction=False) as pipe:
                for digest in digests:
                    pipe.set(self._key(upstream, repo, digest), b"1", ex=self._ttl)
                await pipe.execute()

        await self._layer.run("set", write)

    async def unlink(self, upstream: str, repo: str, digests: list[Digest]) -> None:
        if not digests:
            return
        keys = [self._key(upstream, repo, digest) for digest in digests]
        await self._layer.run("clear", lambda: self._layer.client.delete(*keys))
