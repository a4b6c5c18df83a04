"""Useful when the upstream is not: a fault-injecting pass-through (``faults.FaultProxy``)
sits between the proxy under test and the real docker-registry.

- Upstream refusing or resetting connections: cached tags are served stale (marked), by
  digest as usual, the uncached fails fast with 503 + Retry-After, /readyz says "down";
  after the cool-down the upstream is used again.
- A proxy restarted while its upstream is down still serves its cached tags (state.db).
- A blob body cut off mid-way is resumed with ``Range`` (or skipped over when the upstream
  ignores Range); only the verified blob is committed.
- Pull budget: under the ``ratelimit-remaining`` floor, cached tags cost no upstream
  request and cold manifests are refused with 429.
- An upstream 429 stays 429; a single 503 is retried; stale serving has limits
  (``max_stale``, ``stale_on_404``); a stalled upstream times out into a stale serve.
- tags/list is served stale; a referrers 404 is passed through.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
import tracemalloc
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.rig import oci
from tests.rig.distribution import (
    blob_sha256,
    get_manifest,
    manifest_digest,
    push_blob,
    push_image,
    put_manifest,
    random_blob,
)
from tests.rig.faults import FaultProxy, blobs, manifests
from tests.rig.process import async_wait_until
from tests.rig.proxy_app import ProxyUnderTest
from tests.rig.registry import Registry
from tests.rig.skopeo import Skopeo

from .scrape import scrape

pytestmark = pytest.mark.integration

ProxyFactory = Callable[..., Awaitable[ProxyUnderTest]]

MiB = 1024 * 1024
FAST_FAIL = 1.0
COMMIT_DEADLINE = 30.0
# Settings that make a dead upstream quick to notice: no retries, short timeouts.
QUICK: dict[str, Any] = {"retries": 0, "connect_timeout": "1s", "read_timeout": "2s"}


async def request(
    http: aiohttp.ClientSession, method: str, url: str
) -> tuple[int, dict[str, str], bytes]:
    headers = {"Accept": oci.ACCEPT_ALL_MANIFESTS}
    async with http.request(method, url, headers=headers) as response:
        return response.status, dict(response.headers), await response.read()


def error_code(body: bytes) -> str:
    errors = json.loads(body)["errors"]
    assert errors and isinstance(errors[0]["message"], str), body
    return str(errors[0]["code"])


def retry_after(headers: dict[str, str]) -> int:
    value = headers.get("Retry-After")
    assert value is not None and value.isdigit() and int(value) >= 1, headers
    return int(value)


async def go_down(fault: FaultProxy, how: str) -> None:
    if how == "refused":
        await fault.refuse()
    else:
        fault.reset = True


async def come_back(fault: FaultProxy, how: str) -> None:
    if how == "refused":
        await fault.accept()
    else:
        fault.reset = False


# --------------------------------------------------------------------------- upstream down


@pytest.mark.parametrize("how", ["refused", "reset"])
async def test_upstream_down_serves_cache_and_fails_fast_otherwise(
    tmp_path: Path,
    registry: Registry,
    fault_proxy: FaultProxy,
    proxy_factory: ProxyFactory,
    skopeo: Skopeo,
    http: aiohttp.ClientSession,
    how: str,
) -> None:
    image = await push_image(http, registry.url, tmp_path / "warm", "down/app", "v1", layers=2)
    cold = await push_image(http, registry.url, tmp_path / "cold", "down/cold", "v1")
    proxy = await proxy_factory(
        fault_proxy.url, tag_ttl="0", failure_threshold=2, cooldown="1s", **QUICK
    )
    await skopeo.pull(proxy.host, "down/app:v1", tmp_path / "first")

    await go_down(fault_proxy, how)

    # retries 0: one failure per request; the breaker opens at the second.
    for failures, state in [(1, "up"), (2, "down")]:
        url = f"{proxy.url}/v2/down/app/manifests/v1"
        status, headers, body = await request(http, "GET", url)
        assert status == 200
        assert body == image.manifest_bytes
        assert headers["X-Cache"] == "STALE"
        assert headers["Warning"].startswith("110 "), headers
        async with http.get(f"{proxy.url}/readyz") as response:
            assert response.status == 200, "the cache is still served: ready"
            report = await response.json()
        assert report["upstreams"]["up"]["state"] == state, (failures, report)
    assert report["upstreams"]["up"]["last_error"]

    by_tag = tmp_path / "by-tag"
    await skopeo.pull(proxy.host, "down/app:v1", by_tag)
    assert oci.layout_layer_digests(by_tag, "pulled") == image.layer_digests
    by_digest = tmp_path / "by-digest"
    await skopeo.pull(proxy.host, f"down/app@{image.manifest.digest}", by_digest)
    assert oci.read_layout_manifest(by_digest, "pulled")[0] == image.manifest.digest

    for method, path in [
        ("GET", "/v2/down/cold/manifests/v1"),
        ("GET", f"/v2/down/cold/manifests/{cold.manifest.digest}"),
        ("GET", f"/v2/down/cold/blobs/{cold.layers[0].digest}"),
    ]:
        started = time.monotonic()
        status, headers, body = await request(http, method, proxy.url + path)
        elapsed = time.monotonic() - started
        assert status == 503, (path, status, body)
        assert elapsed < FAST_FAIL, f"{path} took {elapsed:.2f}s to fail"
        assert headers["Content-Type"].startswith("application/json")
        assert error_code(body) == "UNAVAILABLE"
        retry_after(headers)

    # Back after the cool-down: the next request probes, and tags are revalidated again.
    await come_back(fault_proxy, how)

    async def revalidated() -> bool:
        _, headers, _ = await request(http, "GET", f"{proxy.url}/v2/down/app/manifests/v1")
        return headers.get("X-Cache") == "REVALIDATED"

    await async_wait_until(revalidated, within=10, what="the upstream used again", interval=0.1)
    async with http.get(f"{proxy.url}/readyz") as response:
        assert (await response.json())["upstreams"]["up"]["state"] == "up"
    fetched = await manifest_digest(http, proxy.url, "down/cold", "v1")
    assert fetched.header_digest == cold.manifest.digest


async def test_restart_while_upstream_down_serves_cached_tags(
    tmp_path: Path,
    registry: Registry,
    fault_proxy: FaultProxy,
    proxy_factory: ProxyFactory,
    skopeo: Skopeo,
    http: aiohttp.ClientSession,
) -> None:
    image = await push_image(http, registry.url, tmp_path / "img", "restart/app", "v1")
    cache = tmp_path / "cache"
    settings: dict[str, Any] = {"tag_ttl": "0", "max_stale": "1h", **QUICK}
    first = await proxy_factory(fault_proxy.url, cache_dir=cache, **settings)
    await skopeo.pull(first.host, "restart/app:v1", tmp_path / "warm")
    await first.server.stop()
    await fault_proxy.refuse()

    second = await proxy_factory(fault_proxy.url, cache_dir=cache, **settings)
    assert (cache / "state.db").is_file()
    dest = tmp_path / "after-restart"
    await skopeo.pull(second.host, "restart/app:v1", dest)
    assert oci.layout_layer_digests(dest, "pulled") == image.layer_digests
    assert oci.read_layout_manifest(dest, "pulled")[0] == image.manifest.digest
    status, headers, _ = await request(http, "GET", f"{second.url}/v2/restart/app/manifests/v1")
    assert (status, headers["X-Cache"]) == (200, "STALE")
    # Never seen before the restart: the upstream is needed, and it is down.
    status, _, body = await request(http, "GET", f"{second.url}/v2/restart/app/manifests/v2")
    assert (status, error_code(body)) == (503, "UNAVAILABLE")


# --------------------------------------------------------------------------- cut-off bodies


BIG = 64 * MiB
CUT = BIG // 2


@pytest.fixture
async def big_blob(registry: Registry, http: aiohttp.ClientSession) -> str:
    data, digest = random_blob(BIG)
    await push_blob(http, registry.url, "big/cut", data)
    return digest


@pytest.mark.parametrize("range_support", [True, False], ids=["206", "200-ignores-range"])
async def test_cut_blob_body_is_resumed_and_committed_whole(
    big_blob: str,
    fault_proxy: FaultProxy,
    proxy_factory: ProxyFactory,
    http: aiohttp.ClientSession,
    range_support: bool,
) -> None:
    digest = big_blob
    proxy = await proxy_factory(fault_proxy.url)
    # Two ways to end the connection: a close after the CUT bytes are flushed, and an abort
    # that may lose some of them.
    fault_proxy.cut_blob(CUT, abort=not range_support)
    fault_proxy.strip_range = not range_support

    assert await blob_sha256(http, proxy.url, "big/cut", digest) == (200, digest, BIG)

    gets = fault_proxy.log.blob_gets(digest)
    assert len(gets) == 2, fault_proxy.log.summary()
    first, resumed = gets
    assert "Range" not in first.headers
    assert first.bytes_sent == CUT and first.error and first.error.startswith("cut")
    match = re.fullmatch(r"bytes=(\d+)-", resumed.headers.get("Range", ""))
    assert match is not None, resumed.headers
    # The resume starts where the proxy's reader stopped: at most CUT (aiohttp drops what
    # it still had buffered when it sees the connection end early).
    offset = int(match.group(1))
    assert 0 < offset <= CUT
    if range_support:
        assert resumed.status == 206
        assert resumed.bytes_sent == BIG - offset
    else:
        assert resumed.status == 200
        assert resumed.bytes_sent == BIG

    await async_wait_until(
        proxy.blob_path(digest).is_file, within=COMMIT_DEADLINE, what="the blob committed"
    )
    await async_wait_until(lambda: not proxy.temp_files(), within=5, what="temp files gone")
    assert proxy.committed_blobs() == [proxy.blob_path(digest)]
    hasher = hashlib.sha256()
    with proxy.blob_path(digest).open("rb") as f:
        while chunk := f.read(4 * MiB):
            hasher.update(chunk)
    assert "sha256:" + hasher.hexdigest() == digest
    # Served from the cache from now on.
    assert await blob_sha256(http, proxy.url, "big/cut", digest) == (200, digest, BIG)
    assert len(fault_proxy.log.blob_gets(digest)) == 2


@pytest.mark.parametrize("range_support", [True, False], ids=["206", "200-ignores-range"])
async def test_resume_never_holds_the_blob_in_memory(
    big_blob: str,
    fault_proxy: FaultProxy,
    proxy_factory: ProxyFactory,
    http: aiohttp.ClientSession,
    range_support: bool,
) -> None:
    """Never buffer a blob: skipping the bytes already received from an upstream that
    answers a resumed request with the whole blob must stream past them, not read them
    into memory (a 10 GiB layer cut at 9 GiB would otherwise allocate 9 GiB)."""
    digest = big_blob
    proxy = await proxy_factory(fault_proxy.url)
    fault_proxy.cut_blob(CUT)
    fault_proxy.strip_range = not range_support

    tracemalloc.start()
    try:
        assert await blob_sha256(http, proxy.url, "big/cut", digest) == (200, digest, BIG)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(fault_proxy.log.blob_gets(digest)) == 2, fault_proxy.log.summary()
    assert peak < 16 * MiB, f"peak Python allocation {peak / MiB:.1f} MiB while resuming"


async def test_body_cut_on_every_attempt_is_given_up_and_nothing_committed(
    registry: Registry,
    fault_proxy: FaultProxy,
    proxy_factory: ProxyFactory,
    http: aiohttp.ClientSession,
) -> None:
    """Every response (resumptions included) is cut: after its bounded resumes the fetch
    fails, the client that already has headers gets a broken response (never a clean
    200), nothing is committed, and a later request starts afresh."""
    size = 4 * MiB
    data, digest = random_blob(size)
    await push_blob(http, registry.url, "cut/always", data)
    proxy = await proxy_factory(fault_proxy.url)
    fault_proxy.cut_blob(256 * 1024, times=1000, ranged=True)

    received = 0
    with pytest.raises((aiohttp.ClientPayloadError, aiohttp.ClientConnectionError)):
        async with http.get(f"{proxy.url}/v2/cut/always/blobs/{digest}") as response:
            assert response.status == 200
            async for chunk in response.content.iter_chunked(64 * 1024):
                received += len(chunk)
    assert received < size
    attempts = fault_proxy.log.blob_gets(digest)
    assert 2 <= len(attempts) <= 10, fault_proxy.log.summary()
    assert all("Range" in e.headers for e in attempts[1:]), "each retry resumed"
    await async_wait_until(lambda: not proxy.temp_files(), within=5, what="temp files gone")
    assert proxy.committed_blobs() == []

    fault_proxy.clear_faults()
    assert await blob_sha256(http, proxy.url, "cut/always", digest) == (200, digest, size)


# --------------------------------------------------------------------------- rate limits


async def test_budget_under_floor_serves_cached_tags_and_refuses_cold_pulls(
    tmp_path: Path,
    registry: Registry,
    fault_proxy: FaultProxy,
    proxy_factory: ProxyFactory,
    skopeo: Skopeo,
    http: aiohttp.ClientSession,
) -> None:
    cached = await push_image(http, registry.url, tmp_path / "cached", "rl/cached", "v1")
    cold = await push_image(http, registry.url, tmp_path / "cold", "rl/cold", "v1")
    proxy = await proxy_factory(fault_proxy.url, tag_ttl="0")  # ratelimit_floor: default 10
    await skopeo.pull(proxy.host, "rl/cached:v1", tmp_path / "warm")

    fault_proxy.ratelimit_remaining = 2
    status, headers, _ = await request(http, "GET", f"{proxy.url}/v2/rl/cached/manifests/v1")
    assert (status, headers["X-Cache"]) == (200, "REVALIDATED")  # the HEAD reported 2 left
    fault_proxy.log.clear()

    dest = tmp_path / "under-floor"
    await skopeo.pull(proxy.host, "rl/cached:v1", dest)
    assert oci.layout_layer_digests(dest, "pulled") == cached.layer_digests
    status, headers, _ = await request(http, "GET", f"{proxy.url}/v2/rl/cached/manifests/v1")
    assert (status, headers["X-Cache"]) == (200, "HIT")
    for reference in ("v1", cold.manifest.digest):
        url = f"{proxy.url}/v2/rl/cold/manifests/{reference}"
        status, headers, body = await request(http, "GET", url)
        assert status == 429, (reference, status, body)
        assert error_code(body) == "TOOMANYREQUESTS"
        assert 1 <= retry_after(headers) <= 21600 + 1
    assert fault_proxy.log.exchanges == [], fault_proxy.log.summary()

    metrics = await scrape(http, proxy.url)
    assert metrics.value("registry_proxy_upstream_ratelimit_remaining", upstream="up") == 2
    assert metrics.value("registry_proxy_upstream_ratelimit_limit", upstream="up") == 100
    async with http.get(f"{proxy.url}/readyz") as response:
        report = (await response.json())["upstreams"]["up"]
    assert report["ratelimit_remaining"] == 2 and report["ratelimit_low"] is True, report


@pytest.mark.parametrize(
    ("method", "what"),
    [("GET", "tag"), ("GET", "digest"), ("GET", "blob"), ("HEAD", "blob"), ("HEAD", "tag")],
)
async def test_upstream_429_with_nothing_cached_stays_429(
    tmp_path: Path,
    registry: Registry,
    fault_proxy: FaultProxy,
    proxy_factory: ProxyFactory,
    http: aiohttp.ClientSession,
    method: str,
    what: str,
) -> None:
    image = await push_image(http, registry.url, tmp_path / "img", "limited/app", "v1")
    proxy = await proxy_factory(fault_proxy.url)
    fault_proxy.fail(429, retry_after="7")
    path = {
        "tag": "/v2/limited/app/manifests/v1",
        "digest": f"/v2/limited/app/manifests/{image.manifest.digest}",
        "blob": f"/v2/limited/app/blobs/{image.layers[0].digest}",
    }[what]

    status, headers, body = await request(http, method, proxy.url + path)

    assert status == 429, (status, body)
    assert headers["Retry-After"] == "7"
    if method == "GET":
        assert error_code(body) == "TOOMANYREQUESTS"
    # (A HEAD by tag with nothing cached fills the cache with a GET: the client's GET that
    # follows it is then served locally, one upstream pull in all.)
    assert fault_proxy.log.matching(path_suffix=path), fault_proxy.log.summary()
    assert proxy.committed_blobs() == []


# --------------------------------------------------------------------------- stale policy


@pytest.mark.parametrize(("max_stale", "served"), [("0", False), ("1h", True)])
async def test_stale_serving_is_bounded_by_max_stale(
    tmp_path: Path,
    registry: Registry,
    fault_proxy: FaultProxy,
    proxy_factory: ProxyFactory,
    http: aiohttp.ClientSession,
    max_stale: str,
    served: bool,
) -> None:
    image = await push_image(http, registry.url, tmp_path / "img", "stale/app", "v1")
    proxy = await proxy_factory(fault_proxy.url, tag_ttl="0", max_stale=max_stale, **QUICK)
    url = f"{proxy.url}/v2/stale/app/manifests/v1"
    assert (await request(http, "GET", url))[0] == 200
    await fault_proxy.refuse()

    status, headers, body = await request(http, "GET", url)

    if served:
        assert (status, headers["X-Cache"], body) == (200, "STALE", image.manifest_bytes)
    else:
        assert status == 503, (status, body)
        assert error_code(body) == "UNAVAILABLE"
        retry_after(headers)
        assert "Warning" not in headers


@pytest.mark.parametrize("status", [503, 429])
async def test_revalidation_answered_with_an_error_serves_stale(
    tmp_path: Path,
    registry: Registry,
    fault_proxy: FaultProxy,
    proxy_factory: ProxyFactory,
    http: aiohttp.ClientSession,
    status: int,
) -> None:
    image = await push_image(http, registry.url, tmp_path / "img", "flaky/app", "v1")
    proxy = await proxy_factory(fault_proxy.url, tag_ttl="0", retries=0)
    url = f"{proxy.url}/v2/flaky/app/manifests/v1"
    assert (await request(http, "GET", url))[0] == 200
    fault_proxy.fail(status, retry_after="30")
    fault_proxy.log.clear()

    answer, headers, body = await request(http, "GET", url)

    assert (answer, headers["X-Cache"], body) == (200, "STALE", image.manifest_bytes)
    assert [(e.method, e.status) for e in fault_proxy.log.exchanges] == [("HEAD", status)]


@pytest.mark.parametrize("stale_on_404", [False, True])
async def test_tag_gone_upstream_is_served_stale_only_with_stale_on_404(
    tmp_path: Path,
    registry: Registry,
    fault_proxy: FaultProxy,
    proxy_factory: ProxyFactory,
    http: aiohttp.ClientSession,
    stale_on_404: bool,
) -> None:
    image = await push_image(http, registry.url, tmp_path / "img", "gone/app", "v1")
    proxy = await proxy_factory(fault_proxy.url, tag_ttl="0", stale_on_404=stale_on_404)
    url = f"{proxy.url}/v2/gone/app/manifests/v1"
    assert (await request(http, "GET", url))[0] == 200
    fault_proxy.drop_tag("gone/app", "v1")
    fault_proxy.log.clear()

    status, headers, body = await request(http, "GET", url)

    assert fault_proxy.log.manifest_requests(), "the tag was asked for upstream"
    assert {e.status for e in fault_proxy.log.manifest_requests()} == {404}
    if stale_on_404:
        assert (status, headers["X-Cache"], body) == (200, "STALE", image.manifest_bytes)
        assert headers["Warning"].startswith("110 ")
    else:
        assert status == 404, (status, body)
        assert error_code(body) == "MANIFEST_UNKNOWN"
    # By digest the manifest is immutable and still cached either way.
    by_digest = await get_manifest(http, proxy.url, "gone/app", image.manifest.digest)
    assert (by_digest.status, by_digest.body) == (200, image.manifest_bytes)


async def test_stalled_upstream_times_out_into_a_stale_serve(
    tmp_path: Path,
    registry: Registry,
    fault_proxy: FaultProxy,
    proxy_factory: ProxyFactory,
    http: aiohttp.ClientSession,
) -> None:
    image = await push_image(http, registry.url, tmp_path / "img", "stall/app", "v1")
    cold = await push_image(http, registry.url, tmp_path / "cold", "stall/cold", "v1")
    proxy = await proxy_factory(
        fault_proxy.url, tag_ttl="0", retries=0, connect_timeout="1s", read_timeout="300ms"
    )
    url = f"{proxy.url}/v2/stall/app/manifests/v1"
    assert (await request(http, "GET", url))[0] == 200
    stall = fault_proxy.stall()

    started = time.monotonic()
    status, headers, body = await request(http, "GET", url)
    assert (status, headers["X-Cache"], body) == (200, "STALE", image.manifest_bytes)
    status, _, body = await request(http, "GET", f"{proxy.url}/v2/stall/cold/manifests/v1")
    assert (status, error_code(body)) == (503, "UNAVAILABLE")
    elapsed = time.monotonic() - started
    assert stall.held == 2, "both requests reached the upstream and hung there"
    assert elapsed < 3.0, f"two requests to a stalled upstream took {elapsed:.2f}s"

    fault_proxy.release()
    fetched = await manifest_digest(http, proxy.url, "stall/cold", "v1")
    assert fetched.header_digest == cold.manifest.digest


# --------------------------------------------------------------------------- retries


@pytest.mark.parametrize(("retries", "expected"), [(2, 200), (0, 502)])
async def test_single_upstream_503_is_retried(
    tmp_path: Path,
    registry: Registry,
    fault_proxy: FaultProxy,
    proxy_factory: ProxyFactory,
    http: aiohttp.ClientSession,
    retries: int,
    expected: int,
) -> None:
    image = await push_image(http, registry.url, tmp_path / "img", "retry/app", "v1")
    proxy = await proxy_factory(fault_proxy.url, retries=retries)
    fault_proxy.fail(503, match=manifests("GET"), times=1)
    fault_proxy.fail(503, match=blobs("GET"), times=1)
    layer = image.layers[0]

    status, _, body = await request(http, "GET", f"{proxy.url}/v2/retry/app/manifests/v1")
    blob = await blob_sha256(http, proxy.url, "retry/app", layer.digest)

    assert status == expected, (status, body)
    gets = fault_proxy.log.manifest_requests("GET")
    blob_gets = fault_proxy.log.blob_gets(layer.digest)
    if expected == 200:
        assert body == image.manifest_bytes
        assert [e.status for e in gets] == [503, 200], fault_proxy.log.summary()
        assert blob == (200, layer.digest, layer.size)
        assert [e.status for e in blob_gets] == [503, 200], fault_proxy.log.summary()
    else:
        assert error_code(body) == "UNAVAILABLE"
        assert [e.status for e in gets] == [503]
        assert blob[0] == 502
        assert [e.status for e in blob_gets] == [503]


# --------------------------------------------------------------------------- tags, referrers


async def test_tags_list_is_served_stale_when_upstream_is_down(
    tmp_path: Path,
    registry: Registry,
    fault_proxy: FaultProxy,
    proxy_factory: ProxyFactory,
    http: aiohttp.ClientSession,
) -> None:
    image = await push_image(http, registry.url, tmp_path / "img", "tl/app", "v1")
    await put_manifest(http, registry.url, "tl/app", "v2", image.manifest_bytes, oci.OCI_MANIFEST)
    await push_image(http, registry.url, tmp_path / "other", "tl/never", "v1")
    proxy = await proxy_factory(fault_proxy.url, tag_ttl="0", **QUICK)
    url = f"{proxy.url}/v2/tl/app/tags/list"

    status, headers, body = await request(http, "GET", url)
    assert (status, headers["X-Cache"]) == (200, "MISS")
    assert json.loads(body) == {"name": "tl/app", "tags": ["v1", "v2"]}
    await fault_proxy.refuse()

    status, headers, stale = await request(http, "GET", url)
    assert (status, headers["X-Cache"]) == (200, "STALE")
    assert stale == body
    status, _, missing = await request(http, "GET", f"{proxy.url}/v2/tl/never/tags/list")
    assert (status, error_code(missing)) == (503, "UNAVAILABLE")


async def test_referrers_404_from_upstream_is_passed_through(
    tmp_path: Path,
    registry: Registry,
    fault_proxy: FaultProxy,
    proxy_factory: ProxyFactory,
    http: aiohttp.ClientSession,
) -> None:
    image = await push_image(http, registry.url, tmp_path / "img", "ref/app", "v1")
    path = f"/v2/ref/app/referrers/{image.manifest.digest}"
    async with http.get(registry.url + path) as direct:
        assert direct.status == 404, "docker-registry 2.8 has no referrers API"
    proxy = await proxy_factory(fault_proxy.url)

    status, headers, _ = await request(http, "GET", proxy.url + path)

    assert status == 404
    assert [(e.method, e.path, e.status) for e in fault_proxy.log.exchanges] == [
        ("GET", path, 404)
    ], fault_proxy.log.summary()
    assert headers["X-Cache"] == "MISS"
