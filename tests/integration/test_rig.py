"""The rig checked against the real registry, without the proxy: if these fail, the other
integration tests' failures say nothing about the proxy."""

from __future__ import annotations

import hashlib
from pathlib import Path

import aiohttp
import pytest

from tests.rig import oci
from tests.rig.distribution import (
    blob_sha256,
    fetch_blob,
    get_manifest,
    manifest_digest,
    push_blob,
    random_blob,
    raw_request,
)
from tests.rig.recording import PassThrough
from tests.rig.registry import Registry
from tests.rig.skopeo import Skopeo, SkopeoError
from tests.rig.upstreams import LyingUpstream, wrong_bytes

pytestmark = pytest.mark.integration


async def test_oci_image_push_and_pull_through_passthrough(
    tmp_path: Path,
    registry: Registry,
    passthrough: PassThrough,
    skopeo: Skopeo,
    http: aiohttp.ClientSession,
) -> None:
    image = oci.make_image(tmp_path / "src", layers=3)
    await skopeo.push(image.oci_ref, registry.host, "rig/oci", "v1")

    fetched = await manifest_digest(http, registry.url, "rig/oci", "v1")
    assert fetched.header_digest == image.manifest.digest, "an OCI push keeps the manifest bytes"
    assert fetched.content_type == oci.OCI_MANIFEST

    dest = tmp_path / "dest"
    await skopeo.pull(passthrough.host, "rig/oci:v1", dest)
    assert oci.layout_layer_digests(dest, "pulled") == image.layer_digests
    assert set(image.layer_digests) <= oci.layout_blob_digests(dest)
    for layer in image.layers:
        gets = passthrough.log.blob_gets(layer.digest)
        assert [(g.status, g.bytes_sent) for g in gets] == [(200, layer.size)], (
            passthrough.log.summary()
        )
    assert passthrough.log.blob_bytes_served() == sum(b.size for b in (*image.layers, image.config))


async def test_registry_stop_and_start_keep_port_and_content(
    tmp_path: Path, registry: Registry, passthrough: PassThrough, http: aiohttp.ClientSession
) -> None:
    data, digest = random_blob(10_000)
    await push_blob(http, registry.url, "rig/blob", data)
    registry.stop()
    assert not registry.running
    with pytest.raises(aiohttp.ClientConnectionError):
        await fetch_blob(http, registry.url, "rig/blob", digest)
    # The pass-through drops the connection when its upstream is unreachable.
    with pytest.raises(aiohttp.ClientConnectionError):
        await fetch_blob(http, passthrough.url, "rig/blob", digest)
    assert passthrough.log.exchanges[-1].error is not None

    registry.start()
    assert await fetch_blob(http, passthrough.url, "rig/blob", digest) == (200, data)


async def test_passthrough_modes_and_head(
    registry: Registry, passthrough: PassThrough, http: aiohttp.ClientSession
) -> None:
    data, digest = random_blob(100_000)
    await push_blob(http, registry.url, "rig/modes", data)

    async with http.head(f"{passthrough.url}/v2/rig/modes/blobs/{digest}") as response:
        assert response.status == 200
        assert response.headers["Content-Length"] == str(len(data))
        assert response.headers["Docker-Content-Digest"] == digest
    assert passthrough.log.blob_requests(digest, "HEAD")[0].bytes_sent == 0

    passthrough.mode = "refuse"
    with pytest.raises(aiohttp.ClientConnectionError):
        await fetch_blob(http, passthrough.url, "rig/modes", digest)
    passthrough.mode = "error"
    assert (await fetch_blob(http, passthrough.url, "rig/modes", digest))[0] == 503
    passthrough.mode = "forward"
    assert await fetch_blob(http, passthrough.url, "rig/modes", digest) == (200, data)
    gets = passthrough.log.blob_gets(digest)
    # aiohttp's client retries a GET once when a reused keep-alive connection is dropped.
    assert {g.error for g in gets if g.status is None} == {"refused"}
    assert [g.status for g in gets if g.status is not None] == [503, 200]
    assert passthrough.log.blob_bytes_served(digest) == len(data)


async def test_passthrough_streams_large_blob_and_range(
    registry: Registry, passthrough: PassThrough, http: aiohttp.ClientSession
) -> None:
    data, digest = random_blob(32 * 1024 * 1024)
    await push_blob(http, registry.url, "rig/big", data)
    assert registry.blob_path(digest).stat().st_size == len(data)
    assert await blob_sha256(http, passthrough.url, "rig/big", digest) == (200, digest, len(data))
    async with http.get(
        f"{passthrough.url}/v2/rig/big/blobs/{digest}", headers={"Range": "bytes=10-19"}
    ) as response:
        assert response.status == 206
        assert await response.read() == data[10:20]
    assert passthrough.log.blob_bytes_served(digest) == len(data) + 10


@pytest.mark.parametrize("format", [None, "v2s2"])
async def test_index_push_all_keeps_a_list(
    tmp_path: Path,
    registry: Registry,
    skopeo: Skopeo,
    http: aiohttp.ClientSession,
    format: str | None,
) -> None:
    """skopeo 1.9.3 + distribution 2.8: ``--all`` keeps an OCI index, and ``--all --format
    v2s2`` turns it into a Docker manifest list (children converted to schema2)."""
    index = oci.make_index(tmp_path / "src")
    await skopeo.push(
        index.oci_ref, registry.host, "rig/list", "v1", format=format, all_images=True
    )
    fetched = await manifest_digest(http, registry.url, "rig/list", "v1")
    children = fetched.json()["manifests"]
    assert [c["platform"]["architecture"] for c in children] == ["amd64", "arm64"]
    if format is None:
        assert fetched.content_type == oci.OCI_INDEX
        assert fetched.header_digest == index.index.digest
    else:
        assert fetched.content_type == oci.DOCKER_MANIFEST_LIST
        assert {c["mediaType"] for c in children} == {oci.DOCKER_MANIFEST}
    for child, image in zip(children, index.images, strict=True):
        child_manifest = await manifest_digest(http, registry.url, "rig/list", child["digest"])
        layers = [layer["digest"] for layer in child_manifest.json()["layers"]]
        assert layers == image.layer_digests

    dest = tmp_path / "arm64"
    await skopeo.pull(registry.host, "rig/list:v1", dest, arch="arm64")
    assert oci.layout_layer_digests(dest, "pulled") == index.image_for("arm64").layer_digests
    dest_all = tmp_path / "all"
    await skopeo.pull(registry.host, "rig/list:v1", dest_all, all_images=True)
    assert oci.layout_layer_digests(dest_all, "pulled") == index.layer_digests


async def test_manifest_accept_and_missing(
    tmp_path: Path, registry: Registry, skopeo: Skopeo, http: aiohttp.ClientSession
) -> None:
    image = oci.make_image(tmp_path / "src")
    await skopeo.push(image.oci_ref, registry.host, "rig/accept", "v1", format="v2s2")
    head = await get_manifest(http, registry.url, "rig/accept", "v1", method="HEAD")
    assert head.status == 200 and head.body == b""
    assert head.content_type == oci.DOCKER_MANIFEST
    missing = await get_manifest(http, registry.url, "rig/accept", "nope")
    assert missing.status == 404


async def test_skopeo_failure_carries_stderr(
    tmp_path: Path, registry: Registry, skopeo: Skopeo
) -> None:
    with pytest.raises(SkopeoError) as info:
        await skopeo.pull(registry.host, "rig/missing:v1", tmp_path / "dest")
    assert info.value.returncode not in (0, None)
    assert "manifest unknown" in info.value.stderr.lower()


async def test_lying_upstream_serves_wrong_bytes(
    lying_upstream: LyingUpstream, http: aiohttp.ClientSession
) -> None:
    digest = "sha256:" + hashlib.sha256(b"the truth").hexdigest()
    status, body = await fetch_blob(http, lying_upstream.url, "any/repo", digest)
    assert status == 200
    assert len(body) == lying_upstream.size
    assert body == wrong_bytes(digest, lying_upstream.size)
    assert oci.sha256_digest(body) != digest
    assert len(lying_upstream.log.blob_gets(digest)) == 1


async def test_raw_request_keeps_the_target(registry: Registry, passthrough: PassThrough) -> None:
    response = await raw_request(passthrough.host, "GET", "/v2/")
    assert response.status == 200
    assert response.json() == {}
    target = "/v2/a/%2e%2e/b/manifests/x%2Fy"
    response = await raw_request(passthrough.host, "GET", target)
    # Go's ServeMux cleans the path and redirects; the pass-through must not follow it.
    assert response.status == 301
    assert response.headers["location"] == "/v2/b/manifests/x/y"
    assert passthrough.log.exchanges[-1].target == target, "forwarded byte for byte"
