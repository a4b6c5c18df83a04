"""A real ``redis-server`` for the integration tests, and proxies that share it.

- :class:`RedisServer`: Debian's ``redis-server`` as a child process on a free loopback
  port, no persistence (``--save "" --appendonly no``), its own ``--dir``. ``stop()`` then
  ``start()`` brings it back, empty, on the same port; ``kill()`` is SIGKILL (a crash);
  ``pause()``/``resume()`` are SIGSTOP/SIGCONT (a hung server: connections are accepted by
  the kernel, nothing is answered).
- ``redis_server`` fixture: one per test, stopped at teardown; a missing binary fails the
  test when CI=true and skips it otherwise.
- :func:`start_redis_proxy` and the ``redis_proxy_factory`` fixture: the proxy under test
  with ``cache.redis`` set (``rig.start_proxy`` cannot pass it), optionally with a shorter
  Redis breaker cool-down.

Test modules import the fixtures explicitly (``from .redis_rig import redis_server``).
Readiness is polled with a deadline (PING), never slept for.
"""

from __future__ import annotations

import contextlib
import signal
import socket
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis

from .rig import (
    LoopbackServer,
    ProxyUnderTest,
    binary_or_skip,
    free_port,
    proxy_settings_mapping,
    read_tail,
    stop_process,
    wait_until,
)

REDIS_BINARY = "/usr/bin/redis-server"
START_TIMEOUT = 10.0
STOP_TIMEOUT = 10.0


class RedisServer:
    """``redis-server`` as a child process on a fixed loopback port, stopped by PID."""

    def __init__(self, workdir: Path, *, binary: str = REDIS_BINARY) -> None:
        self.binary = binary
        self.workdir = workdir
        self.log_path = workdir / "redis.log"
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None
        self.paused = False
        workdir.mkdir(parents=True, exist_ok=True)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def start(self, timeout: float = START_TIMEOUT) -> None:
        """Start the server and wait until it answers PING."""
        if self.running:
            return
        argv = [
            self.binary,
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(self.workdir),
            "--daemonize",
            "no",
        ]
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.workdir,
            )
        self.paused = False
        try:
            wait_until(self._ready, within=timeout, what=f"redis-server PONG on {self.url}")
        except AssertionError as exc:
            self.stop()
            raise AssertionError(f"{exc}\n--- redis log ---\n{self.log_tail()}") from None

    def _ready(self) -> bool:
        if self.process is None or self.process.poll() is not None:
            raise AssertionError(
                f"redis-server exited with {self.process and self.process.returncode}"
                f"\n--- redis log ---\n{self.log_tail()}"
            )
        return self.ping()

    def ping(self, timeout: float = 0.5) -> bool:
        """One inline PING over a fresh connection; True on ``+PONG``."""
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=timeout) as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(64).startswith(b"+PONG")
        except OSError:
            return False

    def kill(self) -> None:
        """SIGKILL by PID (a crash) and reap it; the port is free again afterwards."""
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        process.kill()
        process.wait(STOP_TIMEOUT)
        self.paused = False

    def pause(self) -> None:
        """SIGSTOP: the server hangs (the kernel still accepts connections)."""
        assert self.process is not None and self.running, "redis-server is not running"
        self.process.send_signal(signal.SIGSTOP)
        self.paused = True

    def resume(self) -> None:
        if self.process is not None and self.paused:
            self.process.send_signal(signal.SIGCONT)
        self.paused = False

    def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        """SIGTERM by PID (after SIGCONT if paused), SIGKILL if it lingers; idempotent."""
        self.resume()
        process, self.process = self.process, None
        stop_process(process, timeout)

    def log_tail(self, lines: int = 30) -> str:
        return read_tail(self.log_path, lines)


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path / "redis", binary=binary_or_skip(REDIS_BINARY))
    server.start()
    try:
        yield server
    finally:
        server.stop()


@contextlib.asynccontextmanager
async def redis_client(url: str) -> AsyncIterator[aioredis.Redis]:
    """A plain client for inspecting what the proxy wrote (not the proxy's own client)."""
    client = aioredis.from_url(url, socket_timeout=2, socket_connect_timeout=2)
    try:
        yield client
    finally:
        await client.aclose()


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
    from proxy.app import create_app
    from proxy.cache.redis import RedisBreaker as Breaker
    from proxy.settings import Settings

    mapping = proxy_settings_mapping(upstream_url, cache_dir, tag_ttl=tag_ttl, **upstream)
    mapping["cache"]["redis"] = redis_url
    settings = Settings.from_mapping(mapping)
    app = create_app(settings)
    if breaker_cooldown is not None:
        layer = app[REGISTRY_KEY].redis
        assert layer is not None, "cache.redis did not reach the registry"
        layer.breaker = Breaker(cooldown=breaker_cooldown)
    server = LoopbackServer(app)
    await server.start()
    return ProxyUnderTest(server=server, cache_dir=cache_dir, settings=settings)


RedisProxyFactory = Callable[..., Awaitable[ProxyUnderTest]]


@pytest.fixture
async def redis_proxy_factory(tmp_path: Path) -> AsyncIterator[RedisProxyFactory]:
    """``await redis_proxy_factory(upstream_url, redis_url, tag_ttl=..., **upstream)``: each
    call is a new instance with its own cache directory; all are stopped at teardown."""
    started: list[ProxyUnderTest] = []

    async def factory(upstream_url: str, redis_url: str, **kwargs: Any) -> ProxyUnderTest:
        cache = tmp_path / f"redis-proxy-cache{len(started)}"
        proxy = await start_redis_proxy(upstream_url, cache, redis_url, **kwargs)
        started.append(proxy)
        return proxy

    try:
        yield factory
    finally:
        for proxy in reversed(started):
            await proxy.server.stop()
