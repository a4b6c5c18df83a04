"""Blob fetches through the proxy: coalescing, fills that survive a hang-up, digest
verification, Range, and HEAD that never downloads."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Awaitable, Callable

import aiohttp
import pytest

from tests.rig.distribution import blob_sha256, push_blob, random_blob
from tests.rig.oci import sha256_digest
from tests.rig.process import async_wait_until
from tests.rig.proxy_app import ProxyUnderTest
from tests.rig.recording import PassThrough
from tests.rig.registry import Registry
from tests.rig.upstreams import LyingUpstream

pytestmark = pytest.mark.integration

MiB = 1024 * 1024
BIG = 32 * MiB
COMMIT_DEADLINE = 30.0

ProxyFactory = Callable[..., Awaitable[ProxyUnderTest]]


def committed(proxy: ProxyUnderTest, digest: str) -> Callable[[], bool]:
    path = proxy.blob_path(digest)
    return path.is_file


async def test_concurrent_gets_of_uncached_blob_cost_one_upstream_get(
    registry: Registry,
    passthrough: PassThrough,
    proxy: ProxyUnderTest,
    http: aiohttp.ClientSession,
) -> None:
    data, digest = random_blob(BIG)
    await push_blob(http, registry.url, "big/blob", data)
    del data

    results = await asyncio.gather(
        *(blob_sha256(http, proxy.url, "big/blob", digest) for _ in range(16))
    )

    assert results == [(200, digest, BIG)] * 16
    gets = passthrough.log.blob_gets(digest)
    assert len(gets) == 1, passthrough.log.summary()
    assert passthrough.log.blob_bytes_served(digest) == BIG
    await async_wait_until(
        committed(proxy, digest), within=COMMIT_DEADLINE, what=f"{digest} committed"
    )


async def test_fill_survives_first_client_hanging_up(
    registry: Registry,
    passthrough: PassThrough,
    proxy: ProxyUnderTest,
    http: aiohttp.ClientSession,
) -> None:
    data, digest = random_blob(BIG)
    await push_blob(http, registry.url, "big/hangup", data)

    async with aiohttp.ClientSession() as impatient:
        response = await impatient.get(f"{proxy.url}/v2/big/hangup/blobs/{digest}")
        assert response.status == 200
        first = await response.content.readexactly(MiB)
        assert first == data[:MiB]
        response.close()  # drop the connection with 31 MiB unread

    await async_wait_until(
        committed(proxy, digest),
        within=COMMIT_DEADLINE,
        what=f"{digest} committed after the client hung up",
    )
    assert sha256_digest(proxy.blob_path(digest).read_bytes()) == digest

    assert await blob_sha256(http, proxy.url, "big/hangup", digest) == (200, digest, BIG)
    assert len(passthrough.log.blob_gets(digest)) == 1, passthrough.log.summary()


async def test_lying_upstream_is_never_served_or_committed(
    lying_upstream: LyingUpstream, proxy_factory: ProxyFactory
) -> None:
    proxy = await proxy_factory(lying_upstream.url)
    digest = "sha256:" + hashlib.sha256(b"what the blob should be").hexdigest()
    url = f"{proxy.url}/v2/liar/repo/blobs/{digest}"

    async def attempt() -> tuple[int, int, bool]:
        """(status or 0, bytes read, clean end) of one GET through the proxy."""
        status = received = 0
        async with aiohttp.ClientSession() as session:
            try:
                async with session.get(url) as response:
                    status = response.status
                    async for chunk in response.content.iter_chunked(64 * 1024):
                        received += len(chunk)
                    return status, received, True
            except (aiohttp.ClientPayloadError, aiohttp.ClientConnectionError):
                return status, received, False

    status, received, clean = await attempt()
    assert not (status == 200 and clean), (
        f"a clean {status} with {received} bytes that do not hash to {digest}"
    )
    assert len(lying_upstream.log.blob_gets(digest)) >= 1

    await async_wait_until(
        lambda: not proxy.temp_files(),
        within=COMMIT_DEADLINE,
        what=f"temp files removed: {proxy.temp_files()}",
    )
    assert proxy.committed_blobs() == []

    # Nothing was remembered: asking again goes upstream again (polled, because the failed
    # fetch may still be unregistering when the first client sees its error).
    async def asked_again() -> bool:
        await attempt()
        return len(lying_upstream.log.blob_gets(digest)) >= 2

    await async_wait_until(asked_again, within=10, what="a second upstream GET", interval=0.1)
    assert proxy.committed_blobs() == []


async def test_range_on_cached_blob(
    registry: Registry,
    passthrough: PassThrough,
    proxy: ProxyUnderTest,
    http: aiohttp.ClientSession,
) -> None:
    data, digest = random_blob(MiB)
    await push_blob(http, registry.url, "range/blob", data)
    url = f"{proxy.url}/v2/range/blob/blobs/{digest}"
    assert await blob_sha256(http, proxy.url, "range/blob", digest) == (200, digest, MiB)
    await async_wait_until(committed(proxy, digest), within=COMMIT_DEADLINE, what="commit")

    for header, start, end in [
        ("bytes=100-1099", 100, 1099),
        ("bytes=0-0", 0, 0),
        (f"bytes={MiB - 10}-", MiB - 10, MiB - 1),
        ("bytes=-500", MiB - 500, MiB - 1),
    ]:
        async with http.get(url, headers={"Range": header}) as response:
            body = await response.read()
            assert response.status == 206, header
            assert body == data[start : end + 1], header
            assert response.headers["Content-Range"] == f"bytes {start}-{end}/{MiB}", header
            assert response.headers["Content-Length"] == str(end - start + 1), header
    assert len(passthrough.log.blob_gets(digest)) == 1, "ranges were served from the cache"


async def test_head_of_uncached_blob_never_downloads(
    registry: Registry,
    passthrough: PassThrough,
    proxy: ProxyUnderTest,
    http: aiohttp.ClientSession,
) -> None:
    data, digest = random_blob(MiB)
    await push_blob(http, registry.url, "head/blob", data)

    async with http.head(f"{proxy.url}/v2/head/blob/blobs/{digest}") as response:
        assert response.status == 200
        assert response.headers["Content-Length"] == str(MiB)
        assert response.headers["Docker-Content-Digest"] == digest
        assert await response.read() == b""

    assert len(passthrough.log.blob_requests(digest, "HEAD")) == 1, passthrough.log.summary()
    assert passthrough.log.blob_gets(digest) == []
    assert not proxy.blob_path(digest).exists()


async def test_unknown_blob_is_404_blob_unknown(
    passthrough: PassThrough, proxy: ProxyUnderTest, http: aiohttp.ClientSession
) -> None:
    digest = sha256_digest(b"never pushed")
    async with http.get(f"{proxy.url}/v2/some/repo/blobs/{digest}") as response:
        assert response.status == 404
        body = await response.json(content_type=None)
    assert body["errors"][0]["code"] in ("BLOB_UNKNOWN", "NAME_UNKNOWN")
    assert proxy.committed_blobs() == []
