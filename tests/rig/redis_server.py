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

    def __init__(
        self, workdir: Path, *, binary: str = REDIS_BINARY, replica_of: int | None = None
    ) -> None:
        super().__init__(workdir, log_name="redis.log")
        self.binary = binary
        self.port = free_port()
        self.paused = False
        self.replica_of = replica_of

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
            *(["--replicaof", "127.0.0.1", str(self.replica_of)] if self.replica_of else []),
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


class RedisSentinel(RedisServer):
    """``redis-server --sentinel`` watching the master on ``master_port`` as ``service``,
    alone (quorum 1) and quick to act (down after ``down_after_ms``)."""

    name = "redis-sentinel"

    def __init__(
        self,
        workdir: Path,
        master_port: int,
        *,
        service: str = "mymaster",
        down_after_ms: int = 500,
        binary: str = REDIS_BINARY,
    ) -> None:
        super().__init__(workdir, binary=binary)
        self.log_path = workdir / "sentinel.log"
        self.service = service
        self.master_port = master_port
        self.down_after_ms = down_after_ms

    @property
    def url(self) -> str:
        return f"redis+sentinel://127.0.0.1:{self.port}/{self.service}/0"

    def argv(self) -> list[str]:
        # Sentinel rewrites its configuration file: one of its own, in the work dir.
        config = self.workdir / "sentinel.conf"
        config.write_text(
            f"port {self.port}\n"
            "bind 127.0.0.1\n"
            f"dir {self.workdir}\n"
            f"sentinel monitor {self.service} 127.0.0.1 {self.master_port} 1\n"
            f"sentinel down-after-milliseconds {self.service} {self.down_after_ms}\n"
            f"sentinel failover-timeout {self.service} 3000\n"
        )
        return [self.binary, str(config), "--sentinel"]

    def command(self, *args: str, timeout: float = 1.0) -> bytes:
        """One inline command over a fresh connection; the raw reply."""
        with socket.create_connection(("127.0.0.1", self.port), timeout=timeout) as sock:
            sock.sendall(" ".join(args).encode() + b"\r\n")
            return sock.recv(4096)

    def master_port_now(self) -> int | None:
        """The port of the master the sentinel names now (None if it cannot say)."""
        try:
            reply = self.command("SENTINEL", "get-master-addr-by-name", self.service)
        except OSError:
            return None
        lines = reply.split(b"\r\n")
        return int(lines[4]) if len(lines) > 4 and lines[4].isdigit() else None

    def knows_replicas(self) -> bool:
        try:
            reply = self.command("SENTINEL", "replicas", self.service)
        except OSError:
            return False
        return not reply.startswith(b"*0") and reply.startswith(b"*")
