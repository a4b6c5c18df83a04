"""A cache directory that fills up for real: a 64 MiB tmpfs (root only; see the ``tmpfs``
fixture). Pulls bigger than the disk succeed pass-through, a disk filled by someone else in
the middle of a blob breaks no response, and nothing corrupt is ever committed.

The adversarial run's defect: two pulls of 3 x 50 MiB layers on a 64 MiB tmpfs gave
clients that had ``200`` headers 388 bytes of a second response (``HTTP/1.1 500``) in the
middle of the blob body, then a closed connection.
"""

from __future__ import annotations

import asyncio
import hashlib
from pathlib import Path

import aiohttp
import pytest
from prometheus_client import REGISTRY

from tests.rig import oci
from tests.rig.distribution import push_blob, push_image, random_blob
from tests.rig.faults import FaultProxy
from tests.rig.process import async_wait_until
from tests.rig.proxy_app import ProxyFactory, ProxyUnderTest
from tests.rig.registry import Registry
from tests.rig.skopeo import Skopeo
from tests.rig.tmpfs import fill

pytestmark = pytest.mark.integration

MiB = 1 << 20


def passthrough_count(reason: str) -> float:
    value = REGISTRY.get_sample_value(
        "registry_proxy_passthrough_fetches_total", {"reason": reason}
    )
    return value or 0.0


def assert_nothing_corrupt(proxy: ProxyUnderTest) -> None:
    """Every committed file's content hashes to its name."""
    for path in proxy.committed_blobs():
        with path.open("rb") as f:
            actual = hashlib.file_digest(f, "sha256").hexdigest()
        assert actual == path.name, f"{path} holds other content"


async def get_blob(url: str, repo: str, digest: str) -> tuple[int, str, int]:
    """GET a blob in a session of its own: (status, sha256 of the body, length)."""
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"{url}/v2/{repo}/blobs/{digest}") as response,
    ):
        hasher = hashlib.sha256()
        size = 0
        async for chunk in response.content.iter_chunked(MiB):
            hasher.update(chunk)
            size += len(chunk)
        return response.status, "sha256:" + hasher.hexdigest(), size


async def test_pulls_bigger_than_the_disk_succeed_pass_through(
    tmpfs: Path,
    tmp_path: Path,
    registry: Registry,
    fault_proxy: FaultProxy,
    proxy_factory: ProxyFactory,
    skopeo: Skopeo,
) -> None:
    """The adversarial run's repro: two concurrent pulls of 3 x 50 MiB layers."""
    async with aiohttp.ClientSession() as http:
        image = await push_image(
            http,
            registry.url,
            tmp_path / "image",
            "big/image",
            "v1",
            layers=3,
            layer_size=50 * MiB,
        )
    proxy = await proxy_factory(fault_proxy.url, cache_dir=tmpfs / "cache")
    before = passthrough_count("low_space") + passthrough_count("write_error")

    pulls = [tmp_path / "pull-a", tmp_path / "pull-b"]
    await asyncio.gather(*(skopeo.pull(proxy.host, "big/image:v1", dest) for dest in pulls))

    for dest in pulls:
        assert oci.layout_layer_digests(dest, "pulled") == image.layer_digests
        for digest in image.layer_digests:
            blob = dest / "blobs" / "sha256" / digest.removeprefix("sha256:")
            with blob.open("rb") as f:
                assert "sha256:" + hashlib.file_digest(f, "sha256").hexdigest() == digest
    assert passthrough_count("low_space") + passthrough_count("write_error") > before
    assert_nothing_corrupt(proxy)
    assert proxy.temp_files() == []


async def test_a_disk_filled_in_the_middle_of_a_blob_breaks_no_response(
    tmpfs: Path,
    registry: Registry,
    fault_proxy: FaultProxy,
    proxy_factory: ProxyFactory,
) -> None:
    """Someone else fills the disk while a blob is being cached: the write fails with
    ENOSPC, the fetch goes on pass-through, every client gets the whole blob."""
    data, digest = random_blob(24 * MiB)
    async with aiohttp.ClientSession() as http:
        await push_blob(http, registry.url, "big/filled", data)
    proxy = await proxy_factory(
        fault_proxy.url, cache_dir=tmpfs / "cache", sections={"cache": {"min_free": 0}}
    )
    before = passthrough_count("write_error")
    pause = fault_proxy.pause_blob(8 * MiB)

    gets = [asyncio.create_task(get_blob(proxy.url, "big/filled", digest)) for _ in range(3)]
    await asyncio.wait_for(pause.reached.wait(), 30)
    await async_wait_until(
        lambda: sum(p.stat().st_size for p in proxy.temp_files()) >= 8 * MiB,
        within=30,
        what="the first 8 MiB in the temp file",
    )
    ballast = await asyncio.to_thread(fill, tmpfs)
    pause.resume()
    results = await asyncio.gather(*gets)

    assert results == [(200, digest, len(data))] * 3
    assert passthrough_count("write_error") == before + 1
    assert not proxy.blob_path(digest).exists()
    assert_nothing_corrupt(proxy)
    await async_wait_until(lambda: proxy.temp_files() == [], within=10, what="no temp file")

    # With room again, the next miss is cached as usual.
    ballast.unlink()
    assert await get_blob(proxy.url, "big/filled", digest) == (200, digest, len(data))
    await async_wait_until(proxy.blob_path(digest).is_file, within=30, what="the blob committed")
    assert_nothing_corrupt(proxy)


async def test_under_min_free_misses_pass_through_and_readyz_says_so(
    tmpfs: Path,
    registry: Registry,
    fault_proxy: FaultProxy,
    proxy_factory: ProxyFactory,
) -> None:
    data, digest = random_blob(4 * MiB)
    async with aiohttp.ClientSession() as http:
        await push_blob(http, registry.url, "small/low", data)
    proxy = await proxy_factory(
        fault_proxy.url, cache_dir=tmpfs / "cache", sections={"cache": {"min_free": "1GiB"}}
    )
    before = passthrough_count("low_space")
    async with aiohttp.ClientSession() as http, http.get(f"{proxy.url}/readyz") as response:
        assert response.status == 200, "low space is no reason to stop serving"
        cache = (await response.json())["cache"]
    assert cache["low_space"] is True
    assert cache["free_bytes"] < cache["min_free_bytes"]
    assert REGISTRY.get_sample_value("registry_proxy_disk_low_space") == 1

    assert await get_blob(proxy.url, "small/low", digest) == (200, digest, len(data))
    assert passthrough_count("low_space") == before + 1
    assert proxy.committed_blobs() == [] and proxy.temp_files() == []
