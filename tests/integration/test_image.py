"""The container image: built from ``deploy/Dockerfile`` with Debian's dockerd (classic
builder) on the mmdebstrap-made base, run, health-checked and pulled through.

Nothing reaches Docker Hub: the base is imported from the session's mmdebstrap tarball
and passed as ``BASE_IMAGE``; the build's only network use is pip fetching the
dependencies from PyPI; dockerd's dead HTTP proxy fails any other registry access.

The image is built once for this module. The container runs with ``--network host``
(dockerd has no bridge), a read-only root file system, the cache on a named volume, as
the image's non-root user; its upstream is a counting pass-through in front of a local
docker-registry, and the same dockerd pulls through it as its ``registry-mirrors``.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest

from tests.rig import oci
from tests.rig.base_image import BaseRootfs
from tests.rig.dockerd import DOCKER_BINARY, DOCKERD_BINARY, Dockerd
from tests.rig.process import async_wait_until, free_port
from tests.rig.recording import PassThrough
from tests.rig.registry import Registry
from tests.rig.skopeo import Skopeo

from .binaries import binary_or_skip
from .clients import (
    IMAGE_KINDS,
    ROOT,
    assert_pulled_as_served,
    push_kind,
    readme_daemon_json,
)
from .report import IMAGE_REPORT, ImageReport
from .test_pull import Pushed

pytestmark = pytest.mark.integration

BASE_TAG = "registry-proxy-base:ci"
IMAGE_TAG = "registry-proxy:ci"
CACHE_DIR = "/var/cache/registry-proxy"
IMAGE_USER = "10001:10001"
# The image's size as dockerd reports it (uncompressed); the base is ~170 MB of it.
MAX_IMAGE_BYTES = 260 * 1000 * 1000
HEALTHY_WITHIN = 60.0


@dataclass(frozen=True)
class BuiltImage:
    dockerd: Dockerd
    tag: str
    port: int  # where the container's proxy listens, and dockerd's mirror
    build_seconds: float
    size: int

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"


@pytest.fixture(scope="module")
def built_image(
    base_rootfs: BaseRootfs,
    tmp_path_factory: pytest.TempPathFactory,
    request: pytest.FixtureRequest,
) -> Iterator[BuiltImage]:
    port = free_port()
    dockerd = Dockerd(
        binary_or_skip(DOCKERD_BINARY),
        binary_or_skip(DOCKER_BINARY),
        tmp_path_factory.mktemp("image") / "dockerd.log",
        config=readme_daemon_json(f"127.0.0.1:{port}"),
    )
    try:
        dockerd.start()
        asyncio.run(dockerd.import_rootfs(base_rootfs.tarball, BASE_TAG))
        started = time.monotonic()
        asyncio.run(
            dockerd.build(
                ROOT,
                dockerfile=ROOT / "deploy" / "Dockerfile",
                tag=IMAGE_TAG,
                build_args={"BASE_IMAGE": BASE_TAG},
            )
        )
        build_seconds = time.monotonic() - started
        image = asyncio.run(dockerd.inspect_image(IMAGE_TAG))
        request.config.stash[IMAGE_REPORT] = ImageReport(
            size=image.size, build_seconds=build_seconds, base_seconds=base_rootfs.seconds
        )
        yield BuiltImage(dockerd, IMAGE_TAG, port, build_seconds, image.size)
    finally:
        dockerd.stop()


async def test_image_is_lean_non_root_and_has_no_build_tools(built_image: BuiltImage) -> None:
    dockerd = built_image.dockerd
    image = await dockerd.inspect_image(built_image.tag)
    config = image.raw["Config"]
    assert config["User"] == IMAGE_USER
    assert list(config["Volumes"]) == [CACHE_DIR]
    assert config["Healthcheck"]["Test"][0] == "CMD"
    assert config["Cmd"][:2] == ["registry-proxy", "serve"]
    assert built_image.size < MAX_IMAGE_BYTES, built_image.size

    async def in_image(*argv: str) -> tuple[int | None, str]:
        result = await dockerd.docker(
            "run", "--rm", "--network", "none", "--entrypoint", argv[0], built_image.tag, *argv[1:]
        )
        return result.returncode, result.stdout + result.stderr

    code, out = await in_image("registry-proxy", "--version")
    assert code == 0 and out.startswith("registry-proxy "), out
    # No pip, no setuptools, no compiler, no pip cache in what runs.
    code, out = await in_image(
        "python3",
        "-c",
        "import importlib.util, shutil, sys, os; "
        "print([m for m in ('pip', 'setuptools') if importlib.util.find_spec(m)], "
        "[c for c in ('gcc', 'cc', 'make') if shutil.which(c)], "
        "os.path.exists(os.path.expanduser('~/.cache/pip')), os.getuid())",
    )
    assert code == 0, out
    assert out.strip() == "[] [] False 10001", out


async def container_state(dockerd: Dockerd, name: str) -> dict[str, object]:
    raw = await dockerd.run_checked("container", "inspect", name)
    (container,) = json.loads(raw)
    state: dict[str, object] = container["State"]
    return state


async def wait_healthy(dockerd: Dockerd, name: str) -> None:
    """Poll the container's HEALTHCHECK status until ``healthy``; fail at once if the
    container exits."""

    async def healthy() -> bool:
        state = await container_state(dockerd, name)
        if not state["Running"]:
            logs = await dockerd.docker("logs", name)
            raise AssertionError(f"container {name} exited: {state}\n{logs.stdout}{logs.stderr}")
        health = state.get("Health")
        return isinstance(health, dict) and health["Status"] == "healthy"

    await async_wait_until(healthy, within=HEALTHY_WITHIN, what=f"{name} healthy", interval=0.5)


@pytest.fixture
async def upstream(registry: Registry) -> AsyncIterator[PassThrough]:
    async with PassThrough(registry.url) as server:
        yield server


async def test_image_runs_read_only_serves_every_kind_and_keeps_its_cache(
    built_image: BuiltImage,
    tmp_path: Path,
    registry: Registry,
    upstream: PassThrough,
    skopeo: Skopeo,
    http: aiohttp.ClientSession,
) -> None:
    dockerd = built_image.dockerd
    pushed: dict[str, Pushed] = {}
    for kind in IMAGE_KINDS:
        repo = f"team/{kind.name}"
        pushed[kind.name] = await push_kind(
            kind, tmp_path / kind.name, registry, skopeo, http, repo
        )

    name = f"rp-{uuid.uuid4().hex[:8]}"
    volume = f"{name}-cache"
    await dockerd.run_checked("volume", "create", volume)
    await dockerd.run_checked(
        "run",
        "--detach",
        "--name",
        name,
        "--network",
        "host",
        "--read-only",
        "--volume",
        f"{volume}:{CACHE_DIR}",
        "--env",
        f"REGISTRY_PROXY_LISTEN=127.0.0.1:{built_image.port}",
        "--env",
        f"REGISTRY_PROXY_UPSTREAM={upstream.url}",
        # The image's own probe, asked every second instead of every 30 s.
        "--health-interval",
        "1s",
        built_image.tag,
    )
    try:
        await wait_healthy(dockerd, name)
        host = built_image.host
        assert (await container_state(dockerd, name))["Running"]

        # skopeo: every kind, all platforms, digests as the upstream serves them.
        for kind_name, image in pushed.items():
            raw = await skopeo.inspect_raw(host, f"{image.repo}:{image.tag}")
            assert oci.sha256_digest(raw.encode()) == image.top.header_digest, kind_name
            dest = tmp_path / f"skopeo-{kind_name}"
            await skopeo.pull(host, f"{image.repo}:{image.tag}", dest, all_images=True)
            assert sorted(oci.layout_layer_digests(dest, "pulled")) == sorted(image.layers())
        # The same dockerd, through its registry-mirrors (Docker Hub names).
        for image in pushed.values():
            pulled = await dockerd.pull(f"{image.repo}:{image.tag}")
            assert_pulled_as_served(pulled, image)
        for image in pushed.values():
            for layer in image.layers():
                assert len(upstream.log.blob_gets(layer)) == 1, upstream.log.summary()

        # A restarted container serves everything from the volume: no upstream request.
        before = (await container_state(dockerd, name))["StartedAt"]
        await dockerd.run_checked("restart", name)
        assert (await container_state(dockerd, name))["StartedAt"] != before
        await wait_healthy(dockerd, name)
        upstream.log.clear()
        for kind_name, image in pushed.items():
            dest = tmp_path / f"warm-{kind_name}"
            await skopeo.pull(host, f"{image.repo}:{image.tag}", dest, all_images=True)
            assert sorted(oci.layout_layer_digests(dest, "pulled")) == sorted(image.layers())
            await dockerd.remove_image(f"{image.repo}:{image.tag}")
            assert_pulled_as_served(await dockerd.pull(f"{image.repo}:{image.tag}"), image)
        assert upstream.log.exchanges == [], upstream.log.summary()
    finally:
        logs = await dockerd.docker("logs", name)
        print(f"--- container {name} log ---\n{logs.stdout[-3000:]}{logs.stderr[-3000:]}")
        await dockerd.docker("rm", "--force", "--volumes", name)
        await dockerd.docker("volume", "rm", "--force", volume)
