"""The Docker daemon (Debian's dockerd 20.10) pulls through the proxy as its
``registry-mirrors``, configured with the README's ``daemon.json``.

dockerd mirrors Docker Hub names only and sends bare names (``/v2/team/app/...``, no
``ns``): the proxy's default upstream, a local docker-registry, plays Docker Hub. The
rig's dead HTTP proxy makes a failing mirror fail the pull instead of reaching Docker Hub.
"""

from __future__ import annotations

from pathlib import Path

import aiohttp
import pytest

from tests.rig.dockerd import DockerdFactory
from tests.rig.engine import EngineError
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
    readme_daemon_json,
)

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("kind", IMAGE_KINDS, ids=KIND_IDS)
async def test_docker_pulls_through_the_proxy_as_registry_mirror(
    kind: ImageKind,
    tmp_path: Path,
    registry: Registry,
    passthrough: PassThrough,
    proxy: ProxyUnderTest,
    skopeo: Skopeo,
    http: aiohttp.ClientSession,
    dockerd_factory: DockerdFactory,
) -> None:
    pushed = await push_kind(kind, tmp_path, registry, skopeo, http)
    dockerd = dockerd_factory(config=readme_daemon_json(proxy.host))
    passthrough.log.clear()

    image = await dockerd.pull(f"{pushed.repo}:{pushed.tag}")
    assert_pulled_as_served(image, pushed)
    layers = platform_layers(pushed)
    for layer in layers:
        assert len(passthrough.log.blob_gets(layer)) == 1, passthrough.log.summary()

    # Again from an empty local store: everything from the proxy's cache.
    await dockerd.remove_image(f"{pushed.repo}:{pushed.tag}")
    passthrough.log.clear()
    again = await dockerd.pull(f"{pushed.repo}:{pushed.tag}")
    assert_pulled_as_served(again, pushed)
    assert passthrough.log.blob_gets() == [], passthrough.log.summary()
    assert passthrough.log.manifest_requests() == [], passthrough.log.summary()


async def test_docker_pull_fails_when_the_mirror_is_down(
    dockerd_factory: DockerdFactory,
) -> None:
    """With the mirror unreachable dockerd falls back to Docker Hub, which the rig's dead
    proxy refuses: the pull fails, it never reaches a public registry."""
    dockerd = dockerd_factory(config=readme_daemon_json(f"127.0.0.1:{free_port()}"))
    with pytest.raises(EngineError) as failed:
        await dockerd.pull("team/app:v1")
    assert "proxyconnect" in str(failed.value), str(failed.value)
