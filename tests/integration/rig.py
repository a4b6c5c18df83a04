"""Real and fake servers for the integration tests, all on loopback.

- :class:`Registry`: Debian's ``docker-registry`` (CNCF Distribution 2.8) as the upstream,
  a child process with filesystem storage in a temp dir; stop/start keep port and storage.
- :class:`PassThrough`: an in-process counting HTTP proxy in front of the registry. The proxy
  under test talks to it, so tests can count what the upstream actually served.
- :class:`LyingUpstream`: answers ``/v2/`` and serves wrong bytes (right length) for blobs.
- :class:`ProxyUnderTest`: ``proxy.app.create_app`` served by an AppRunner in the test loop.

Nothing here sleeps to synchronise: readiness is polled with a deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web
from multidict import CIMultiDict
from yarl import URL

REGISTRY_BINARY = "/usr/bin/docker-registry"
START_TIMEOUT = 15.0
STOP_TIMEOUT = 10.0
CHUNK = 64 * 1024

# RFC 9110 7.6.1 plus the de-facto ones; never forwarded by a proxy.
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)
# Headers aiohttp's client adds on its own unless told to skip them.
CLIENT_AUTO_HEADERS = ("Accept", "Accept-Encoding", "User-Agent", "Content-Type")


def free_port() -> int:
    """A TCP port that was free on 127.0.0.1 a moment ago (for child processes only; our
    own aiohttp servers bind port 0 and read the port back)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def binary_or_skip(path: str) -> str:
    """``path`` if it is an executable; otherwise skip the test, or fail it when CI=true."""
    import pytest

    if os.access(path, os.X_OK):
        return path
    found = shutil.which(os.path.basename(path))
    if found:
        return found
    message = f"{path} is not installed"
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(message + " (CI=true: a missing binary is a failure)")
    pytest.skip(message)


def wait_until(
    predicate: Callable[[], bool], *, within: float, what: str, interval: float = 0.02
) -> None:
    """Poll ``predicate`` until it is true; AssertionError naming ``what`` after ``within``
    seconds."""
    deadline = time.monotonic() + within
    while True:
        if predicate():
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {within}s waiting for {what}")
        time.sleep(interval)


async def async_wait_until(
    predicate: Callable[[], Any], *, within: float, what: str, interval: float = 0.02
) -> None:
    """Async :func:`wait_until`; ``predicate`` may be a plain or an async callable."""
    deadline = asyncio.get_running_loop().time() + within
    while True:
        result = predicate()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out after {within}s waiting for {what}")
        await asyncio.sleep(interval)


# --------------------------------------------------------------------------- docker-registry


REGISTRY_CONFIG = """\
version: 0.1
log:
  level: {log_level}
  accesslog:
    disabled: false
storage:
  filesystem:
    rootdirectory: {root}
  delete:
    enabled: true
  maintenance:
    uploadpurging:
      enabled: false
http:
  addr: 127.0.0.1:{port}
  headers:
    X-Content-Type-Options: [nosniff]
health:
  storagedriver:
    enabled: false
"""


def stop_process(process: subprocess.Popen[bytes] | None, timeout: float = STOP_TIMEOUT) -> None:
    """SIGTERM a child we started, by PID, then SIGKILL if it lingers; reap it."""
    if process is None or process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout)


def read_tail(path: Path, lines: int = 40) -> str:
    """The last ``lines`` lines of a log file, for failure messages ("" if unreadable)."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


class Registry:
    """``docker-registry serve`` as a child process on a fixed loopback port.

    ``stop()`` then ``start()`` brings it back on the same port with the same storage, for
    "upstream down, then back" tests. Output goes to ``log_path`` (the access log included).
    """

    def __init__(self, workdir: Path, *, binary: str = REGISTRY_BINARY, log_level: str = "info"):
        self.binary = binary
        self.workdir = workdir
        self.root = workdir / "storage"
        self.config_path = workdir / "config.yml"
        self.log_path = workdir / "registry.log"
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None
        self.root.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(
            REGISTRY_CONFIG.format(root=self.root, port=self.port, log_level=log_level)
        )

    @property
    def host(self) -> str:
        """``127.0.0.1:PORT``: what goes into ``docker://HOST/repo:tag``."""
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.host}"

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def start(self, timeout: float = START_TIMEOUT) -> None:
        """Start the process and wait until ``GET /v2/`` answers 200."""
        if self.running:
            return
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [self.binary, "serve", str(self.config_path)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.workdir,
            )
        try:
            wait_until(self._ready, within=timeout, what=f"docker-registry on {self.url}/v2/")
        except AssertionError as exc:
            self.stop()
            raise AssertionError(f"{exc}\n--- registry log ---\n{self.log_tail()}") from None

    def _ready(self) -> bool:
        if self.process is None or self.process.poll() is not None:
            raise AssertionError(
                f"docker-registry exited with {self.process and self.process.returncode}"
                f"\n--- registry log ---\n{self.log_tail()}"
            )
        try:
            with urllib.request.urlopen(self.url + "/v2/", timeout=1) as response:
                return bool(response.status == 200)
        except urllib.error.HTTPError as exc:
            return exc.code == 401  # up, with authentication configured
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            return False

    def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        """SIGTERM by PID, then SIGKILL if it does not exit in ``timeout``; idempotent."""
        process, self.process = self.process, None
        stop_process(process, timeout)

    def log_tail(self, lines: int = 40) -> str:
        return read_tail(self.log_path, lines)

    def blob_path(self, digest: str) -> Path:
        """Where Distribution's filesystem driver keeps a blob's data."""
        hex_ = digest.removeprefix("sha256:")
        return self.root / "docker/registry/v2/blobs/sha256" / hex_[:2] / hex_ / "data"


# --------------------------------------------------------------------------- servers in the loop


class LoopbackServer:
    """An aiohttp application served in the running loop on 127.0.0.1 (port 0 by default,
    or a fixed port so a stopped server can come back where clients expect it)."""

    def __init__(self, app: web.Application, *, port: int = 0) -> None:
        self.app = app
        self.port = port
        self._runner: web.AppRunner | None = None

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.host}"

    async def start(self) -> None:
        if self._runner is not None:
            return
        runner = web.AppRunner(self.app, handle_signals=False, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", self.port, reuse_address=True)
        try:
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        for address in runner.addresses:
            self.port = int(address[1])
            break

    async def stop(self) -> None:
        """Close the listening socket and every connection; idempotent. The port is kept,
        so ``start()`` comes back on it."""
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()


@dataclass
class Exchange:
    """One request seen by a :class:`PassThrough` (or served by a fake upstream)."""

    method: str
    path: str
    query: str
    headers: CIMultiDict[str]
    target: str = ""  # the request target as sent, percent-escapes and all
    status: int | None = None
    response_headers: CIMultiDict[str] = field(default_factory=CIMultiDict)
    bytes_sent: int = 0
    done: bool = False
    error: str | None = None

    @property
    def is_blob(self) -> bool:
        return "/blobs/" in self.path and "/blobs/uploads" not in self.path

    @property
    def is_manifest(self) -> bool:
        return "/manifests/" in self.path


class RequestLog:
    """What an upstream was asked, in order, with helpers for the usual questions."""

    def __init__(self) -> None:
        self.exchanges: list[Exchange] = []

    def clear(self) -> None:
        self.exchanges.clear()

    def matching(
        self,
        method: str | Iterable[str] | None = None,
        *,
        path_suffix: str | None = None,
        path_contains: str | None = None,
        predicate: Callable[[Exchange], bool] | None = None,
    ) -> list[Exchange]:
        methods = {method} if isinstance(method, str) else set(method or ())
        return [
            e
            for e in self.exchanges
            if (not methods or e.method in methods)
            and (path_suffix is None or e.path.endswith(path_suffix))
            and (path_contains is None or path_contains in e.path)
            and (predicate is None or predicate(e))
        ]

    def blob_requests(self, digest: str, method: str = "GET") -> list[Exchange]:
        """Requests for ``/v2/<any repo>/blobs/<digest>`` with ``method``."""
        return self.matching(method, path_suffix=f"/blobs/{digest}")

    def blob_gets(self, digest: str | None = None) -> list[Exchange]:
        if digest is not None:
            return self.blob_requests(digest, "GET")
        return self.matching("GET", predicate=lambda e: e.is_blob)

    def manifest_requests(self, method: str | None = None) -> list[Exchange]:
        return self.matching(method, predicate=lambda e: e.is_manifest)

    def blob_bytes_served(self, digest: str | None = None) -> int:
        """Response body bytes of blob GETs (for one digest, or all)."""
        return sum(e.bytes_sent for e in self.blob_gets(digest))

    def summary(self) -> str:
        """One line per exchange, for assertion messages."""
        return "\n".join(
            f"  {e.method} {e.path}{'?' + e.query if e.query else ''} -> {e.status} "
            f"({e.bytes_sent} B{', ' + e.error if e.error else ''})"
            for e in self.exchanges
        )


class PassThrough:
    """A counting HTTP proxy in front of an upstream (the real registry).

    Every request is forwarded as is (method, path, query, headers including Host, body
    streamed), and the response streamed back unchanged except for hop-by-hop headers;
    redirects are passed back, not followed. Each exchange is recorded in ``log``.

    ``mode``: ``"forward"`` (normal); ``"refuse"``: drop every connection without answering
    (an unreachable upstream, as the client sees it); ``"error"``: answer 503. When the
    registry itself is down, connections are dropped the same way as ``"refuse"``.
    """

    def __init__(self, upstream_url: str) -> None:
        self.upstream_url = upstream_url.rstrip("/")
        self.log = RequestLog()
        self.mode = "forward"
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._server = LoopbackServer(app)
        self._session: aiohttp.ClientSession | None = None

    @property
    def url(self) -> str:
        return self._server.url

    @property
    def host(self) -> str:
        return self._server.host

    async def start(self) -> None:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                auto_decompress=False,
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=5, sock_read=60),
                connector=aiohttp.TCPConnector(force_close=True),
            )
        await self._server.start()

    async def stop(self) -> None:
        await self._server.stop()
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        exchange = Exchange(
            method=request.method,
            path=request.path,
            query=request.query_string,
            headers=CIMultiDict(request.headers),
            target=request.raw_path,
        )
        self.log.exchanges.append(exchange)
        try:
            return await self._forward(request, exchange)
        except BaseException as exc:
            exchange.error = exchange.error or type(exc).__name__
            raise
        finally:
            exchange.done = True

    async def _forward(self, request: web.Request, exchange: Exchange) -> web.StreamResponse:
        if self.mode == "refuse":
            return drop_connection(request, exchange, "refused")
        if self.mode == "error":
            exchange.status = 503
            return web.json_response(
                {"errors": [{"code": "UNAVAILABLE", "message": "pass-through in error mode"}]},
                status=503,
            )
        assert self._session is not None
        try:
            upstream = await send_upstream(self._session, self.upstream_url, request)
        except aiohttp.ClientError as exc:
            return drop_connection(request, exchange, f"upstream unreachable: {exc!r}")
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
                # The client hung up; nothing more to do.
                exchange.error = f"client went away: {exc!r}"
            except aiohttp.ClientError as exc:
                # The upstream broke mid-body: the client must see a broken response too.
                return drop_connection(request, exchange, f"upstream broke: {exc!r}")
            return response


async def send_upstream(
    session: aiohttp.ClientSession,
    upstream_url: str,
    request: web.Request,
    *,
    drop: Iterable[str] = HOP_BY_HOP,
) -> aiohttp.ClientResponse:
    """Forward ``request`` as it came (method, exact path and query, headers less
    ``drop``, streamed body), following no redirect."""
    dropped = set(drop)
    # A list, not a dict: skopeo sends several Accept headers.
    headers = [(k, v) for k, v in request.headers.items() if k.lower() not in dropped]
    skip = [h for h in CLIENT_AUTO_HEADERS if h not in request.headers]
    # raw_path keeps the query and the client's exact encoding (%2e%2e stays %2e%2e).
    url = URL(upstream_url + request.raw_path, encoded=True)
    return await session.request(
        request.method,
        url,
        headers=headers,
        data=request.content if request.body_exists else None,
        allow_redirects=False,
        skip_auto_headers=skip,
    )


def relayed_response(upstream: aiohttp.ClientResponse, exchange: Exchange) -> web.StreamResponse:
    """A response with the upstream's status and end-to-end headers, recorded in
    ``exchange``; the caller streams the body."""
    exchange.status = upstream.status
    exchange.response_headers = CIMultiDict(upstream.headers)
    response = web.StreamResponse(status=upstream.status, reason=upstream.reason)
    for name, value in upstream.headers.items():
        if name.lower() not in HOP_BY_HOP:
            response.headers.add(name, value)
    return response


def drop_connection(request: web.Request, exchange: Exchange, why: str) -> web.StreamResponse:
    """Abort the client's connection: no (further) HTTP response reaches it. The returned
    response is never delivered; aiohttp sees the closed transport and lets it be."""
    exchange.error = why
    if request.transport is not None:
        request.transport.abort()
    return web.Response(status=502)


# --------------------------------------------------------------------------- lying upstream


class LyingUpstream:
    """A registry that lies: ``/v2/`` is 200, every blob GET/HEAD claims the requested digest
    and ``size`` bytes, and the GET body is ``size`` bytes that do not hash to it. Manifests
    are 404. Requests are recorded in ``log``."""

    def __init__(self, size: int = 1024 * 1024) -> None:
        self.size = size
        self.log = RequestLog()
        app = web.Application()
        app.router.add_get("/v2/", self._base)
        app.router.add_route("*", "/v2/{name:.+}/blobs/{digest}", self._blob)
        app.router.add_route("*", "/{tail:.*}", self._other)
        self._server = LoopbackServer(app)

    @property
    def url(self) -> str:
        return self._server.url

    @property
    def host(self) -> str:
        return self._server.host

    async def start(self) -> None:
        await self._server.start()

    async def stop(self) -> None:
        await self._server.stop()

    def _record(self, request: web.Request, status: int) -> Exchange:
        exchange = Exchange(
            method=request.method,
            path=request.path,
            query=request.query_string,
            headers=CIMultiDict(request.headers),
            target=request.raw_path,
            status=status,
        )
        self.log.exchanges.append(exchange)
        return exchange

    async def _base(self, request: web.Request) -> web.Response:
        self._record(request, 200).done = True
        return web.json_response({}, headers={"Docker-Distribution-API-Version": "registry/2.0"})

    async def _blob(self, request: web.Request) -> web.StreamResponse:
        digest = request.match_info["digest"]
        exchange = self._record(request, 200)
        headers = {
            "Content-Type": "application/octet-stream",
            "Docker-Content-Digest": digest,
            "Content-Length": str(self.size),
            "Docker-Distribution-API-Version": "registry/2.0",
        }
        response = web.StreamResponse(status=200, headers=headers)
        await response.prepare(request)
        if request.method == "GET":
            payload = wrong_bytes(digest, self.size)
            for start in range(0, len(payload), CHUNK):
                await response.write(payload[start : start + CHUNK])
                exchange.bytes_sent += len(payload[start : start + CHUNK])
        await response.write_eof()
        exchange.done = True
        return response

    async def _other(self, request: web.Request) -> web.Response:
        self._record(request, 404).done = True
        return web.json_response(
            {"errors": [{"code": "MANIFEST_UNKNOWN", "message": "lying upstream"}]}, status=404
        )


def wrong_bytes(digest: str, size: int) -> bytes:
    """Deterministic ``size`` bytes that are not the blob ``digest`` names."""
    seed = hashlib.sha256(digest.encode()).digest()
    out = (seed * (size // len(seed) + 1))[:size]
    assert "sha256:" + hashlib.sha256(out).hexdigest() != digest
    return out


# --------------------------------------------------------------------------- proxy under test


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
    upstream_url: str, cache_dir: Path, *, tag_ttl: str = "5m", **upstream: Any
) -> dict[str, Any]:
    return {
        "listen": "127.0.0.1:0",
        "log_level": "warning",
        "cache": {"dir": str(cache_dir)},
        "upstreams": [
            {"name": "up", "url": upstream_url, "default": True, "tag_ttl": tag_ttl, **upstream}
        ],
    }


async def start_proxy(
    upstream_url: str, cache_dir: Path, *, tag_ttl: str = "5m", **upstream: Any
) -> ProxyUnderTest:
    """Build settings for one default upstream and serve ``create_app`` on a free port."""
    from proxy.app import create_app
    from proxy.settings import Settings

    settings = Settings.from_mapping(
        proxy_settings_mapping(upstream_url, cache_dir, tag_ttl=tag_ttl, **upstream)
    )
    server = LoopbackServer(create_app(settings))
    await server.start()
    return ProxyUnderTest(server=server, cache_dir=cache_dir, settings=settings)


def files_outside(root: Path, allowed: Iterable[Path]) -> list[Path]:
    """Files under ``root`` not under any of ``allowed``."""
    allowed_resolved = [a.resolve() for a in allowed]
    result: list[Path] = []
    for path in root.rglob("*"):
        resolved = path.resolve()
        if path.is_file() and not any(resolved.is_relative_to(a) for a in allowed_resolved):
            result.append(path)
    return result


@contextlib.asynccontextmanager
async def running(server: PassThrough | LyingUpstream) -> Any:
    await server.start()
    try:
        yield server
    finally:
        await server.stop()
