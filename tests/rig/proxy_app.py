"""The proxy under test, ``proxy.app.create_app``, served in the caller's event loop.

Settings are built from a mapping (as the config file would give them) and served by a
:class:`~tests.rig.recording.LoopbackServer` on a free port. Bench does not use this: it
runs the ``registry-proxy serve`` console script as a child process.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiohttp import web

from .recording import LoopbackServer


@dataclass
class ProxyUnderTest:
    """``proxy.app.create_app`` running in the test loop."""

    server: LoopbackServer
    cache_dir: Path
    settings: Any

    @property
    def url(self) -> str:
        return self.server.url

    @property
    def host(self) -> str:
        return self.server.host

    @property
    def app(self) -> web.Application:
        return self.server.app

    def blob_path(self, digest: str) -> Path:
        """Where a committed blob lives: ``<cache>/blobs/sha256/<2 hex>/<hex>``."""
        hex_ = digest.removeprefix("sha256:")
        return self.cache_dir / "blobs" / "sha256" / hex_[:2] / hex_

    def committed_blobs(self) -> list[Path]:
        root = self.cache_dir / "blobs"
        return sorted(p for p in root.rglob("*") if p.is_file()) if root.exists() else []

    def temp_files(self) -> list[Path]:
        root = self.cache_dir / "tmp"
        return sorted(p for p in root.rglob("*") if p.is_file()) if root.exists() else []


def proxy_settings_mapping(
    upstream_url: str,
    cache_dir: Path,
    *,
    tag_ttl: str = "5m",
    sections: Mapping[str, Mapping[str, Any]] | None = None,
    **upstream: Any,
) -> dict[str, Any]:
    """Settings for one default upstream ``up``; ``upstream`` adds keys to its entry and
    ``sections`` keys to top-level sections (``{"server": {"header_timeout": "1s"}}``)."""
    mapping: dict[str, Any] = {
        "listen": "127.0.0.1:0",
        "log_level": "warning",
        "cache": {"dir": str(cache_dir)},
        "upstreams": [
            {"name": "up", "url": upstream_url, "default": True, "tag_ttl": tag_ttl, **upstream}
        ],
    }
    for section, keys in (sections or {}).items():
        mapping[section] = {**mapping.get(section, {}), **keys}
    return mapping


async def serve_proxy(
    mapping: Mapping[str, Any],
    *,
    environ: Mapping[str, str] | None = None,
    prepare: Callable[[web.Application], None] | None = None,
    port: int = 0,
) -> ProxyUnderTest:
    """Serve ``create_app`` for a settings mapping on a free port (or ``port``, for a
    proxy that must know its address beforehand, as ``cluster.advertise`` does), with the
    runner ``proxy.app.run`` uses (the connection guard in front). ``environ`` is what
    ``password_env`` reads (never the test process's environment when given);
    ``prepare`` may adjust the app before it starts."""
    from proxy.app import create_app, create_runner
    from proxy.settings import Settings

    if environ is None:
        settings = Settings.from_mapping(mapping)
    else:
        settings = Settings.from_mapping(mapping, environ=environ)
    app = create_app(settings)
    if prepare is not None:
        prepare(app)
    server = LoopbackServer(
        app,
        port=port,
        runner=lambda app: create_runner(app, settings, handle_signals=False, access_log=None),
    )
    await server.start()
    return ProxyUnderTest(server=server, cache_dir=Path(mapping["cache"]["dir"]), settings=settings)


async def start_proxy(
    upstream_url: str,
    cache_dir: Path,
    *,
    tag_ttl: str = "5m",
    sections: Mapping[str, Mapping[str, Any]] | None = None,
    **upstream: Any,
) -> ProxyUnderTest:
    """Build settings for one default upstream and serve ``create_app`` on a free port."""
    return await serve_proxy(
        proxy_settings_mapping(
            upstream_url, cache_dir, tag_ttl=tag_ttl, sections=sections, **upstream
        )
    )


async def start_redis_proxy(
    upstream_url: str,
    cache_dir: Path,
    redis_url: str,
    *,
    tag_ttl: str = "5m",
    breaker_cooldown: float | None = None,
    **upstream: Any,
) -> ProxyUnderTest:
    """``create_app`` with ``cache.redis`` set, served on a free port.

    ``breaker_cooldown`` replaces the Redis breaker before the app starts: the module's
    ``BREAKER_COOLDOWN`` is bound as a default argument when ``Breaker`` is defined, so
    patching the constant would not reach it.
    """
    from proxy.api.handlers import REGISTRY_KEY
    from proxy.cache.redis import RedisBreaker as Breaker

    mapping = proxy_settings_mapping(upstream_url, cache_dir, tag_ttl=tag_ttl, **upstream)
    mapping["cache"]["redis"] = redis_url

    def shorten_cooldown(app: web.Application) -> None:
        if breaker_cooldown is not None:
            layer = app[REGISTRY_KEY].redis
            assert layer is not None, "cache.redis did not reach the registry"
            layer.breaker = Breaker(cooldown=breaker_cooldown)

    return await serve_proxy(mapping, prepare=shorten_cooldown)


class StartedProxies:
    """The proxies one test (or one :class:`~tests.rig.world.World`) started, stopped
    together at the end, the last started first."""

    def __init__(self) -> None:
        self._started: list[ProxyUnderTest] = []

    def __len__(self) -> int:
        return len(self._started)

    async def add(self, starting: Awaitable[ProxyUnderTest]) -> ProxyUnderTest:
        proxy = await starting
        self._started.append(proxy)
        return proxy

    async def stop(self) -> None:
        while self._started:
            await self._started.pop().server.stop()


# What the ``proxy_factory`` and ``redis_proxy_factory`` fixtures hand a test.
ProxyFactory = Callable[..., Awaitable[ProxyUnderTest]]
