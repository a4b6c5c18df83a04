"""Replicas sharing a Redis Cluster behave as one cache, as with one ``redis-server``.

A 3-master Redis Cluster of Debian's ``redis-server`` (``--cluster-enabled yes``, formed
with ``redis-cli --cluster create``), ``cache.redis: redis+cluster://...`` on two
``registry-proxy serve`` replicas, a docker-registry upstream behind a counting
pass-through, skopeo pulling through a round-robin balancer:

- every Redis-backed service (descriptors, tags, links, leases, holders) works on keys
  in many slots: nothing sends a transaction or script over two of them (CROSSSLOT);
- cold pulls: one upstream GET per blob, the keys spread over the nodes; warm pulls: no
  upstream request; no Redis operation failed on the way (nothing fell back silently);
- the access-control quotas (the GCRA Lua script) are shared through the cluster;
- a node SIGKILLed under continuous pulls: no pull fails (the replicas go on without
  Redis), and once the node is back the replicas coordinate again.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import pytest
from prometheus_client import REGISTRY

from proxy.cache.redis import (
    RedisDescriptorCache,
    RedisLayer,
    RedisLinkStore,
    RedisTagStore,
    connect,
)
from proxy.cluster.leases import LeaseHolder, RedisHolders, RedisLeases
from proxy.interfaces import TagEntry
from proxy.model import Descriptor, Digest
from tests.rig.cluster import Replica, Replicas, RoundRobin
from tests.rig.process import async_wait_until
from tests.rig.recording import PassThrough
from tests.rig.redis_server import REDIS_BINARY, REDIS_CLI_BINARY, RedisClusterNodes
from tests.rig.registry import Registry
from tests.rig.skopeo import Skopeo

from .binaries import binary_or_skip
from .scrape import scrape
from .test_cluster import blob_digests, push_images, redis_in_use, running, sha256

pytestmark = pytest.mark.integration

OPERATIONS = "registry_proxy_redis_operations_total"


@pytest.fixture
def redis_cluster(tmp_path: Path) -> Iterator[RedisClusterNodes]:
    binary, cli = binary_or_skip(REDIS_BINARY), binary_or_skip(REDIS_CLI_BINARY)
    with RedisClusterNodes(tmp_path / "redis-cluster", binary=binary, cli=cli) as cluster:
        yield cluster


@contextlib.asynccontextmanager
async def balanced(replicas: Replicas) -> AsyncIterator[RoundRobin]:
    async with RoundRobin([r.url for r in replicas]) as balancer:
        yield balancer


async def redis_results(http: aiohttp.ClientSession, replica: Replica, result: str) -> float:
    return (await scrape(http, replica.url)).value(OPERATIONS, result=result)


def redis_errors_here() -> float:
    """Redis operations that failed in this process (the test's own layer)."""
    return sum(
        sample.value
        for metric in REGISTRY.collect()
        for sample in metric.samples
        if sample.name == OPERATIONS and sample.labels.get("result") == "error"
    )


async def test_the_redis_services_work_on_keys_in_many_slots(
    redis_cluster: RedisClusterNodes,
) -> None:
    digests = [Digest("sha256", hashlib.sha256(str(i).encode()).hexdigest()) for i in range(24)]
    layer = RedisLayer(connect(redis_cluster.url))
    errors_before = redis_errors_here()
    try:
        blobs, tags, links = (
            RedisDescriptorCache(layer),
            RedisTagStore(layer),
            RedisLinkStore(layer),
        )
        for digest in digests:
            await blobs.set_descriptor(digest, Descriptor(digest, 7, "application/x"))
        assert (await blobs.stat(digests[5])).size == 7
        await links.link("up", "team/app", digests)  # one pipeline over many slots
        assert all([await links.linked("up", "team/app", d) for d in digests])
        await links.unlink("up", "team/app", digests)  # one DEL per slot
        assert not any([await links.linked("up", "team/app", d) for d in digests])
        entry = TagEntry(digests[0], "application/x", 7, time.time())
        await tags.set("up", "team/app", "v1", entry)
        assert await tags.get("up", "team/app", "v1") == entry
        await tags.delete("up", "team/app", "v1", digests[1])  # WATCH: names another
        assert await tags.get("up", "team/app", "v1") == entry
        await tags.delete("up", "team/app", "v1", digests[0])
        assert await tags.get("up", "team/app", "v1") is None
        leases, holders = RedisLeases(layer, 5.0), RedisHolders(layer)
        me = LeaseHolder("node-a", "127.0.0.1:1", "up", "team/app")
        other = LeaseHolder("node-b", "127.0.0.1:2", "up", "team/app")
        for digest in digests[:8]:
            key = leases.blob_key(digest)
            assert await leases.acquire(key, me) == me
            assert await leases.acquire(key, other) == me  # held: follow it
            assert await leases.renew(key, me) is True
            await leases.release(key, me)
            assert await leases.acquire(key, other, replacing=me) == other
            await holders.add(digest, me.address, me.origin)
            assert await holders.get(digest) == {me.address: me.origin}
        # Nothing above failed (a failure would read as a miss, or be ignored).
        assert redis_errors_here() == errors_before
        assert sum(1 for node in redis_cluster if node.dbsize() > 0) == 3
    finally:
        await layer.close()


async def test_cold_and_warm_pulls_through_2_replicas_on_a_redis_cluster(
    tmp_path: Path,
    registry: Registry,
    passthrough: PassThrough,
    redis_cluster: RedisClusterNodes,
    skopeo: Skopeo,
    http: aiohttp.ClientSession,
) -> None:
    images = await push_images(http, registry, tmp_path / "images", 3)
    replicas = Replicas(
        tmp_path / "replicas", 2, upstream_url=passthrough.url, redis_url=redis_cluster.url
    )
    with running(replicas):
        async with balanced(replicas) as balancer:
            pulls = [skopeo.timed_pull(balancer.host, f"cluster/app{i % 3}:v1") for i in range(12)]
            outcomes = await asyncio.gather(*pulls, return_exceptions=True)
            failed = [o for o in outcomes if isinstance(o, BaseException)]
            assert not failed, failed[:3]
        for digest in blob_digests(images):
            gets = passthrough.log.blob_gets(digest)
            assert len(gets) == 1, f"{digest}: {len(gets)} upstream GETs\n" + (
                passthrough.log.summary()
            )
        size = sum(i.config.size + sum(layer.size for layer in i.layers) for i in images)
        assert passthrough.log.blob_bytes_served() == size
        # The keys are spread over the cluster: the slots of one key layout, many nodes.
        sizes = [node.dbsize() for node in redis_cluster]
        assert sum(1 for n in sizes if n > 0) >= 2, sizes
        # Warm: every image from each replica, and the upstream hears nothing.
        passthrough.log.clear()
        for replica in replicas:
            for i in range(3):
                await skopeo.timed_pull(replica.host, f"cluster/app{i}:v1")
        assert passthrough.log.exchanges == [], passthrough.log.summary()
        for replica in replicas:
            metrics = await scrape(http, replica.url)
            assert metrics.value(OPERATIONS, result="error") == 0, replica.log_tail()
            assert metrics.value(OPERATIONS, result="skipped") == 0
            assert metrics.value(OPERATIONS, op="lease", result="ok") > 0
            assert metrics.value("registry_proxy_http_requests_total", route="blob") > 0


async def test_cold_fetch_quotas_are_shared_through_the_redis_cluster(
    tmp_path: Path,
    registry: Registry,
    passthrough: PassThrough,
    redis_cluster: RedisClusterNodes,
    http: aiohttp.ClientSession,
) -> None:
    await push_images(http, registry, tmp_path / "images", 3, layers=1)
    replicas = Replicas(
        tmp_path / "replicas",
        2,
        upstream_url=passthrough.url,
        redis_url=redis_cluster.url,
        settings={"limits": {"cold_fetches": "2/1h"}},
    )
    first, second = list(replicas)
    accept = {"Accept": "application/vnd.oci.image.manifest.v1+json"}

    async def status(replica: Replica, repo: str) -> tuple[int, dict[str, str]]:
        async with http.get(f"{replica.url}/v2/{repo}/manifests/v1", headers=accept) as r:
            await r.read()
            return r.status, dict(r.headers)

    with running(replicas):
        assert (await status(first, "cluster/app0"))[0] == 200
        assert (await status(second, "cluster/app1"))[0] == 200
        # The third cold fetch of this client (its address), on either replica: refused.
        for replica in (first, second):
            code, headers = await status(replica, "cluster/app2")
            assert code == 429
            assert headers["RateLimit-Limit"] == "2;w=3600"
            assert int(headers["Retry-After"]) > 0
        assert (await status(first, "cluster/app0"))[0] == 200  # a hit never counts
        for replica in replicas:
            metrics = await scrape(http, replica.url)
            assert metrics.value(OPERATIONS, op="limit", result="ok") > 0
            assert metrics.value(OPERATIONS, result="error") == 0, replica.log_tail()


async def test_a_cluster_node_killed_under_continuous_pulls_fails_no_pull(
    tmp_path: Path,
    registry: Registry,
    passthrough: PassThrough,
    redis_cluster: RedisClusterNodes,
    skopeo: Skopeo,
    http: aiohttp.ClientSession,
) -> None:
    count = 8
    await push_images(http, registry, tmp_path / "images", count, layers=1)
    replicas = Replicas(
        tmp_path / "replicas",
        2,
        upstream_url=passthrough.url,
        redis_url=redis_cluster.url,
        tag_ttl="1s",  # tags revalidated under a lease in Redis all along
    )
    victim, *survivors = list(redis_cluster)
    with running(replicas):
        async with balanced(replicas) as balancer:
            done = asyncio.Event()
            pulled: list[str] = []
            failures: list[BaseException] = []

            async def puller(n: int) -> None:
                # Each image in turn (cold the first time anywhere, so blob fetches go
                # through the leases), then round again (warm, tags past their TTL).
                i = n
                while not done.is_set():
                    reference = f"cluster/app{i % count}:v1"
                    try:
                        await skopeo.timed_pull(balancer.host, reference)
                        pulled.append(reference)
                    except Exception as exc:  # every failure counts
                        failures.append(exc)
                    i += 1

            async def errors() -> float:
                return sum([await redis_results(http, r, "error") for r in replicas])

            workers = [asyncio.create_task(puller(n)) for n in (0, count // 2)]
            try:
                await async_wait_until(lambda: len(pulled) >= 2, within=60, what="pulls")
                victim.kill()
                # The cluster notices (after its node timeout) and refuses every command;
                # the replicas see errors, then skip Redis, and go on pulling.
                await async_wait_until(
                    lambda: survivors[0].cluster_info().get("cluster_state") == "fail",
                    within=20,
                    what="the cluster to mark itself failed",
                )
                await async_wait_until(
                    lambda: errors(), within=20, what="redis errors at the replicas"
                )
                before = len(pulled)
                await async_wait_until(
                    lambda: len(pulled) >= before + 4, within=90, what="pulls without it"
                )
                # The node back (as itself: its nodes.conf), the cluster serves again.
                victim.start()
                await asyncio.to_thread(redis_cluster.wait_ok)
                for replica in replicas:
                    await async_wait_until(
                        lambda r=replica: redis_in_use(http, r.url),
                        within=30,
                        what=f"{replica.name} to use the cluster again",
                    )
                before = len(pulled)
                await async_wait_until(
                    lambda: len(pulled) >= before + 2, within=60, what="pulls after"
                )
            finally:
                done.set()
                await asyncio.gather(*workers, return_exceptions=True)
            assert not failures, failures[:3]
        # Coordination resumed: a new blob is fetched upstream once for both replicas.
        [fresh] = await push_images(http, registry, tmp_path / "fresh", 1, layers=1)
        layer = fresh.layers[0]
        for replica in replicas:
            async with http.get(f"{replica.url}/v2/cluster/app0/blobs/{layer.digest}") as r:
                assert r.status == 200
                assert sha256(await r.read()) == layer.digest
            await async_wait_until(
                replica.blob_path(layer.digest).exists, within=10, what=f"{replica.name} commit"
            )
        assert len(passthrough.log.blob_gets(layer.digest)) == 1, passthrough.log.summary()
