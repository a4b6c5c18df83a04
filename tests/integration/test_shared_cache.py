"""The Redis-shared descriptor chain, against a real ``redis-server``.

- The descriptor, tag and link contracts hold for the Redis implementations on a real
  server (the memory/fakeredis suites live in ``tests/contracts``), and they stay advisory
  when the server dies.
- Two proxy instances (own ports, own cache directories) share one Redis and one upstream:
  what one learned (a revalidated tag, a blob descriptor, a repository link) spares the
  other its upstream request.
- Redis killed in the middle of pulls: every pull succeeds, errors are counted, the
  breaker opens, and once Redis is back the cache is used again without a restart.
- A hung Redis adds no latency once the breaker is open.
- Repository scoping: bytes are shared on disk, but a digest is served for a repository
  only after the upstream confirmed that repository holds it.
- Blob middleware: the first in the list is the outermost.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import aiohttp
import pytest

from proxy.cache.redis import (
    BLOB_TTL,
    BREAKER_FAILURES,
    DEFAULT_TAG_RETENTION,
    HALF_OPEN,
    LINK_TTL,
    OPEN,
    RedisDescriptorCache,
    RedisLayer,
    RedisLinkStore,
    RedisTagStore,
    connect,
)
from proxy.cache.redis import (
    RedisBreaker as Breaker,
)
from proxy.errors import BlobUnknown
from proxy.interfaces import (
    BlobDescriptorService,
    BlobMiddleware,
    OpenedBlob,
    RepositoryBlobs,
    TagEntry,
)
from proxy.model import Descriptor, Digest, Outcome
from proxy.pullthrough.registry import PullThroughRegistry
from proxy.settings import Settings
from tests.rig import oci
from tests.rig.distribution import (
    blob_sha256,
    get_manifest,
    manifest_digest,
    push_existing,
    push_image,
)
from tests.rig.process import async_wait_until
from tests.rig.proxy_app import ProxyFactory, proxy_settings_mapping
from tests.rig.recording import PassThrough
from tests.rig.redis_server import RedisServer, redis_client
from tests.rig.registry import Registry
from tests.rig.skopeo import Skopeo

from .scrape import scrape

pytestmark = pytest.mark.integration

PREFIX = "rp:v1"
LAYER_MT = "application/vnd.oci.image.layer.v1.tar+gzip"
COMMIT_DEADLINE = 10.0
OPS = "registry_proxy_redis_operations_total"
BREAKER = "registry_proxy_redis_breaker_state"


def digest_of(label: str) -> Digest:
    return Digest("sha256", hashlib.sha256(label.encode()).hexdigest())


def text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def link_key(repo: str, digest: str | Digest) -> str:
    return f"{PREFIX}:link:up:{repo}:{digest}"


def tag_key(repo: str, tag: str) -> str:
    return f"{PREFIX}:tag:up:{repo}:{tag}"


async def get_headers(
    http: aiohttp.ClientSession, url: str, method: str = "GET"
) -> tuple[int, dict[str, str], bytes]:
    async with http.request(method, url, headers={"Accept": oci.ACCEPT_ALL_MANIFESTS}) as r:
        return r.status, dict(r.headers), await r.read()


# --------------------------------------------------------------------------- contracts


@pytest.fixture
async def layer(redis_server: RedisServer) -> AsyncIterator[RedisLayer]:
    redis_layer = RedisLayer(connect(redis_server.url))
    try:
        yield redis_layer
    finally:
        await redis_layer.close()


async def test_descriptor_contract_on_real_redis(
    layer: RedisLayer,
    redis_server: RedisServer,
) -> None:
    cache: BlobDescriptorService = RedisDescriptorCache(layer)
    digest = digest_of("one")
    descriptor = Descriptor(digest, 1234, LAYER_MT)

    with pytest.raises(BlobUnknown):
        await cache.stat(digest)

    await cache.set_descriptor(digest, descriptor)
    assert await cache.stat(digest) == descriptor
    await cache.set_descriptor(digest, descriptor)  # idempotent
    assert await cache.stat(digest) == descriptor

    replaced = Descriptor(digest, 99, "application/octet-stream")
    await cache.set_descriptor(digest, replaced)
    assert await cache.stat(digest) == replaced

    other = digest_of("two")
    with pytest.raises(BlobUnknown):
        await cache.stat(other)

    async with redis_client(redis_server.url) as client:
        key = f"{PREFIX}:blob:sha256:{digest.hex}"
        assert await client.hgetall(key) == {b"size": b"99", b"mt": b"application/octet-stream"}
        assert 0 < await client.ttl(key) <= BLOB_TTL

    await cache.clear(digest)
    with pytest.raises(BlobUnknown):
        await cache.stat(digest)
    await cache.clear(digest)  # clearing an unknown digest is fine
    await cache.clear(other)


async def test_tag_and_link_contracts_on_real_redis(
    layer: RedisLayer,
    redis_server: RedisServer,
) -> None:
    tags = RedisTagStore(layer)
    links = RedisLinkStore(layer)
    digest = digest_of("manifest")
    entry = TagEntry(digest, oci.OCI_MANIFEST, 512, 1_700_000_000.123456)

    assert await tags.get("up", "team/app", "v1") is None
    await tags.set("up", "team/app", "v1", entry)
    assert await tags.get("up", "team/app", "v1") == entry
    assert await tags.get("up", "team/app", "v2") is None
    assert await tags.get("other", "team/app", "v1") is None
    newer = TagEntry(digest_of("newer"), oci.OCI_INDEX, 77, entry.fetched_at + 60)
    await tags.set("up", "team/app", "v1", newer)
    assert await tags.get("up", "team/app", "v1") == newer

    first, second = digest_of("a"), digest_of("b")
    assert not await links.linked("up", "team/app", first)
    await links.link("up", "team/app", [first, second])
    await links.link("up", "team/app", [first])  # idempotent
    await links.link("up", "team/app", [])
    assert await links.linked("up", "team/app", first)
    assert await links.linked("up", "team/app", second)
    assert not await links.linked("up", "team/other", first)
    assert not await links.linked("other", "team/app", first)

    async with redis_client(redis_server.url) as client:
        assert 0 < await client.ttl(tag_key("team/app", "v1")) <= DEFAULT_TAG_RETENTION
        assert 0 < await client.ttl(link_key("team/app", first)) <= LINK_TTL
        keys = sorted(text(k) for k in await client.keys(f"{PREFIX}:*"))
    assert keys == sorted(
        [tag_key("team/app", "v1"), link_key("team/app", first), link_key("team/app", second)]
    )


async def test_redis_services_stay_advisory_when_the_server_dies(
    layer: RedisLayer,
    redis_server: RedisServer,
) -> None:
    cache = RedisDescriptorCache(layer)
    tags = RedisTagStore(layer)
    links = RedisLinkStore(layer)
    digest = digest_of("known")
    await cache.set_descriptor(digest, Descriptor(digest, 1, LAYER_MT))
    await links.link("up", "r", [digest])

    redis_server.kill()

    for _ in range(5):  # past the breaker's threshold: errors first, then skips
        with pytest.raises(BlobUnknown):
            await cache.stat(digest)
        await cache.set_descriptor(digest, Descriptor(digest, 1, LAYER_MT))
        await cache.clear(digest)
        assert await tags.get("up", "r", "t") is None
        await tags.set("up", "r", "t", TagEntry(digest, oci.OCI_MANIFEST, 1, time.time()))
        assert not await links.linked("up", "r", digest)
        await links.link("up", "r", [digest])
    assert layer.breaker.state == OPEN
    assert not await layer.ping()


async def test_cancelled_half_open_probe_does_not_shut_redis_out_for_good(
    redis_server: RedisServer,
) -> None:
    """The half-open probe is the one caller let through; if it never reports (its task is
    cancelled mid-call: a request cancelled, a timeout around it, shutdown), the breaker
    must still let a later caller probe again, or Redis is skipped until a restart."""
    cooldown = 0.2
    layer = RedisLayer(connect(redis_server.url), breaker=Breaker(cooldown=cooldown))
    tags = RedisTagStore(layer)
    entry = TagEntry(digest_of("m"), oci.OCI_MANIFEST, 10, 1_700_000_000.0)
    try:
        await tags.set("up", "r", "t", entry)
        assert await tags.get("up", "r", "t") == entry

        redis_server.pause()  # hung: every call waits for its socket timeout
        for _ in range(BREAKER_FAILURES):
            assert await tags.get("up", "r", "t") is None
        assert layer.breaker.state == OPEN
        opened = time.monotonic()
        await async_wait_until(
            lambda: time.monotonic() - opened > cooldown, within=5, what="the cool-down"
        )
        probe = asyncio.create_task(tags.get("up", "r", "t"))
        await async_wait_until(
            lambda: layer.breaker.state == HALF_OPEN, within=5, what="the probe under way"
        )
        probe.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await probe
        redis_server.resume()

        async def used_again() -> bool:
            return await tags.get("up", "r", "t") == entry

        await async_wait_until(
            used_again, within=5, what=f"redis used again (breaker {layer.breaker.state})"
        )
    finally:
        redis_server.resume()
        await layer.close()


# --------------------------------------------------------------------------- two instances


async def test_tag_revalidated_by_one_instance_is_fresh_for_the_other(
    tmp_path: Path,
    registry: Registry,
    passthrough: PassThrough,
    redis_server: RedisServer,
    redis_proxy_factory: ProxyFactory,
    http: aiohttp.ClientSession,
) -> None:
    ttl = 1.5
    image = await push_image(http, registry.url, tmp_path / "img", "shared/tag", "v1")
    a = await redis_proxy_factory(passthrough.url, redis_server.url, tag_ttl=f"{ttl}s")
    b = await redis_proxy_factory(passthrough.url, redis_server.url, tag_ttl=f"{ttl}s")
    for instance in (a, b):
        fetched = await manifest_digest(http, instance.url, "shared/tag", "v1")
        assert fetched.header_digest == image.manifest.digest
    learned = time.time()

    # Both instances' own (L1) entries are now past the TTL.
    await async_wait_until(
        lambda: time.time() - learned > ttl + 0.05, within=ttl + 5, what="the tag TTL to pass"
    )
    passthrough.log.clear()
    status, headers, body = await get_headers(http, f"{a.url}/v2/shared/tag/manifests/v1")
    assert status == 200
    assert headers["X-Cache"] == "REVALIDATED"
    assert [(e.method, e.path) for e in passthrough.log.exchanges] == [
        ("HEAD", "/v2/shared/tag/manifests/v1")
    ], passthrough.log.summary()

    passthrough.log.clear()
    status, headers, body = await get_headers(http, f"{b.url}/v2/shared/tag/manifests/v1")
    assert status == 200
    assert body == image.manifest_bytes
    assert headers["X-Cache"] == "HIT", "B used the mapping A revalidated, from Redis"
    assert passthrough.log.exchanges == [], passthrough.log.summary()


async def test_instance_without_the_manifest_fetches_it_by_digest_not_by_tag(
    tmp_path: Path,
    registry: Registry,
    passthrough: PassThrough,
    redis_server: RedisServer,
    redis_proxy_factory: ProxyFactory,
    http: aiohttp.ClientSession,
) -> None:
    """B knows the tag's digest from Redis (fresh, within the TTL) but has no manifest bytes
    on its disk: it must ask the upstream for that digest, not for the tag again (which
    could by now name another manifest than the one A serves for the same TTL)."""
    image = await push_image(http, registry.url, tmp_path / "img", "shared/bytes", "v1")
    a = await redis_proxy_factory(passthrough.url, redis_server.url, tag_ttl="1h")
    b = await redis_proxy_factory(passthrough.url, redis_server.url, tag_ttl="1h")
    await manifest_digest(http, a.url, "shared/bytes", "v1")
    async with redis_client(redis_server.url) as client:
        stored = await client.hgetall(tag_key("shared/bytes", "v1"))
    assert text(stored[b"digest"]) == image.manifest.digest
    passthrough.log.clear()

    fetched = await manifest_digest(http, b.url, "shared/bytes", "v1")

    assert fetched.body == image.manifest_bytes
    by_tag = [(e.method, e.path) for e in passthrough.log.matching(path_suffix="/manifests/v1")]
    assert by_tag == [], "B asked the upstream for the tag:\n" + passthrough.log.summary()
    assert [(e.method, e.path) for e in passthrough.log.exchanges] == [
        ("GET", f"/v2/shared/bytes/manifests/{image.manifest.digest}")
    ], passthrough.log.summary()


async def test_descriptor_learned_by_one_instance_needs_no_upstream_head_on_the_other(
    tmp_path: Path,
    registry: Registry,
    passthrough: PassThrough,
    redis_server: RedisServer,
    redis_proxy_factory: ProxyFactory,
    http: aiohttp.ClientSession,
) -> None:
    repo = "shared/blobs"
    image = await push_image(http, registry.url, tmp_path / "img", repo, "v1", layers=2)
    a = await redis_proxy_factory(passthrough.url, redis_server.url)
    b = await redis_proxy_factory(passthrough.url, redis_server.url)
    await manifest_digest(http, a.url, repo, "v1")
    blobs = (image.config, *image.layers)
    for blob in blobs:
        assert await blob_sha256(http, a.url, repo, blob.digest) == (200, blob.digest, blob.size)

    async with redis_client(redis_server.url) as client:

        async def shared() -> bool:
            keys = [f"{PREFIX}:blob:{blob.digest}" for blob in blobs]
            keys += [link_key(repo, blob.digest) for blob in blobs]
            return bool(await client.exists(*keys) == len(keys))

        await async_wait_until(shared, within=COMMIT_DEADLINE, what="descriptors and links")
    passthrough.log.clear()

    for blob in blobs:
        async with http.head(f"{b.url}/v2/{repo}/blobs/{blob.digest}") as response:
            assert response.status == 200
            assert response.headers["Content-Length"] == str(blob.size)
            assert response.headers["Docker-Content-Digest"] == blob.digest
    assert passthrough.log.exchanges == [], passthrough.log.summary()

    # B has no bytes of its own: a GET fetches them once, still without a HEAD first.
    layer = image.layers[0]
    assert await blob_sha256(http, b.url, repo, layer.digest) == (200, layer.digest, layer.size)
    assert [(e.method, e.path) for e in passthrough.log.exchanges] == [
        ("GET", f"/v2/{repo}/blobs/{layer.digest}")
    ], passthrough.log.summary()


# --------------------------------------------------------------------------- Redis failures


async def test_redis_killed_mid_pulls_then_back_without_restarting_the_proxy(
    tmp_path: Path,
    registry: Registry,
    passthrough: PassThrough,
    redis_server: RedisServer,
    redis_proxy_factory: ProxyFactory,
    skopeo: Skopeo,
    http: aiohttp.ClientSession,
) -> None:
    images = [
        await push_image(http, registry.url, tmp_path / f"img{i}", f"run/app{i}", "v1")
        for i in range(5)
    ]
    proxy = await redis_proxy_factory(
        passthrough.url, redis_server.url, tag_ttl="0", breaker_cooldown=0.5
    )
    before = await scrape(http, proxy.url)

    async def pull(index: int) -> None:
        dest = tmp_path / f"pulled{index}"
        await skopeo.pull(proxy.host, f"run/app{index}:v1", dest)
        assert oci.layout_layer_digests(dest, "pulled") == images[index].layer_digests

    await pull(0)
    async with redis_client(redis_server.url) as client:
        assert await client.exists(tag_key("run/app0", "v1"))

    async def run_of_pulls() -> None:
        for index in (1, 2, 0):
            await pull(index)

    pulls = asyncio.create_task(run_of_pulls())
    await async_wait_until(
        lambda: passthrough.log.blob_gets(images[1].layers[0].digest) or pulls.done(),
        within=30,
        what="the second pull under way",
    )
    redis_server.kill()
    await pulls  # every pull succeeded (skopeo raises otherwise)
    await pull(3)

    dead = await scrape(http, proxy.url)
    assert dead.delta(before, OPS, result="error") > 0
    assert dead.value(BREAKER) == 1  # the gauge: 0 closed, 1 open, 2 half-open

    redis_server.start()  # same port, empty
    async with redis_client(redis_server.url) as client:
        assert await client.dbsize() == 0

        async def cache_used_again() -> bool:
            status, _, _ = await get_headers(http, f"{proxy.url}/v2/run/app0/manifests/v1")
            assert status == 200
            return (await scrape(http, proxy.url)).value(BREAKER) == 0

        await async_wait_until(
            cache_used_again, within=15, what="the breaker to close", interval=0.1
        )
        back = await scrape(http, proxy.url)
        await pull(4)
        after = await scrape(http, proxy.url)
        assert after.delta(back, OPS, result="ok") > 0
        assert after.delta(back, OPS, result="error") == 0
        assert await client.exists(tag_key("run/app4", "v1"))
        layer = images[4].layers[0].digest
        assert await client.exists(link_key("run/app4", layer))

        async def descriptor_written() -> bool:
            return bool(await client.exists(f"{PREFIX}:blob:{layer}"))

        await async_wait_until(descriptor_written, within=COMMIT_DEADLINE, what="descriptor")


async def test_hung_redis_adds_no_latency_once_the_breaker_is_open(
    tmp_path: Path,
    registry: Registry,
    passthrough: PassThrough,
    redis_server: RedisServer,
    redis_proxy_factory: ProxyFactory,
    http: aiohttp.ClientSession,
) -> None:
    """SIGSTOP: the kernel still accepts connections, so every Redis call waits for its
    socket timeout (0.25 s) until the breaker opens; with tag_ttl 0 a warm HEAD by tag reads
    and writes the tag in Redis, so a closed breaker would cost >= 0.5 s per request."""
    await push_image(http, registry.url, tmp_path / "img", "hung/app", "v1")
    proxy = await redis_proxy_factory(passthrough.url, redis_server.url, tag_ttl="0")
    url = f"{proxy.url}/v2/hung/app/manifests/v1"
    assert (await get_headers(http, url))[0] == 200

    redis_server.pause()

    async def breaker_open() -> bool:
        assert (await get_headers(http, url, "HEAD"))[0] == 200
        return (await scrape(http, proxy.url)).value(BREAKER) == 1

    await async_wait_until(breaker_open, within=15, what="the breaker to open", interval=0)
    before = await scrape(http, proxy.url)
    for _ in range(5):
        started = time.monotonic()
        status, headers, _ = await get_headers(http, url, "HEAD")
        elapsed = time.monotonic() - started
        assert status == 200
        assert headers["Docker-Content-Digest"]
        assert elapsed < 0.5, f"a warm HEAD took {elapsed:.3f}s with the breaker open"
    after = await scrape(http, proxy.url)
    assert after.delta(before, OPS, result="skipped") >= 10
    assert after.delta(before, OPS, result="error") == 0


# --------------------------------------------------------------------------- scoping


async def test_blob_is_served_for_a_repository_only_once_upstream_confirms_it(
    tmp_path: Path,
    registry: Registry,
    passthrough: PassThrough,
    redis_server: RedisServer,
    redis_proxy_factory: ProxyFactory,
    skopeo: Skopeo,
    http: aiohttp.ClientSession,
) -> None:
    image = await push_image(http, registry.url, tmp_path / "img", "team/private", "v1")
    proxy = await redis_proxy_factory(passthrough.url, redis_server.url)
    await skopeo.pull(proxy.host, "team/private:v1", tmp_path / "pulled")
    layer = image.layers[0]
    assert proxy.blob_path(layer.digest).is_file()
    passthrough.log.clear()

    async with http.get(f"{proxy.url}/v2/other/repo/blobs/{layer.digest}") as response:
        assert response.status == 404
        body = await response.json(content_type=None)
    assert body["errors"][0]["code"] == "BLOB_UNKNOWN"
    assert [(e.method, e.path, e.status) for e in passthrough.log.exchanges] == [
        ("HEAD", f"/v2/other/repo/blobs/{layer.digest}", 404)
    ], passthrough.log.summary()
    async with http.head(f"{proxy.url}/v2/other/repo/blobs/{layer.digest}") as response:
        assert response.status == 404

    await push_existing(http, registry.url, image, "other/repo", "v1")
    passthrough.log.clear()

    assert await blob_sha256(http, proxy.url, "other/repo", layer.digest) == (
        200,
        layer.digest,
        layer.size,
    )
    assert passthrough.log.blob_gets() == [], passthrough.log.summary()
    assert [(e.method, e.path) for e in passthrough.log.exchanges] == [
        ("HEAD", f"/v2/other/repo/blobs/{layer.digest}")
    ], passthrough.log.summary()
    async with redis_client(redis_server.url) as client:
        assert await client.exists(link_key("other/repo", layer.digest))
    # The manifest is scoped the same way: by digest through the new repository, after a
    # HEAD upstream, from the shared disk.
    passthrough.log.clear()
    fetched = await get_manifest(http, proxy.url, "other/repo", image.manifest.digest)
    assert fetched.status == 200
    assert fetched.body == image.manifest_bytes
    assert passthrough.log.manifest_requests("GET") == [], passthrough.log.summary()


# --------------------------------------------------------------------------- middleware


class Recording(RepositoryBlobs):
    """A blob middleware that records entering and leaving each call."""

    def __init__(self, name: str, calls: list[str], inner: RepositoryBlobs) -> None:
        self._name = name
        self._calls = calls
        self._inner = inner

    async def stat(self, digest: Digest) -> Descriptor:
        self._calls.append(f"{self._name}>stat")
        try:
            return await self._inner.stat(digest)
        finally:
            self._calls.append(f"{self._name}<stat")

    async def open(self, digest: Digest) -> OpenedBlob:
        self._calls.append(f"{self._name}>open")
        try:
            return await self._inner.open(digest)
        finally:
            self._calls.append(f"{self._name}<open")


def recording(name: str, calls: list[str]) -> BlobMiddleware:
    def wrap(inner: RepositoryBlobs) -> RepositoryBlobs:
        return Recording(name, calls, inner)

    return wrap


@pytest.mark.parametrize("order", [("a", "b"), ("b", "a")], ids=["a,b", "b,a"])
async def test_first_middleware_is_outermost(
    tmp_path: Path,
    registry: Registry,
    passthrough: PassThrough,
    http: aiohttp.ClientSession,
    order: Sequence[str],
) -> None:
    image = await push_image(http, registry.url, tmp_path / "img", "mw/app", "v1")
    layer = image.layers[0]
    calls: list[str] = []
    settings = Settings.from_mapping(proxy_settings_mapping(passthrough.url, tmp_path / "cache"))
    pull_through = PullThroughRegistry(
        settings, middleware=[recording(name, calls) for name in order]
    )
    await pull_through.open()
    try:
        upstream = settings.upstreams[0]
        chain = pull_through.blobs(upstream, "mw/app")
        assert await chain.stat(Digest.parse(layer.digest)) == Descriptor(
            Digest.parse(layer.digest), layer.size
        )
        first, second = order
        assert calls == [f"{first}>stat", f"{second}>stat", f"{second}<stat", f"{first}<stat"]
        assert [(e.method, e.path) for e in passthrough.log.exchanges] == [
            ("HEAD", f"/v2/mw/app/blobs/{layer.digest}")
        ], "the innermost link asked the upstream"

        # A GET goes through the same chain, same order.
        calls.clear()
        opened = await pull_through.blobs(upstream, "mw/app").open(Digest.parse(layer.digest))
        assert opened.outcome is Outcome.MISS
        assert calls == [f"{first}>open", f"{second}>open", f"{second}<open", f"{first}<open"]
        await pull_through.inflight.wait_idle()
        calls.clear()
        head = await pull_through.blobs(upstream, "mw/app").stat(Digest.parse(image.config.digest))
        assert head.size == image.config.size
        assert calls == [f"{first}>stat", f"{second}>stat", f"{second}<stat", f"{first}<stat"]
    finally:
        await pull_through.close()
