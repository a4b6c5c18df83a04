"""Fixtures for the integration tests: real servers on loopback, started per test, from
the rig in ``tests/rig``. Test modules ask for these by name and never import them.

- ``registry``: docker-registry upstream (``.url``, ``.host``, ``.stop()``, ``.start()``).
- ``passthrough``: counting HTTP proxy in front of ``registry`` (``.url``, ``.log``).
- ``fault_proxy``: a :class:`FaultProxy` in front of ``registry`` (no faults set).
- ``lying_upstream``: a fake upstream that serves wrong blob bytes.
- ``redis_server``: redis-server (``.url``, ``.kill()``, ``.pause()``...).
- ``containerd``: a private containerd with ``ctr``.
- ``dockerd_factory``: ``dockerd_factory(registry_mirrors=[...], insecure_registries=[...],
  config={...})`` -> a started private :class:`Dockerd` (stopped at teardown).
- ``podman``: :class:`Podman` with a private storage root (removed at teardown).
- ``base_rootfs`` (session): the mmdebstrap-made base root file system
  (:class:`BaseRootfs`: ``.tarball``), made once per run; ``REGISTRY_PROXY_TEST_BASE_ROOTFS``
  names an existing tarball to use instead (local iterations only).
- ``world``: three upstreams (anonymous, Basic, token) behind one proxy.
- ``skopeo``: :class:`Skopeo` with a private scratch dir.
- ``http``: an aiohttp ClientSession for direct requests.
- ``proxy_factory``: ``await proxy_factory(upstream_url, tag_ttl="5m")`` -> ProxyUnderTest.
- ``redis_proxy_factory``: ``await redis_proxy_factory(upstream_url, redis_url, ...)``.
- ``proxy``: the proxy under test pointed at ``passthrough`` with the default tag TTL.
- ``tmpfs``: a 64 MiB tmpfs mounted for the test (root only: skipped elsewhere, failed
  when CI=true).

A missing binary skips the test, or fails it when CI=true.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.rig.base_image import MMDEBSTRAP_BINARY, BaseRootfs, make_base_rootfs
from tests.rig.containerd import CONTAINERD_BINARY, CTR_BINARY, Containerd
from tests.rig.dockerd import DOCKER_BINARY, DOCKERD_BINARY, Dockerd, DockerdFactory
from tests.rig.faults import FaultProxy
from tests.rig.podman import PODMAN_BINARY, Podman
from tests.rig.proxy_app import (
    ProxyFactory,
    ProxyUnderTest,
    StartedProxies,
    start_proxy,
    start_redis_proxy,
)
from tests.rig.recording import PassThrough
from tests.rig.redis_server import REDIS_BINARY, RedisServer
from tests.rig.registry import REGISTRY_BINARY, Registry
from tests.rig.skopeo import SKOPEO_BINARY, Skopeo
from tests.rig.tmpfs import mounted_tmpfs, tmpfs_unavailable
from tests.rig.upstreams import LyingUpstream
from tests.rig.world import World, running_world

from .binaries import binary_or_skip
from .report import IMAGE_REPORT


def pytest_terminal_summary(terminalreporter: Any, config: pytest.Config) -> None:
    report = config.stash.get(IMAGE_REPORT, None)
    if report is not None:
        terminalreporter.write_line(
            f"container image: {report.size / 1e6:.1f} MB, docker build"
            f" {report.build_seconds:.1f} s (mmdebstrap base {report.base_seconds:.1f} s)"
        )


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Everything under tests/integration is an integration test."""
    here = Path(__file__).parent
    for item in items:
        if Path(str(item.fspath)).is_relative_to(here):
            item.add_marker(pytest.mark.integration)


@pytest.fixture
def registry(tmp_path: Path) -> Iterator[Registry]:
    with Registry(tmp_path / "registry", binary=binary_or_skip(REGISTRY_BINARY)) as server:
        yield server


@pytest.fixture
async def passthrough(registry: Registry) -> AsyncIterator[PassThrough]:
    async with PassThrough(registry.url) as server:
        yield server


@pytest.fixture
async def fault_proxy(registry: Registry) -> AsyncIterator[FaultProxy]:
    """A :class:`FaultProxy` in front of the ``registry`` fixture (forwarding, no faults)."""
    async with FaultProxy(registry.url) as server:
        yield server


@pytest.fixture
async def lying_upstream() -> AsyncIterator[LyingUpstream]:
    async with LyingUpstream() as server:
        yield server


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    with RedisServer(tmp_path / "redis", binary=binary_or_skip(REDIS_BINARY)) as server:
        yield server


@pytest.fixture
def containerd(tmp_path: Path) -> Iterator[Containerd]:
    binaries = binary_or_skip(CONTAINERD_BINARY), binary_or_skip(CTR_BINARY)
    with Containerd(*binaries, tmp_path / "containerd.log") as daemon:
        yield daemon


@pytest.fixture
def dockerd_factory(tmp_path: Path) -> Iterator[DockerdFactory]:
    """``dockerd_factory(registry_mirrors=..., insecure_registries=..., config=...)``: a
    started private dockerd (see :mod:`tests.rig.dockerd`); all stopped at teardown, by
    PID, the last started first."""
    binaries = binary_or_skip(DOCKERD_BINARY), binary_or_skip(DOCKER_BINARY)
    started: list[Dockerd] = []

    def factory(
        *,
        registry_mirrors: Sequence[str] = (),
        insecure_registries: Sequence[str] = (),
        config: dict[str, Any] | None = None,
    ) -> Dockerd:
        daemon = Dockerd(
            *binaries,
            tmp_path / f"dockerd{len(started) or ''}.log",
            registry_mirrors=registry_mirrors,
            insecure_registries=insecure_registries,
            config=config,
        )
        started.append(daemon)
        daemon.start()
        return daemon

    try:
        yield factory
    finally:
        for daemon in reversed(started):
            daemon.stop()


@pytest.fixture
def podman(tmp_path: Path) -> Iterator[Podman]:
    client = Podman(tmp_path / "podman", binary=binary_or_skip(PODMAN_BINARY))
    try:
        yield client
    finally:
        client.cleanup()


@pytest.fixture(scope="session")
def base_rootfs(tmp_path_factory: pytest.TempPathFactory) -> BaseRootfs:
    """Debian bookworm + python3 from mmdebstrap, once per test run."""
    given = os.environ.get("REGISTRY_PROXY_TEST_BASE_ROOTFS")
    if given:
        return BaseRootfs(tarball=Path(given), seconds=0.0)
    binary_or_skip(MMDEBSTRAP_BINARY)
    return make_base_rootfs(tmp_path_factory.mktemp("base") / "base.tar")


@pytest.fixture
async def world(tmp_path: Path) -> AsyncIterator[World]:
    binary = binary_or_skip(REGISTRY_BINARY)
    async with running_world(tmp_path / "world", binary) as started:
        yield started


@pytest.fixture
def skopeo(tmp_path: Path) -> Skopeo:
    return Skopeo(tmp_path / "skopeo", binary=binary_or_skip(SKOPEO_BINARY))


TMPFS_MIB = 64


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A ``TMPFS_MIB`` MiB tmpfs, mounted for the test and unmounted after it. Ask for
    it before the proxy fixtures, so the proxies are stopped before it is unmounted."""
    reason = tmpfs_unavailable()
    if reason is not None:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"{reason} (CI=true: the tmpfs tests must run)")
        pytest.skip(reason)
    with mounted_tmpfs(tmp_path / "tmpfs", TMPFS_MIB) as path:
        yield path


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(
        timeout=aiohttp.ClientTimeout(total=120, sock_connect=5)
    ) as session:
        yield session


@pytest.fixture
async def proxy_factory(tmp_path: Path) -> AsyncIterator[ProxyFactory]:
    """``await proxy_factory(upstream_url, tag_ttl=..., cache_dir=..., sections=...,
    **upstream)`` (``sections``: top-level keys, e.g. ``{"server": {...}}``): each
    call is a new instance (its own cache directory unless given); all are stopped at
    teardown."""
    started = StartedProxies()

    async def factory(
        upstream_url: str,
        *,
        tag_ttl: str = "5m",
        cache_dir: Path | None = None,
        sections: dict[str, dict[str, Any]] | None = None,
        **upstream: Any,
    ) -> ProxyUnderTest:
        cache = cache_dir or tmp_path / f"cache{len(started) or ''}"
        return await started.add(
            start_proxy(upstream_url, cache, tag_ttl=tag_ttl, sections=sections, **upstream)
        )

    try:
        yield factory
    finally:
        await started.stop()


@pytest.fixture
async def redis_proxy_factory(tmp_path: Path) -> AsyncIterator[ProxyFactory]:
    """``await redis_proxy_factory(upstream_url, redis_url, tag_ttl=..., **upstream)``: each
    call is a new instance with its own cache directory; all are stopped at teardown."""
    started = StartedProxies()

    async def factory(upstream_url: str, redis_url: str, **kwargs: Any) -> ProxyUnderTest:
        cache = tmp_path / f"redis-proxy-cache{len(started)}"
        return await started.add(start_redis_proxy(upstream_url, cache, redis_url, **kwargs))

    try:
        yield factory
    finally:
        await started.stop()


@pytest.fixture
async def proxy(proxy_factory: ProxyFactory, passthrough: PassThrough) -> ProxyUnderTest:
    return await proxy_factory(passthrough.url)
