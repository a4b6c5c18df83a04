"""podman (Debian's, 4.3) pulls through the proxy as a ``registries.conf`` mirror of
docker.io, configured with the README's file (``insecure = true``: plain HTTP).

podman sends no ``ns``: the mirror gets bare names, answered by the proxy's default
upstream (a local docker-registry playing Docker Hub). When the mirror fails podman
tries docker.io itself, which the rig's dead HTTP proxy refuses.
"""

from __future__ import annotations

from pathlib import Path

import aiohttp
import pytest

from tests.rig.engine import EngineError
from tests.rig.podman import Podman
from tests.rig.process import free_port
from tests.rig.proxy_app import ProxyUnderTest
from tests.rig.recording import PassThrough
from tests.rig.registry import Registry
from tests.rig.skopeo import Skopeo

from .clients import (
    IMAGE_KINDS,
    KIND_IDS,
    ImageKind,
    assert_pulled_as_served,
    platform_layers,
    push_kind,
    readme_registries_conf,
)

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("kind", IMAGE_KINDS, ids=KIND_IDS)
async def test_podman_pulls_through_the_proxy_as_registry_mirror(
    kind: ImageKind,
    tmp_path: Path,
    registry: Registry,
    passthrough: PassThrough,
    proxy: ProxyUnderTest,
    skopeo: Skopeo,
    http: aiohttp.ClientSession,
    podman: Podman,
) -> None:
    pushed = await push_kind(kind, tmp_path, registry, skopeo, http)
    conf = podman.write_registries_conf(readme_registries_conf(proxy.host))
    reference = f"docker.io/{pushed.repo}:{pushed.tag}"
    passthrough.log.clear()

    image = await podman.pull(reference, registries_conf=conf)
    assert_pulled_as_served(image, pushed)
    for layer in platform_layers(pushed):
        assert len(passthrough.log.blob_gets(layer)) == 1, passthrough.log.summary()

    await podman.remove_image(reference)
    passthrough.log.clear()
    again = await podman.pull(reference, registries_conf=conf)
    assert_pulled_as_served(again, pushed)
    assert passthrough.log.blob_gets() == [], passthrough.log.summary()
    assert passthrough.log.manifest_requests() == [], passthrough.log.summary()


async def test_podman_short_name_resolves_to_docker_hub_through_the_mirror(
    tmp_path: Path,
    registry: Registry,
    proxy: ProxyUnderTest,
    skopeo: Skopeo,
    http: aiohttp.ClientSession,
    podman: Podman,
) -> None:
    """The README's file searches docker.io for short names: ``podman pull team/app:v1``
    is ``docker.io/team/app:v1``, through the mirror."""
    pushed = await push_kind(IMAGE_KINDS[0], tmp_path, registry, skopeo, http)
    conf = podman.write_registries_conf(readme_registries_conf(proxy.host))
    image = await podman.pull(f"{pushed.repo}:{pushed.tag}", registries_conf=conf)
    assert_pulled_as_served(image, pushed)


async def test_podman_pull_fails_when_the_mirror_is_down(podman: Podman) -> None:
    conf = podman.write_registries_conf(readme_registries_conf(f"127.0.0.1:{free_port()}"))
    with pytest.raises(EngineError) as failed:
        await podman.pull("docker.io/team/app:v1", registries_conf=conf)
    assert "proxyconnect" in str(failed.value), str(failed.value)
