"""Replicas of the proxy as separate processes, sharing one Redis, behind a balancer.

- :class:`Replica`: ``registry-proxy serve --config FILE`` as our child process (so a
  SIGKILL is a real one), with its own cache directory and port, ``cache.redis`` and the
  ``cluster`` section (advertised at its own loopback address, one shared secret file).
- :class:`RoundRobin`: a small HTTP balancer in the test loop that sends each request to
  the next backend in turn (as an ingress does), skipping backends that refuse the
  connection and those :meth:`RoundRobin.remove`-d (as a Service drops an endpoint that
  turned unready). Every request is recorded like any :class:`RecordingServer`'s.
- :class:`Replicas`: N replicas started together (each polled for ``/readyz``, never
  slept for) and stopped by PID.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from .process import ChildProcess, LoopbackAddress, free_port, wait_until
from .recording import (
    CHUNK,
    Exchange,
    PassThrough,
    drop_connection,
    relayed_response,
    send_upstream,
)

SECRET = "cluster-test-secret-0123456789abcdef"


def proxy_binary() -> str:
    """The ``registry-proxy`` console script beside the running interpreter."""
    return str(Path(sys.executable).parent / "registry-proxy")


def http_status(url: str, timeout: float = 1.0) -> int | None:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)
    except (urllib.error.URLError, OSError):
        return None


class Replica(ChildProcess, LoopbackAddress):
    """One replica; ``settings`` adds or overrides top-level keys of its config."""

    name = "replica"

    def __init__(
        self,
        workdir: Path,
        *,
        upstream_url: str,
        redis_url: str,
        secret_file: Path,
        tag_ttl: str = "5m",
        settings: dict[str, Any] | None = None,
        lease_ttl: str | None = None,
    ) -> None:
        super().__init__(workdir, log_name="proxy.log")
        self.port = free_port()
        self.cache_dir = workdir / "cache"
        self.config_path = workdir / "config.yaml"
        self.config: dict[str, Any] = {
            "listen": self.host,
            "log_level": "info",
            "cache": {"dir": str(self.cache_dir), "redis": redis_url},
            "cluster": {"advertise": self.host, "secret_file": str(secret_file)},
            "shutdown_grace": "20s",
            "upstreams": [{"name": "up", "url": upstream_url, "default": True, "tag_ttl": tag_ttl}],
            **(settings or {}),
        }
        if lease_ttl is not None:
            self.config["cluster"]["lease_ttl"] = lease_ttl

    def argv(self) -> list[str]:
        # JSON is YAML: the config file is written as JSON.
        self.config_path.write_text(json.dumps(self.config))
        return [proxy_binary(), "serve", "--config", str(self.config_path)]

    def ready(self) -> bool:
        return http_status(self.url + "/readyz") == 200

    def kill(self) -> None:
        """SIGKILL by PID and reap: the replica dies mid-whatever it was doing."""
        assert self.process is not None
        self.process.kill()
        self.process.wait(10)
        self.process = None

    def pause(self) -> None:
        """SIGSTOP: the replica hangs; its connections stay open and its lease lapses."""
        assert self.process is not None
        self.process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        if self.process is not None:
            self.process.send_signal(signal.SIGCONT)

    def stop(self, timeout: float = 10.0) -> None:
        self.resume()
        super().stop(timeout)

    def terminate(self) -> None:
        """SIGTERM by PID, without waiting (see :meth:`wait_exit`)."""
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)

    def wait_exit(self, within: float) -> int:
        assert self.process is not None
        code = self.process.wait(within)
        self.process = None
        return code

    def temp_files(self) -> list[Path]:
        root = self.cache_dir / "tmp"
        return sorted(p for p in root.rglob("*") if p.is_file()) if root.exists() else []

    def blob_path(self, digest: str) -> Path:
        hex_ = digest.removeprefix("sha256:")
        return self.cache_dir / "blobs" / "sha256" / hex_[:2] / hex_


class Replicas:
    """``count`` replicas of one upstream sharing ``redis_url``."""

    def __init__(
        self,
        workdir: Path,
        count: int,
        *,
        upstream_url: str,
        redis_url: str,
        tag_ttl: str = "5m",
        settings: dict[str, Any] | None = None,
        lease_ttl: str | None = None,
    ) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        self.secret_file = workdir / "cluster.secret"
        self.secret_file.write_text(SECRET + "\n")
        os.chmod(self.secret_file, 0o600)
        self.members = [
            Replica(
                workdir / f"replica-{i}",
                upstream_url=upstream_url,
                redis_url=redis_url,
                secret_file=self.secret_file,
                tag_ttl=tag_ttl,
                settings=settings,
                lease_ttl=lease_ttl,
            )
            for i in range(count)
        ]
        for i, member in enumerate(self.members):
            member.name = f"replica-{i}"

    def __iter__(self) -> Iterator[Replica]:
        return iter(self.members)

    def __getitem__(self, index: int) -> Replica:
        return self.members[index]

    def start(self) -> None:
        for member in self.members:
            member.spawn()
        for member in self.members:
            wait_until(member._alive_and_ready, within=30, what=f"{member.name} to be ready")

    def stop(self) -> None:
        for member in self.members:
            member.stop()


class RoundRobin(PassThrough):
    """Each request (or, ``per_connection``, each client connection, as kube-proxy
    balances) to the next backend in turn; a backend that refuses: the next one."""

    def __init__(self, backends: list[str], *, per_connection: bool = False) -> None:
        super().__init__(backends[0])
        self.backends = list(backends)
        self.removed: set[str] = set()
        self.per_connection = per_connection
        self._next = 0
        # Client connection (its transport, held for the test's life) -> its backend.
        self._sticky: dict[object, str] = {}
        self.connections: dict[str, int] = {b: 0 for b in backends}

    def remove(self, backend: str) -> None:
        self.removed.add(backend)

    def add(self, backend: str) -> None:
        self.removed.discard(backend)

    def _pick(self) -> Iterator[str]:
        live = [b for b in self.backends if b not in self.removed]
        if not live:
            return
        start = self._next
        self._next += 1
        for i in range(len(live)):
            yield live[(start + i) % len(live)]

    async def answer(self, request: web.Request, exchange: Exchange) -> web.StreamResponse:
        candidates = list(self._pick())
        if self.per_connection:
            chosen = self._sticky.get(request.transport)
            if chosen is None or chosen in self.removed:
                chosen = candidates[0] if candidates else None
                if chosen is not None:
                    self._sticky[request.transport] = chosen
                    self.connections[chosen] += 1
            candidates = [chosen] if chosen is not None else []
        for backend in candidates:
            try:
                upstream = await send_upstream(self.session, backend, request)
            except aiohttp.ClientConnectorError:
                continue  # refused: as a balancer does, try the next backend
            except aiohttp.ClientError as exc:
                return drop_connection(request, exchange, f"backend failed: {exc!r}")
            async with upstream:
                response = relayed_response(upstream, exchange)
                try:
                    await response.prepare(request)
                    if request.method != "HEAD":
                        async for chunk in upstream.content.iter_chunked(CHUNK):
                            await response.write(chunk)
                            exchange.bytes_sent += len(chunk)
                    await response.write_eof()
                except ConnectionError as exc:
                    exchange.error = f"client went away: {exc!r}"
                except aiohttp.ClientError as exc:
                    return drop_connection(request, exchange, f"backend broke: {exc!r}")
                return response
        return drop_connection(request, exchange, "no backend reachable")
