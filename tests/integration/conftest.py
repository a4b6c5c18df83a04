"""Fixtures for the integration tests: real servers on loopback, started per test.

- ``registry``: docker-registry upstream (``.url``, ``.host``, ``.stop()``, ``.start()``).
- ``passthrough``: counting HTTP proxy in front of ``registry`` (``.url``, ``.log``).
- ``skopeo``: :class:`Skopeo` with a private scratch dir.
- ``http``: an aiohttp ClientSession for direct requests.
- ``proxy_factory``: ``await proxy_factory(upstream_url, tag_ttl="5m")`` -> ProxyUnderTest.
- ``proxy``: the proxy under test pointed at ``passthrough`` with the default tag TTL.
- ``lying_upstream``: a fake upstream that serves wrong blob bytes.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from .rig import (
    REGISTRY_BINARY,
    LyingUpstream,
    PassThrough,
    ProxyUnderTest,
    Registry,
    binary_or_skip,
    start_proxy,
)
from .skopeo import SKOPEO_BINARY, Skopeo

ProxyFactory = Callable[..., Awaitable[ProxyUnderTest]]


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Everything under tests/integration is an integration test."""
    here = Path(__file__).parent
    for item in items:
        if Path(str(item.fspath)).is_relative_to(here):
            item.add_marker(pytest.mark.integration)


@pytest.fixture
def registry(tmp_path: Path) -> Iterator[Registry]:
    binary = binary_or_skip(REGISTRY_BINARY)
    server = Registry(tmp_path / "registry", binary=binary)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
async def passthrough(registry: Registry) -> AsyncIterator[PassThrough]:
    server = PassThrough(registry.url)
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


@pytest.fixture
async def lying_upstream() -> AsyncIterator[LyingUpstream]:
    server = LyingUpstream()
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


@pytest.fixture
def skopeo(tmp_path: Path) -> Skopeo:
    return Skopeo(tmp_path / "skopeo", binary=binary_or_skip(SKOPEO_BINARY))


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(
        timeout=aiohttp.ClientTimeout(total=120, sock_connect=5)
    ) as session:
        yield session


@pytest.fixture
async def proxy_factory(tmp_path: Path) -> AsyncIterator[ProxyFactory]:
    started: list[ProxyUnderTest] = []

    async def factory(
        upstream_url: str, *, tag_ttl: str = "5m", cache_dir: Path | None = None, **upstream: Any
    ) -> ProxyUnderTest:
        cache = cache_dir or tmp_path / f"cache{len(started) or ''}"
        proxy = await start_proxy(upstream_url, cache, tag_ttl=tag_ttl, **upstream)
        started.append(proxy)
        return proxy

    try:
        yield factory
    finally:
        for proxy in reversed(started):
            await proxy.server.stop()


@pytest.fixture
async def proxy(proxy_factory: ProxyFactory, passthrough: PassThrough) -> ProxyUnderTest:
    return await proxy_factory(passthrough.url)
