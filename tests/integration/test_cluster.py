"""Replicas sharing one Redis behave as one cache (issue 13), with real parts only.

Three ``registry-proxy serve`` processes (separate OS processes, so SIGKILL is real)
share one ``redis-server`` and one docker-registry upstream behind a counting
pass-through; skopeo pulls through a round-robin balancer in front of them.

- 48 concurrent cold pulls of 4 images: exactly one upstream GET per blob.
- The owner of a fetch SIGKILLed mid-blob while clients of the other two follow it:
  those clients get the whole blob with the right digest, and the upstream serves the
  blob once plus a ``Range`` for the rest.
- A committed blob is filled from the replica holding it, not from the upstream.
- The peer endpoint: 403 without a valid signature; serves committed blobs by digest.
- Redis killed: pulls go on (per-process single flight).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import pytest

from proxy.cluster.peer import PeerSigner, peer_path
from proxy.cluster.source import HOLDER_ANSWER_TIMEOUT
from proxy.model import Digest
from tests.rig import oci
from tests.rig.cluster import SECRET, Replicas, RoundRobin, http_status
from tests.rig.distribution import push_image
from tests.rig.faults import FaultProxy
from tests.rig.process import async_wait_until, free_port
from tests.rig.proxy_app import proxy_settings_mapping, serve_proxy
from tests.rig.recording import PassThrough
from tests.rig.redis_server import REDIS_BINARY, RedisSentinel, RedisServer, redis_client
from tests.rig.registry import Registry
from tests.rig.skopeo import Skopeo

from .binaries import binary_or_skip
from .scrape import scrape

pytestmark = pytest.mark.integration

LAYER_SIZE = 96 * 1024


@contextlib.contextmanager
def running(replicas: Replicas) -> Iterator[Replicas]:
    try:
        replicas.start()
        yield replicas
    finally:
        replicas.stop()


@contextlib.asynccontextmanager
async def balanced(
    replicas: Replicas, *, per_connection: bool = False
) -> AsyncIterator[RoundRobin]:
    async with RoundRobin([r.url for r in replicas], per_connection=per_connection) as balancer:
        yield balancer


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def blob_digests(images: list[oci.OciImage]) -> set[str]:
    return {d for image in images for d in (image.config.digest, *image.layer_digests)}


async def push_images(
    http: aiohttp.ClientSession, registry: Registry, workdir: Path, count: int, layers: int = 2
) -> list[oci.OciImage]:
    return [
        await push_image(
            http,
            registry.url,
            workdir / f"image-{i}",
            f"cluster/app{i}",
            "v1",
            layers=layers,
            layer_size=LAYER_SIZE,
        )
        for i in range(count)
    ]


async def committed_fetches(http: aiohttp.ClientSession, base_url: str) -> float:
    return (await scrape(http, base_url)).value("registry_proxy_cluster_fetches_total")


@pytest.mark.parametrize("balancing", ["per-request", "per-connection"])
async def test_48_cold_pulls_through_3_replicas_fetch_each_blob_once(
    balancing: str,
    tmp_path: Path,
    registry: Registry,
    passthrough: PassThrough,
    redis_server: RedisServer,
    skopeo: Skopeo,
    http: aiohttp.ClientSession,
) -> None:
    images = await push_images(http, registry, tmp_path / "images", 4)
    replicas = Replicas(
        tmp_path / "replicas", 3, upstream_url=passthrough.url, redis_url=redis_server.url
    )
    with running(replicas):
        per_connection = balancing == "per-connection"
        async with balanced(replicas, per_connection=per_connection) as balancer:
            pulls = [skopeo.timed_pull(balancer.host, f"cluster/app{i % 4}:v1") for i in range(48)]
            outcomes = await asyncio.gather(*pulls, return_exceptions=True)
            failed = [o for o in outcomes if isinstance(o, BaseException)]
            assert not failed, failed[:3]
            if per_connection:
                assert all(n > 0 for n in balancer.connections.values()), balancer.connections
        for digest in blob_digests(images):
            gets = passthrough.log.blob_gets(digest)
            assert len(gets) == 1, f"{digest}: {len(gets)} upstream GETs\n" + (
                passthrough.log.summary()
            )
        size = sum(i.config.size + sum(layer.size for layer in i.layers) for i in images)
        assert passthrough.log.blob_bytes_served() == size
        # Each replica keeps its own verified copy of what its clients pulled.
        holders = 0
        for digest in blob_digests(images):
            holders += sum(1 for r in replicas if r.blob_path(digest).exists())
        assert holders > len(blob_digests(images)), "no blob was copied to a second replica"
        metrics = [await scrape(http, r.url) for r in replicas]
        # Every replica answered clients: the balancer spread the pulls.
        for m in metrics:
            assert m.value("registry_proxy_http_requests_total", route="blob") > 0
        followed = sum(
            m.value("registry_proxy_cluster_leases_total", result="followed") for m in metrics
        )
        filled = sum(
            m.value("registry_proxy_cluster_fetches_total", source=source)
            for m in metrics
            for source in ("owner", "holder")
        )
        assert followed + filled > 0


async def test_sigkill_of_the_owner_mid_blob_the_followers_get_the_whole_blob(
    tmp_path: Path,
    registry: Registry,
    fault_proxy: FaultProxy,
    redis_server: RedisServer,
    http: aiohttp.ClientSession,
) -> None:
    size = 2 * 1024 * 1024
    image = await push_image(
        http, registry.url, tmp_path / "image", "big/app", "v1", layers=1, layer_size=size
    )
    layer = image.layers[0]
    held_after = layer.size // 3
    hold = fault_proxy.pause_blob(held_after)
    replicas = Replicas(
        tmp_path / "replicas", 3, upstream_url=fault_proxy.url, redis_url=redis_server.url
    )
    url = "/v2/big/app/blobs/" + layer.digest
    with running(replicas):
        owner, *followers = list(replicas)
        received = {f.name: 0 for f in followers}

        async def pull(base: str, name: str | None) -> bytes:
            async with http.get(base + url) as response:
                assert response.status == 200
                body = bytearray()
                async for chunk in response.content.iter_any():
                    body += chunk
                    if name is not None:
                        received[name] = len(body)
                return bytes(body)

        first = asyncio.create_task(pull(owner.url, None))
        try:
            await async_wait_until(hold.reached.is_set, within=20, what="the upstream to pause")
            tasks = [asyncio.create_task(pull(f.url, f.name)) for f in followers]
            # The followers stream what the owner has written so far (all but its last
            # byte), so the kill lands while they are mid-blob.
            await async_wait_until(
                lambda: all(n > 0 for n in received.values()),
                within=20,
                what="both followers to receive bytes from the owner",
            )
            owner.kill()
            bodies = await asyncio.wait_for(asyncio.gather(*tasks), 60)
        finally:
            hold.resume()
            first.cancel()
            with contextlib.suppress(BaseException):
                await first
        for body in bodies:
            assert len(body) == layer.size
            assert sha256(body) == layer.digest
        gets = fault_proxy.log.blob_gets(layer.digest)
        assert len(gets) == 2, fault_proxy.log.summary()
        resumed = gets[1]
        assert resumed.headers.get("Range", "").startswith("bytes=")
        start = int(resumed.headers["Range"].removeprefix("bytes=").rstrip("-"))
        assert 0 < start <= held_after
        assert fault_proxy.log.blob_bytes_served(layer.digest) <= layer.size + held_after
        for follower in followers:
            path = follower.blob_path(layer.digest)
            await async_wait_until(path.exists, within=10, what=f"{follower.name} to commit")
            assert sha256(path.read_bytes()) == layer.digest
        takeovers = 0.0
        for follower in followers:
            metrics = await scrape(http, follower.url)
            takeovers += metrics.value("registry_proxy_cluster_leases_total", result="takeover")
        assert takeovers == 1


async def test_a_committed_blob_is_filled_from_its_holder_not_the_upstream(
    tmp_path: Path,
    registry: Registry,
    passthrough: PassThrough,
    redis_server: RedisServer,
    http: aiohttp.ClientSession,
) -> None:
    [image] = await push_images(http, registry, tmp_path / "images", 1, layers=1)
    layer = image.layers[0]
    url = f"/v2/cluster/app0/blobs/{layer.digest}"
    replicas = Replicas(
        tmp_path / "replicas", 3, upstream_url=passthrough.url, redis_url=redis_server.url
    )
    with running(replicas):
        for replica in replicas:  # one after the other: nothing to follow, only holders
            async with http.get(replica.url + url) as response:
                assert response.status == 200
                assert sha256(await response.read()) == layer.digest
            # The client has its bytes once they are verified; the commit follows.
            await async_wait_until(
                lambda r=replica: committed_fetches(http, r.url),
                within=10,
                what=f"{replica.name} to commit the blob",
            )
        assert len(passthrough.log.blob_gets(layer.digest)) == 1
        fills = [
            (await scrape(http, r.url)).value(
                "registry_proxy_cluster_fetches_total", source="holder"
            )
            for r in replicas
        ]
        assert fills == [0, 1, 1]


async def test_the_peer_endpoint_wants_a_valid_signature(
    tmp_path: Path,
    registry: Registry,
    passthrough: PassThrough,
    redis_server: RedisServer,
    http: aiohttp.ClientSession,
) -> None:
    [image] = await push_images(http, registry, tmp_path / "images", 1, layers=1)
    layer = image.layers[0]
    replicas = Replicas(
        tmp_path / "replicas", 1, upstream_url=passthrough.url, redis_url=redis_server.url
    )
    with running(replicas):
        [replica] = list(replicas)
        async with http.get(f"{replica.url}/v2/cluster/app0/blobs/{layer.digest}") as response:
            assert response.status == 200
            await response.read()
        digest = Digest.parse(layer.digest)
        path = peer_path(digest, 0)
        good = PeerSigner(SECRET.encode())
        forged = PeerSigner(b"not-the-secret")
        old = PeerSigner(SECRET.encode(), clock=lambda: time.time() - 120)

        async def status(path_qs: str, headers: dict[str, str], method: str = "GET") -> int:
            async with http.request(method, replica.url + path_qs, headers=headers) as r:
                body = await r.read()
                if r.status == 403:
                    assert json.loads(body)["errors"][0]["code"] == "DENIED"
                return r.status

        assert await status(path, {}) == 403
        assert await status(path, forged.headers("GET", path)) == 403
        assert await status(path, old.headers("GET", path)) == 403
        # Signed for another offset, replayed on this one.
        assert await status(path, good.headers("GET", peer_path(digest, 1))) == 403
        assert await status(path, good.headers("DELETE", path), "DELETE") == 403
        assert await status("/_cluster/anything", good.headers("GET", "/_cluster/anything")) == 403
        async with http.get(replica.url + path, headers=good.headers("GET", path)) as response:
            assert response.status == 200
            assert sha256(await response.read()) == layer.digest
        middle = peer_path(digest, 10)
        async with http.get(replica.url + middle, headers=good.headers("GET", middle)) as r:
            assert r.status == 200
            assert r.headers["X-Blob-Size"] == str(layer.size)
            assert len(await r.read()) == layer.size - 10
        unknown = peer_path(Digest("sha256", "0" * 64), 0)
        assert await status(unknown, good.headers("GET", unknown)) == 404
        assert (await scrape(http, replica.url)).value(
            "registry_proxy_peer_requests_total", result="denied"
        ) == 6


async def test_with_redis_killed_pulls_go_on(
    tmp_path: Path,
    registry: Registry,
    passthrough: PassThrough,
    redis_server: RedisServer,
    skopeo: Skopeo,
    http: aiohttp.ClientSession,
) -> None:
    images = await push_images(http, registry, tmp_path / "images", 2, layers=1)
    replicas = Replicas(
        tmp_path / "replicas", 3, upstream_url=passthrough.url, redis_url=redis_server.url
    )
    with running(replicas):
        async with balanced(replicas) as balancer:
            redis_server.kill()
            outcomes = await asyncio.gather(
                *(skopeo.timed_pull(balancer.host, f"cluster/app{i % 2}:v1") for i in range(6)),
                return_exceptions=True,
            )
            assert not [o for o in outcomes if isinstance(o, BaseException)]
            # Per-process single flight: at most one upstream GET per blob per replica.
            for digest in blob_digests(images):
                assert 1 <= len(passthrough.log.blob_gets(digest)) <= 3
            unavailable = 0.0
            for replica in replicas:
                metrics = await scrape(http, replica.url)
                unavailable += metrics.value(
                    "registry_proxy_cluster_leases_total", result="unavailable"
                )
            assert unavailable > 0
            # Redis back on its port: once each breaker has closed again, one fetch per
            # blob across the replicas again.
            redis_server.start()
            for replica in replicas:
                await async_wait_until(
                    lambda r=replica: redis_in_use(http, r.url),
                    within=20,
                    what=f"{replica.name} to use redis again",
                )
            [fresh] = await push_images(http, registry, tmp_path / "fresh", 1, layers=1)
            layer = fresh.layers[0]
            for replica in replicas:
                async with http.get(f"{replica.url}/v2/cluster/app0/blobs/{layer.digest}") as r:
                    assert r.status == 200
                    assert sha256(await r.read()) == layer.digest
                await async_wait_until(
                    replica.blob_path(layer.digest).exists,
                    within=10,
                    what=f"{replica.name} to commit",
                )
            assert len(passthrough.log.blob_gets(layer.digest)) == 1


async def redis_in_use(http: aiohttp.ClientSession, base_url: str) -> bool:
    """The replica's breaker is closed: it asks Redis again."""
    async with http.get(base_url + "/readyz") as response:
        report = await response.json()
    return bool(report.get("redis", {}).get("reachable"))


async def test_tags_past_their_ttl_cost_one_upstream_head_per_window_across_replicas(
    tmp_path: Path,
    registry: Registry,
    passthrough: PassThrough,
    redis_server: RedisServer,
    http: aiohttp.ClientSession,
) -> None:
    ttl = 2.0
    images = await push_images(http, registry, tmp_path / "images", 2, layers=1)
    tags = [f"cluster/app{i}/manifests/v1" for i in range(len(images))]
    replicas = Replicas(
        tmp_path / "replicas",
        3,
        upstream_url=passthrough.url,
        redis_url=redis_server.url,
        tag_ttl=f"{ttl}s",
    )

    async def get(base: str, path: str) -> bytes:
        headers = {"Accept": oci.ACCEPT_ALL_MANIFESTS}
        async with http.get(f"{base}/v2/{path}", headers=headers) as response:
            assert response.status == 200, await response.text()
            return await response.read()

    def upstream_manifests(method: str, tag_path: str) -> int:
        return len(passthrough.log.matching(method, path_suffix=tag_path))

    with running(replicas):
        # Warm, one replica after the other: the first fetches the tag; the others find
        # it fresh in Redis and take the manifest body from Redis, not the upstream.
        for replica in replicas:
            for image, tag in zip(images, tags, strict=True):
                assert await get(replica.url, tag) == image.manifest_bytes
        for image, tag in zip(images, tags, strict=True):
            assert upstream_manifests("GET", tag) == 1
            assert upstream_manifests("GET", f"/manifests/{image.manifest.digest}") == 0
        shared = sum(
            [
                (await scrape(http, r.url)).value("registry_proxy_cluster_shared_manifests_total")
                for r in replicas
            ]
        )
        assert shared == 2 * len(images)
        for window in (1, 2):
            settled = time.time()
            await async_wait_until(
                lambda s=settled: time.time() > s + ttl,
                within=ttl + 5,
                what="the tag TTL to pass",
            )
            # Every replica, twice each, at once.
            bodies = await asyncio.gather(
                *(get(r.url, tag) for r in replicas for tag in tags for _ in range(2))
            )
            assert set(bodies) == {image.manifest_bytes for image in images}
            for tag in tags:
                heads = upstream_manifests("HEAD", tag)
                assert heads == window, f"window {window}: {heads} HEADs for {tag}\n" + (
                    passthrough.log.summary()
                )
                assert upstream_manifests("GET", tag) == 1


async def test_a_rolling_restart_under_continuous_pulls_fails_no_pull(
    tmp_path: Path,
    registry: Registry,
    passthrough: PassThrough,
    redis_server: RedisServer,
    skopeo: Skopeo,
    http: aiohttp.ClientSession,
) -> None:
    """Each replica in turn is taken out of the balancer (as a Service does once the pod
    terminates; the preStop pause covers the propagation) and SIGTERMed, right after a
    fresh image was pushed, so cold fetches are under way when it goes."""
    images = await push_images(http, registry, tmp_path / "images", 2, layers=2)
    refs = [f"cluster/app{i}:v1" for i in range(len(images))]
    replicas = Replicas(
        tmp_path / "replicas", 3, upstream_url=passthrough.url, redis_url=redis_server.url
    )
    with running(replicas):
        async with balanced(replicas) as balancer:
            done = asyncio.Event()
            pulled: list[float] = []
            failures: list[BaseException] = []

            async def puller(n: int) -> None:
                i = n
                while not done.is_set():
                    try:
                        # Mostly the newest image (cold), sometimes an older one (warm).
                        ref = refs[-1] if i % 3 else refs[i % len(refs)]
                        pulled.append(await skopeo.timed_pull(balancer.host, ref))
                    except Exception as exc:  # every failure counts; the test reports them
                        failures.append(exc)
                    i += 1

            workers = [asyncio.create_task(puller(n)) for n in range(4)]
            try:
                for k, replica in enumerate(replicas):
                    before = len(pulled)
                    await async_wait_until(
                        lambda b=before: len(pulled) >= b + 2,
                        within=60,
                        what="pulls to go on before the next restart",
                    )
                    repo = f"cluster/fresh{k}"
                    fresh = await push_image(
                        http,
                        registry.url,
                        tmp_path / f"fresh-{k}",
                        repo,
                        "v1",
                        layers=3,
                        layer_size=LAYER_SIZE,
                    )
                    images.append(fresh)
                    refs.append(f"{repo}:v1")
                    await async_wait_until(
                        lambda d=fresh.layers[0].digest: passthrough.log.blob_gets(d),
                        within=30,
                        what="a cold fetch of the fresh image",
                    )
                    balancer.remove(replica.url)
                    replica.terminate()
                    assert await asyncio.to_thread(replica.wait_exit, 30) == 0
                    await asyncio.to_thread(replica.start)
                    balancer.add(replica.url)
                before = len(pulled)
                await async_wait_until(
                    lambda: len(pulled) >= before + 2, within=60, what="pulls after the restarts"
                )
            finally:
                done.set()
                await asyncio.gather(*workers, return_exceptions=True)
            assert not failures, failures[:3]
            assert len(pulled) >= 10
            # A fetch handed over mid-way costs at most one more (ranged) GET.
            for digest in blob_digests(images):
                assert 1 <= len(passthrough.log.blob_gets(digest)) <= 2


async def test_sigterm_refuses_new_connections_and_finishes_the_responses_in_flight(
    tmp_path: Path,
    registry: Registry,
    fault_proxy: FaultProxy,
    redis_server: RedisServer,
    http: aiohttp.ClientSession,
) -> None:
    [image] = await push_images(http, registry, tmp_path / "images", 1, layers=1)
    layer = image.layers[0]
    hold = fault_proxy.pause_blob(layer.size // 2)
    replicas = Replicas(
        tmp_path / "replicas", 1, upstream_url=fault_proxy.url, redis_url=redis_server.url
    )
    with running(replicas):
        [replica] = list(replicas)

        async def pull() -> bytes:
            async with http.get(f"{replica.url}/v2/cluster/app0/blobs/{layer.digest}") as r:
                assert r.status == 200
                return await r.read()

        task = asyncio.create_task(pull())
        try:
            await async_wait_until(hold.reached.is_set, within=20, what="the upstream to pause")
            replica.terminate()
            await async_wait_until(
                lambda: http_status(replica.url + "/healthz") is None,
                within=10,
                what="the listener to close",
            )
            assert replica.running, "exited with a response in flight"
        finally:
            hold.resume()
        body = await asyncio.wait_for(task, 30)
        assert sha256(body) == layer.digest
        assert await asyncio.to_thread(replica.wait_exit, 30) == 0
        async with redis_client(redis_server.url) as client:
            assert await client.keys("rp:v1:lease:*") == []
            holders = await client.hgetall(f"rp:v1:holders:{layer.digest}")
            assert list(holders) == [replica.url.encode()]


async def test_a_sentinel_failover_of_redis_mid_run_fails_no_pull(
    tmp_path: Path,
    registry: Registry,
    passthrough: PassThrough,
    skopeo: Skopeo,
    http: aiohttp.ClientSession,
) -> None:
    binary = binary_or_skip(REDIS_BINARY)
    await push_images(http, registry, tmp_path / "images", 2, layers=1)
    with contextlib.ExitStack() as stack:
        master = stack.enter_context(RedisServer(tmp_path / "redis-a", binary=binary))
        replica = stack.enter_context(
            RedisServer(tmp_path / "redis-b", binary=binary, replica_of=master.port)
        )
        sentinel = stack.enter_context(
            RedisSentinel(tmp_path / "sentinel", master.port, binary=binary)
        )
        await async_wait_until(
            sentinel.knows_replicas, within=20, what="the sentinel to find the replica"
        )
        replicas = Replicas(
            tmp_path / "replicas", 3, upstream_url=passthrough.url, redis_url=sentinel.url
        )
        with running(replicas):
            async with balanced(replicas) as balancer:
                done = asyncio.Event()
                pulled: list[float] = []
                failures: list[BaseException] = []

                async def puller(n: int) -> None:
                    i = n
                    while not done.is_set():
                        try:
                            pulled.append(
                                await skopeo.timed_pull(balancer.host, f"cluster/app{i % 2}:v1")
                            )
                        except Exception as exc:  # every failure counts
                            failures.append(exc)
                        i += 1

                workers = [asyncio.create_task(puller(n)) for n in range(3)]
                try:
                    await async_wait_until(lambda: len(pulled) >= 3, within=60, what="pulls")
                    master.kill()
                    await async_wait_until(
                        lambda: sentinel.master_port_now() == replica.port,
                        within=30,
                        what="the sentinel to promote the replica",
                    )
                    for member in replicas:
                        await async_wait_until(
                            lambda m=member: redis_in_use(http, m.url),
                            within=30,
                            what=f"{member.name} to use the new master",
                        )
                    before = len(pulled)
                    await async_wait_until(
                        lambda: len(pulled) >= before + 3, within=60, what="pulls after"
                    )
                finally:
                    done.set()
                    await asyncio.gather(*workers, return_exceptions=True)
                assert not failures, failures[:3]
            # Coordination goes on through the new master: one fetch for a new blob.
            [fresh] = await push_images(http, registry, tmp_path / "fresh", 1, layers=1)
            layer = fresh.layers[0]
            for member in replicas:
                async with http.get(f"{member.url}/v2/cluster/app0/blobs/{layer.digest}") as r:
                    assert r.status == 200
                    assert sha256(await r.read()) == layer.digest
                await async_wait_until(
                    member.blob_path(layer.digest).exists, within=10, what="the commit"
                )
            assert len(passthrough.log.blob_gets(layer.digest)) == 1


async def test_a_peer_copy_is_served_for_another_repository_only_if_the_upstream_says_so(
    tmp_path: Path,
    registry: Registry,
    fault_proxy: FaultProxy,
    redis_server: RedisServer,
    http: aiohttp.ClientSession,
) -> None:
    [image] = await push_images(http, registry, tmp_path / "images", 1, layers=1)
    layer = image.layers[0]
    hold = fault_proxy.pause_blob(layer.size // 2)
    replicas = Replicas(
        tmp_path / "replicas", 3, upstream_url=fault_proxy.url, redis_url=redis_server.url
    )
    with running(replicas):
        owner, follower, filler = list(replicas)

        async def status_of(base: str, repo: str) -> tuple[int, bytes]:
            async with http.get(f"{base}/v2/{repo}/blobs/{layer.digest}") as r:
                return r.status, await r.read()

        first = asyncio.create_task(status_of(owner.url, "cluster/app0"))
        try:
            await async_wait_until(hold.reached.is_set, within=20, what="the upstream to pause")
            # In flight on the owner for cluster/app0; asked through another repository.
            status, body = await status_of(follower.url, "cluster/elsewhere")
            assert status == 404 and json.loads(body)["errors"][0]["code"] == "BLOB_UNKNOWN"
        finally:
            hold.resume()
        status, body = await first
        assert status == 200 and sha256(body) == layer.digest
        await async_wait_until(
            owner.blob_path(layer.digest).exists, within=10, what="the owner to commit"
        )
        # Committed on the owner (a holder now); asked through another repository.
        status, body = await status_of(filler.url, "cluster/elsewhere")
        assert status == 404
        heads = fault_proxy.log.matching("HEAD", path_suffix=f"/blobs/{layer.digest}")
        assert [e.path.split("/blobs/")[0] for e in heads] == ["/v2/cluster/elsewhere"] * 2
        for member in (follower, filler):
            metrics = await scrape(http, member.url)
            assert metrics.value("registry_proxy_peer_bytes_total", direction="in") == 0
            assert not member.blob_path(layer.digest).exists()
        # Through the repository that holds it, the filler gets it from the owner.
        status, body = await status_of(filler.url, "cluster/app0")
        assert status == 200 and sha256(body) == layer.digest
        assert len(fault_proxy.log.blob_gets(layer.digest)) == 1


async def test_a_hung_owner_is_taken_over_once_its_lease_lapses(
    tmp_path: Path,
    registry: Registry,
    fault_proxy: FaultProxy,
    redis_server: RedisServer,
    http: aiohttp.ClientSession,
) -> None:
    """SIGSTOP, not SIGKILL: the owner's connections stay open, so only its lease (2 s
    here) tells the followers it is gone. A lease that short may also lapse on the new
    owner on a loaded machine (a late renewal): then the other follower takes over once
    more, from its own offset; the bytes are right either way."""
    [image] = await push_images(http, registry, tmp_path / "images", 1, layers=1)
    layer = image.layers[0]
    hold = fault_proxy.pause_blob(layer.size // 2)
    replicas = Replicas(
        tmp_path / "replicas",
        3,
        upstream_url=fault_proxy.url,
        redis_url=redis_server.url,
        lease_ttl="2s",
    )
    url = f"/v2/cluster/app0/blobs/{layer.digest}"
    with running(replicas):
        owner, *followers = list(replicas)

        async def pull(base: str) -> bytes:
            async with http.get(base + url) as response:
                assert response.status == 200
                return await response.read()

        first = asyncio.create_task(pull(owner.url))
        try:
            await async_wait_until(hold.reached.is_set, within=20, what="the upstream to pause")
            tasks = [asyncio.create_task(pull(f.url)) for f in followers]
            await async_wait_until(
                lambda: all(f.temp_files() for f in followers),
                within=20,
                what="both followers to start their copies",
            )
            owner.pause()
            bodies = await asyncio.wait_for(asyncio.gather(*tasks), 60)
        finally:
            owner.resume()
            hold.resume()
            first.cancel()
            with contextlib.suppress(BaseException):
                await first
        assert [sha256(body) for body in bodies] == [layer.digest] * 2
        ranges = [e.headers.get("Range", "")[:6] for e in fault_proxy.log.blob_gets(layer.digest)]
        assert ranges[0] == "" and set(ranges[1:]) == {"bytes="}, ranges
        takeovers = 0.0
        for follower in followers:
            metrics = await scrape(http, follower.url)
            takeovers += metrics.value("registry_proxy_cluster_leases_total", result="takeover")
        assert takeovers == len(ranges) - 1 and takeovers in (1, 2)


async def test_a_hung_holder_is_passed_over_for_the_upstream(
    tmp_path: Path,
    registry: Registry,
    passthrough: PassThrough,
    redis_server: RedisServer,
    http: aiohttp.ClientSession,
) -> None:
    [image] = await push_images(http, registry, tmp_path / "images", 1, layers=1)
    layer = image.layers[0]
    url = f"/v2/cluster/app0/blobs/{layer.digest}"
    replicas = Replicas(
        tmp_path / "replicas", 2, upstream_url=passthrough.url, redis_url=redis_server.url
    )
    with running(replicas):
        holder, other = list(replicas)
        async with http.get(holder.url + url) as response:
            assert response.status == 200
            await response.read()
        await async_wait_until(
            lambda: committed_fetches(http, holder.url), within=10, what="the holder to commit"
        )
        holder.pause()  # it accepts connections (the kernel does) and never answers
        try:
            started = time.monotonic()
            async with http.get(other.url + url) as response:
                assert response.status == 200
                assert sha256(await response.read()) == layer.digest
            waited = time.monotonic() - started
        finally:
            holder.resume()
        assert waited < HOLDER_ANSWER_TIMEOUT + 5
        assert len(passthrough.log.blob_gets(layer.digest)) == 2

        async def fetched_upstream() -> bool:
            metrics = await scrape(http, other.url)
            return metrics.value("registry_proxy_cluster_fetches_total", source="upstream") == 1

        await async_wait_until(fetched_upstream, within=10, what="the upstream fetch's commit")


async def test_a_draining_replica_is_unready_and_takes_no_lease(
    tmp_path: Path,
    registry: Registry,
    passthrough: PassThrough,
    redis_server: RedisServer,
    http: aiohttp.ClientSession,
) -> None:
    """What SIGTERM does first (``PullThroughRegistry.drain``), seen on an in-process
    replica, where the listener stays open for the test to ask."""
    from proxy.api.handlers import REGISTRY_KEY

    secret = tmp_path / "secret"
    secret.write_text(SECRET)
    port = free_port()
    mapping = proxy_settings_mapping(passthrough.url, tmp_path / "cache")
    mapping["cache"]["redis"] = redis_server.url
    mapping["cluster"] = {"advertise": f"127.0.0.1:{port}", "secret_file": str(secret)}
    proxy = await serve_proxy(mapping, port=port)
    try:
        async with http.get(proxy.url + "/readyz") as response:
            assert response.status == 200
            assert (await response.json())["draining"] is False
        pulls = proxy.app[REGISTRY_KEY]
        pulls.drain()
        async with http.get(proxy.url + "/readyz") as response:
            assert response.status == 503
            assert (await response.json())["draining"] is True
        assert pulls.cluster is not None and pulls.cluster.closing
        # Still serving what is asked meanwhile, but fetching as a lone process would.
        [image] = await push_images(http, registry, tmp_path / "images", 1, layers=1)
        layer = image.layers[0]
        before = await scrape(http, proxy.url)
        async with http.get(f"{proxy.url}/v2/cluster/app0/blobs/{layer.digest}") as response:
            assert response.status == 200
            assert sha256(await response.read()) == layer.digest
        after = await scrape(http, proxy.url)
        leases = "registry_proxy_cluster_leases_total"
        assert after.delta(before, leases, result="unavailable") == 1
        assert after.delta(before, leases, result="acquired") == 0
    finally:
        await proxy.server.stop()
