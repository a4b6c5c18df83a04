"""HTTP servers in the caller's event loop that record every request they are sent.

- :class:`LoopbackServer`: an aiohttp application on 127.0.0.1 (port 0, or a fixed port
  so a stopped server comes back where clients expect it).
- :class:`RecordingServer`: the one request recorder. Every request becomes an
  :class:`Exchange` in ``log`` (a :class:`RequestLog`) before :meth:`RecordingServer.answer`
  sees it; whatever happens next (an answer, a dropped connection, an exception) is noted
  on the exchange, and ``done`` is set when the handler returns. Fake upstreams, the
  counting pass-through, the fault proxy and the token server are all subclasses that
  only answer.
- :class:`PassThrough`: the counting HTTP proxy in front of a real registry (tests count
  what the upstream actually served) or in front of the proxy under test (to see what a
  client such as ctr sent).

Nothing here sleeps to synchronise.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Self

import aiohttp
from aiohttp import web
from multidict import CIMultiDict
from yarl import URL

from .process import LoopbackAddress

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


class LoopbackServer(LoopbackAddress):
    """An aiohttp application served in the running loop on 127.0.0.1 (port 0 by default,
    or a fixed port so a stopped server can come back where clients expect it).
    ``runner`` builds the runner (default: ``web.AppRunner`` without an access log)."""

    def __init__(
        self,
        app: web.Application,
        *,
        port: int = 0,
        runner: Callable[[web.Application], web.AppRunner] | None = None,
    ) -> None:
        self.app = app
        self.port = port
        self._make_runner = runner
        self._runner: web.AppRunner | None = None
        self._site: web.TCPSite | None = None

    async def start(self) -> None:
        if self._runner is not None:
            return
        if self._make_runner is not None:
            runner = self._make_runner(self.app)
        else:
            runner = web.AppRunner(self.app, handle_signals=False, access_log=None)
        await runner.setup()
        self._runner = runner
        try:
            await self.listen()
        except BaseException:
            self._runner = None
            await runner.cleanup()
            raise

    async def listen(self) -> None:
        """Open the listening socket again after :meth:`close_listener` (same port)."""
        assert self._runner is not None, "start() the server first"
        if self._site is not None:
            return
        site = web.TCPSite(self._runner, "127.0.0.1", self.port, reuse_address=True)
        await site.start()
        self._site = site
        if self.port == 0:
            self.port = int(self._runner.addresses[0][1])

    async def close_listener(self) -> None:
        """New connections are refused; connections already open stay and are served."""
        site, self._site = self._site, None
        if site is not None:
            await site.stop()

    async def stop(self) -> None:
        """Close the listening socket and every connection; idempotent. The port is kept,
        so ``start()`` comes back on it."""
        runner, self._runner, self._site = self._runner, None, None
        if runner is not None:
            await runner.cleanup()


@dataclass
class Exchange:
    """One request seen by a :class:`RecordingServer`."""

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

    @classmethod
    def of(cls, request: web.Request) -> Exchange:
        return cls(
            method=request.method,
            path=request.path,
            query=request.query_string,
            headers=CIMultiDict(request.headers),
            target=request.raw_path,
        )

    @property
    def is_blob(self) -> bool:
        return "/blobs/" in self.path and "/blobs/uploads" not in self.path

    @property
    def is_manifest(self) -> bool:
        return "/manifests/" in self.path


class RequestLog:
    """What a server was asked, in order, with helpers for the usual questions."""

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


class RecordingServer(LoopbackAddress):
    """A loopback HTTP server that records every request, then lets :meth:`answer` reply.

    Subclasses implement ``answer`` and keep ``exchange.status`` and ``bytes_sent`` up to
    date as they reply (:func:`stream_body` does the latter); an exception escaping
    ``answer`` is noted in ``exchange.error`` (unless one was noted already) and re-raised.
    ``async with`` starts and stops it.
    """

    def __init__(self, *, port: int = 0) -> None:
        self.log = RequestLog()
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._server = LoopbackServer(app, port=port)

    @property
    def app(self) -> web.Application:
        return self._server.app

    @property
    def port(self) -> int:  # type: ignore[override]  # read-only: the server's port
        return self._server.port

    async def start(self) -> None:
        await self._server.start()

    async def stop(self) -> None:
        await self._server.stop()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    async def answer(self, request: web.Request, exchange: Exchange) -> web.StreamResponse:
        raise NotImplementedError

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        exchange = Exchange.of(request)
        self.log.exchanges.append(exchange)
        try:
            return await self.answer(request, exchange)
        except BaseException as exc:
            exchange.error = exchange.error or type(exc).__name__
            raise
        finally:
            exchange.done = True


async def stream_body(
    request: web.Request,
    response: web.StreamResponse,
    exchange: Exchange,
    data: bytes,
) -> web.StreamResponse:
    """Send ``response`` with ``data`` as its body in :data:`CHUNK` writes (none for HEAD),
    counting the bytes in ``exchange``."""
    exchange.status = response.status
    await response.prepare(request)
    if request.method != "HEAD":
        for start in range(0, len(data), CHUNK):
            await response.write(data[start : start + CHUNK])
            exchange.bytes_sent += len(data[start : start + CHUNK])
    await response.write_eof()
    return response


def oci_error(
    exchange: Exchange,
    status: int,
    code: str,
    message: str,
    headers: Mapping[str, str] | None = None,
) -> web.Response:
    """A distribution-API error response (``{"errors": [...]}``), recorded in ``exchange``."""
    exchange.status = status
    response = web.json_response(
        {"errors": [{"code": code, "message": message}]}, status=status, headers=headers
    )
    exchange.response_headers = CIMultiDict(response.headers)
    return response


def drop_connection(request: web.Request, exchange: Exchange, why: str) -> web.StreamResponse:
    """Abort the client's connection: no (further) HTTP response reaches it. The returned
    response is never delivered; aiohttp sees the closed transport and lets it be."""
    exchange.error = why
    if request.transport is not None:
        request.transport.abort()
    return web.Response(status=502)


def cut_connection(request: web.Request, exchange: Exchange, *, abort: bool) -> web.StreamResponse:
    """End the connection mid-body. ``abort=False`` closes it after flushing what was
    written (the client receives exactly those bytes); ``abort=True`` discards whatever is
    still buffered."""
    exchange.error = f"cut after {exchange.bytes_sent} bytes"
    transport = request.transport
    if transport is not None:
        if abort:
            transport.abort()
        else:
            transport.close()
    return web.Response(status=502)


@dataclass(frozen=True)
class BodyCut:
    """Where to end a relayed body: after ``after`` bytes, closing or aborting; or, with
    ``pause``, where to await it before relaying the rest."""

    after: int
    abort: bool = False
    pause: Callable[[], Awaitable[None]] | None = None


class PassThrough(RecordingServer):
    """A counting HTTP proxy in front of an upstream.

    Every request is forwarded as is (method, path, query, headers including Host, body
    streamed), and the response streamed back unchanged except for hop-by-hop headers;
    redirects are passed back, not followed. Each exchange is recorded in ``log``.

    ``mode``: ``"forward"`` (normal); ``"refuse"``: drop every connection without answering
    (an unreachable upstream, as the client sees it); ``"error"``: answer 503. When the
    upstream itself is down, connections are dropped the same way as ``"refuse"``.
    """

    def __init__(self, upstream_url: str) -> None:
        super().__init__()
        self.upstream_url = upstream_url.rstrip("/")
        self.mode = "forward"
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                auto_decompress=False,
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=5, sock_read=60),
                connector=aiohttp.TCPConnector(force_close=True),
            )
        await super().start()

    async def stop(self) -> None:
        await super().stop()
        if self._session is not None:
            await self._session.close()
            self._session = None

    @property
    def session(self) -> aiohttp.ClientSession:
        assert self._session is not None, "start() the pass-through first"
        return self._session

    async def answer(self, request: web.Request, exchange: Exchange) -> web.StreamResponse:
        if self.mode == "refuse":
            return drop_connection(request, exchange, "refused")
        if self.mode == "error":
            exchange.status = 503
            return web.json_response(
                {"errors": [{"code": "UNAVAILABLE", "message": "pass-through in error mode"}]},
                status=503,
            )
        return await self.forward(request, exchange)

    async def forward(
        self,
        request: web.Request,
        exchange: Exchange,
        *,
        drop: Iterable[str] = HOP_BY_HOP,
        add_headers: Mapping[str, str] | None = None,
        cut: BodyCut | None = None,
        to: str | None = None,
    ) -> web.StreamResponse:
        """Relay ``request`` upstream (or ``to`` another URL; less the headers in
        ``drop``) and the answer back (with ``add_headers`` set), ending or pausing the
        body at ``cut``. An unreachable upstream, or one that breaks mid-body, drops the
        client's connection."""
        try:
            upstream = await send_upstream(
                self.session, to or self.upstream_url, request, drop=drop
            )
        except aiohttp.ClientError as exc:
            return drop_connection(request, exchange, f"upstream unreachable: {exc!r}")
        async with upstream:
            response = relayed_response(upstream, exchange)
            for name, value in (add_headers or {}).items():
                response.headers[name] = value
            limit = cut.after if cut is not None else None
            try:
                await response.prepare(request)
                if request.method != "HEAD":
                    async for chunk in upstream.content.iter_chunked(CHUNK):
                        if limit is not None and exchange.bytes_sent + len(chunk) >= limit:
                            head = chunk[: limit - exchange.bytes_sent]
                            await response.write(head)
                            exchange.bytes_sent += len(head)
                            assert cut is not None
                            if cut.pause is None:
                                return cut_connection(request, exchange, abort=cut.abort)
                            await cut.pause()
                            limit, chunk = None, chunk[len(head) :]
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
