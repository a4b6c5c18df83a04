"""Debian's ``redis-server`` as a child process on a free loopback port.

No persistence (``--save "" --appendonly no``), its own ``--dir``. ``stop()`` then
``start()`` brings it back, empty, on the same port; ``kill()`` is SIGKILL (a crash);
``pause()``/``resume()`` are SIGSTOP/SIGCONT (a hung server: the kernel accepts
connections, nothing is answered). Ready means it answers an inline PING.
"""

from __future__ import annotations

import contextlib
import signal
import socket
from collections.abc import AsyncIterator
from pathlib import Path

import redis.asyncio as aioredis

from .process import STOP_TIMEOUT, ChildProcess, free_port

REDIS_BINARY = "/usr/bin/redis-server"


class RedisServer(ChildProcess):
    """``redis-server`` on a fixed loopback port, stopped by PID."""

    name = "redis-server"
    start_timeout = 10.0

    def __init__(self, workdir: Path, *, binary: str = REDIS_BINARY) -> None:
        super().__init__(workdir, log_name="redis.log")
        self.binary = binary
        self.port = free_port()
        self.paused = False

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def argv(self) -> list[str]:
        return [
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

    def start(self, timeout: float | None = None) -> None:
        if not self.running:
            self.paused = False
        super().start(timeout)

    def ready(self) -> bool:
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
        super().stop(timeout)

    def log_tail(self, lines: int = 30) -> str:
        return super().log_tail(lines)


@contextlib.asynccontextmanager
async def redis_client(url: str) -> AsyncIterator[aioredis.Redis]:
    """A plain client for inspecting what the proxy wrote (not the proxy's own client)."""
    client = aioredis.from_url(url, socket_timeout=2, socket_connect_timeout=2)
    try:
        yield client
    finally:
        await client.aclose()
