"""containerd (``ctr``) pulls through the proxy as a registry mirror, routed by ``?ns=``.

containerd sends every request to the mirror as ``/v2/<repo>/...?ns=<registry name>``.
Two of the three upstreams (the private ones) are configured as mirrored registries by
their ``host:port``; a counting pass-through between ctr and the proxy (``front``) records
exactly what ctr sent and what the proxy answered.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import parse_qs

import aiohttp
import pytest

from tests.rig import oci
from tests.rig.containerd import Containerd, write_hosts_dir
from tests.rig.proxy_app import ProxyUnderTest
from tests.rig.recording import Exchange, PassThrough
from tests.rig.registry import Registry
from tests.rig.skopeo import Skopeo
from tests.rig.world import ANON_ALIAS, World

from .clients import (
    IMAGE_KINDS,
    KIND_IDS,
    MACHINE_ARCH,
    ImageKind,
    platform_layers,
    platform_manifest,
    push_kind,
)

pytestmark = pytest.mark.integration


@pytest.fixture
async def front(world: World) -> AsyncIterator[PassThrough]:
    """A counting pass-through between ctr and the proxy."""
    async with PassThrough(world.proxy.url) as server:
        yield server


def registry_requests(front: PassThrough) -> list[Exchange]:
    return [e for e in front.log.exchanges if e.path.startswith("/v2/") and e.path != "/v2/"]


def ns_of(exchange: Exchange) -> list[str]:
    return parse_qs(exchange.query).get("ns", [])


async def test_ctr_fetches_from_two_upstreams_through_the_proxy_by_ns(
    world: World,
    containerd: Containerd,
    front: PassThrough,
    skopeo: Skopeo,
    tmp_path: Path,
) -> None:
    private = (world.basic, world.tok)
    images: dict[str, oci.OciImage] = {}
    for up in private:
        images[up.name] = oci.make_image(tmp_path / f"src-{up.name}", layers=3)
        await up.push(skopeo, images[up.name], "ctr/app", "v1")
    world.clear_logs()
    hosts = write_hosts_dir(tmp_path / "certs.d", {up.host: front.url for up in private})

    answers: list[Exchange] = []
    for up in private:
        image = images[up.name]
        blobs = {image.config.digest, *image.layer_digests}
        front.log.clear()
        result = await containerd.fetch(hosts, f"{up.host}/ctr/app:v1")
        assert result.returncode == 0, (result.stderr, front.log.summary())

        requests = registry_requests(front)
        answers += requests
        # What containerd sends a mirror: everything with ?ns=<registry name>, the tag
        # resolved with HEAD, the manifest fetched by digest, then the blobs.
        assert {tuple(ns_of(e)) for e in requests} == {(up.host,)}, front.log.summary()
        assert [(e.method, e.path) for e in requests[:2]] == [
            ("HEAD", "/v2/ctr/app/manifests/v1"),
            ("GET", f"/v2/ctr/app/manifests/{image.manifest.digest}"),
        ]
        assert {e.path.rpartition("/")[2] for e in requests[2:]} == blobs
        assert all(e.method == "GET" and e.is_blob for e in requests[2:])
        assert all(e.status == 200 for e in requests), front.log.summary()

        # The proxy fetched them from this upstream, with its credentials ...
        for digest in blobs:
            assert up.passthrough.log.blob_gets(digest), up.passthrough.log.summary()
        # ... and from no other.
        for other in world.upstreams:
            if other is not up:
                assert not any(other.passthrough.log.blob_gets(d) for d in blobs)

    stored = await containerd.content_digests()
    for image in images.values():
        assert {image.manifest.digest, image.config.digest, *image.layer_digests} <= stored
    assert len(world.token_server.for_scope("repository:ctr/app:pull")) == 1
    assert not world.anon.passthrough.log.exchanges

    # Every answer to an ns request says which namespace it was served for.
    missing = [
        f"{e.method} {e.path} X-Cache={e.response_headers.get('X-Cache')}"
        for e in answers
        if e.response_headers.get("OCI-Namespace") != ns_of(e)[0]
    ]
    assert missing == []


async def test_ctr_fetches_by_alias_name(
    world: World, containerd: Containerd, front: PassThrough, skopeo: Skopeo, tmp_path: Path
) -> None:
    """A registry name that is only an alias (as docker.io is for Docker Hub) routes too."""
    image = oci.make_image(tmp_path / "src")
    await world.anon.push(skopeo, image, "library/app", "v1")
    world.clear_logs()
    hosts = write_hosts_dir(tmp_path / "certs.d", {ANON_ALIAS: front.url})

    result = await containerd.fetch(hosts, f"{ANON_ALIAS}/library/app:v1")
    assert result.returncode == 0, (result.stderr, front.log.summary())
    assert {tuple(ns_of(e)) for e in registry_requests(front)} == {(ANON_ALIAS,)}
    assert {image.manifest.digest, *image.layer_digests} <= await containerd.content_digests()
    for digest in image.layer_digests:
        assert world.anon.passthrough.log.blob_gets(digest)


async def test_ctr_pull_of_an_unconfigured_registry_fails_at_the_proxy(
    world: World, containerd: Containerd, front: PassThrough, skopeo: Skopeo, tmp_path: Path
) -> None:
    """A registry the proxy does not serve is refused (404 NAME_UNKNOWN), never answered
    from another upstream, even one holding the same repository and tag."""
    image = oci.make_image(tmp_path / "src")
    await world.anon.push(skopeo, image, "ctr/app", "v1")
    world.clear_logs()
    unknown = "unknown.registry.test:5000"
    hosts = write_hosts_dir(tmp_path / "certs.d", {unknown: front.url})

    result = await containerd.fetch(hosts, f"{unknown}/ctr/app:v1")
    assert result.returncode != 0
    # The proxy answered 404, so ctr tried the next host: the unreachable server.
    assert "response was http.StatusNotFound" in result.stderr, result.stderr
    assert "connection refused" in result.stderr, result.stderr
    requests = registry_requests(front)
    assert requests, "ctr never reached the proxy"
    assert all(ns_of(e) == [unknown] and e.status == 404 for e in requests), front.log.summary()
    for up in world.upstreams:
        assert not up.passthrough.log.exchanges, up.passthrough.log.summary()
    assert image.manifest.digest not in await containerd.content_digests()


async def test_ctr_with_override_path_to_an_upstream_prefix(
    world: World, containerd: Containerd, front: PassThrough, skopeo: Skopeo, tmp_path: Path
) -> None:
    """hosts.toml pointing at ``http://proxy/v2/<upstream-name>`` with ``override_path``
    (the variant in deploy/containerd/): containerd then asks for
    ``/v2/<upstream-name>/<repo>/...?ns=<registry name>``. The prefix and the ns agree on
    the upstream, so the repository is ``<repo>``, not ``<upstream-name>/<repo>``."""
    image = oci.make_image(tmp_path / "src")
    await world.tok.push(skopeo, image, "ctr/app", "v1")
    world.clear_logs()
    hosts = write_hosts_dir(
        tmp_path / "certs.d", {world.tok.host: f"{front.url}/v2/tok"}, override_path=True
    )

    result = await containerd.fetch(hosts, f"{world.tok.host}/ctr/app:v1")
    requests = registry_requests(front)
    assert requests and requests[0].path == "/v2/tok/ctr/app/manifests/v1"
    assert {tuple(ns_of(e)) for e in requests} == {(world.tok.host,)}
    assert result.returncode == 0, (result.stderr, front.log.summary())
    assert {image.manifest.digest, *image.layer_digests} <= await containerd.content_digests()


@pytest.mark.parametrize("kind", IMAGE_KINDS, ids=KIND_IDS)
async def test_ctr_fetches_every_image_kind_through_the_proxy(
    kind: ImageKind,
    tmp_path: Path,
    registry: Registry,
    passthrough: PassThrough,
    proxy: ProxyUnderTest,
    containerd: Containerd,
    skopeo: Skopeo,
    http: aiohttp.ClientSession,
) -> None:
    """The client matrix's four kinds (OCI image, Docker v2s2 image, OCI index, Docker
    manifest list), the machine's platform, with ``ns`` naming the upstream's host: the
    content store holds exactly the upstream's digests."""
    pushed = await push_kind(kind, tmp_path, registry, skopeo, http)
    hosts = write_hosts_dir(tmp_path / "certs.d", {passthrough.host: proxy.url})
    passthrough.log.clear()

    result = await containerd.fetch(hosts, f"{passthrough.host}/{pushed.repo}:{pushed.tag}")
    assert result.returncode == 0, (result.stderr, passthrough.log.summary())
    manifest = platform_manifest(pushed)
    config = manifest["config"]
    assert isinstance(config, dict)
    expected = {pushed.top.header_digest, config["digest"], *platform_layers(pushed)}
    if pushed.children:
        expected.add(pushed.children[MACHINE_ARCH].header_digest)
    assert expected <= await containerd.content_digests()
    for layer in platform_layers(pushed):
        assert len(passthrough.log.blob_gets(layer)) == 1, passthrough.log.summary()
