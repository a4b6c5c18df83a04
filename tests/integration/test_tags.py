"""Tags: served locally within the TTL, revalidated with HEAD after it, and a re-pushed tag
is picked up."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path

import aiohttp
import pytest

from tests.rig import oci
from tests.rig.distribution import manifest_digest
from tests.rig.proxy_app import ProxyUnderTest
from tests.rig.recording import PassThrough
from tests.rig.registry import Registry
from tests.rig.skopeo import Skopeo

pytestmark = pytest.mark.integration

ProxyFactory = Callable[..., Awaitable[ProxyUnderTest]]


async def push_image(
    tmp_path: Path, name: str, registry: Registry, skopeo: Skopeo, repo: str, tag: str
) -> oci.OciImage:
    image = oci.make_image(tmp_path / name, layers=1)
    await skopeo.push(image.oci_ref, registry.host, repo, tag)
    return image


async def test_tag_within_ttl_makes_no_upstream_request(
    tmp_path: Path,
    registry: Registry,
    passthrough: PassThrough,
    skopeo: Skopeo,
    proxy_factory: ProxyFactory,
    http: aiohttp.ClientSession,
) -> None:
    image = await push_image(tmp_path, "img", registry, skopeo, "ttl/long", "v1")
    proxy = await proxy_factory(passthrough.url, tag_ttl="1h")

    first = await manifest_digest(http, proxy.url, "ttl/long", "v1")
    assert first.header_digest == image.manifest.digest
    assert passthrough.log.manifest_requests(), "the first GET went upstream"
    passthrough.log.clear()

    second = await manifest_digest(http, proxy.url, "ttl/long", "v1")
    assert second.body == first.body
    assert passthrough.log.exchanges == [], passthrough.log.summary()


async def test_expired_tag_is_revalidated_with_head_only(
    tmp_path: Path,
    registry: Registry,
    passthrough: PassThrough,
    skopeo: Skopeo,
    proxy_factory: ProxyFactory,
    http: aiohttp.ClientSession,
) -> None:
    image = await push_image(tmp_path, "img", registry, skopeo, "ttl/zero", "v1")
    proxy = await proxy_factory(passthrough.url, tag_ttl="0")

    first = await manifest_digest(http, proxy.url, "ttl/zero", "v1")
    assert first.header_digest == image.manifest.digest
    passthrough.log.clear()

    second = await manifest_digest(http, proxy.url, "ttl/zero", "v1")
    assert second.body == first.body
    heads = passthrough.log.manifest_requests("HEAD")
    gets = passthrough.log.manifest_requests("GET")
    assert [h.path for h in heads] == ["/v2/ttl/zero/manifests/v1"], passthrough.log.summary()
    assert gets == [], passthrough.log.summary()


async def test_repushed_tag_serves_new_digest_after_ttl(
    tmp_path: Path,
    registry: Registry,
    passthrough: PassThrough,
    skopeo: Skopeo,
    proxy_factory: ProxyFactory,
    http: aiohttp.ClientSession,
) -> None:
    old = await push_image(tmp_path, "old", registry, skopeo, "ttl/moving", "v1")
    proxy = await proxy_factory(passthrough.url, tag_ttl="0")
    first = await manifest_digest(http, proxy.url, "ttl/moving", "v1")
    assert first.header_digest == old.manifest.digest

    new = await push_image(tmp_path, "new", registry, skopeo, "ttl/moving", "v1")
    assert new.manifest.digest != old.manifest.digest
    passthrough.log.clear()

    second = await manifest_digest(http, proxy.url, "ttl/moving", "v1")
    assert second.header_digest == new.manifest.digest
    assert second.body == new.manifest_bytes
    # The old manifest stays reachable by digest (immutable content).
    by_digest = await manifest_digest(http, proxy.url, "ttl/moving", old.manifest.digest)
    assert by_digest.body == old.manifest_bytes
    # HEAD by tag agrees with GET.
    async with http.head(
        f"{proxy.url}/v2/ttl/moving/manifests/v1", headers={"Accept": oci.ACCEPT_ALL_MANIFESTS}
    ) as response:
        assert response.status == 200
        assert response.headers["Docker-Content-Digest"] == new.manifest.digest
