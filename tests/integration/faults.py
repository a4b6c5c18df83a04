"""A fault-injecting HTTP pass-through between the proxy under test and docker-registry.

:class:`FaultProxy` forwards like ``rig.PassThrough`` (method, raw path and query, headers
including ``Range``, streamed bodies, redirects passed back) and records every exchange in
``log`` (a ``rig.RequestLog``), but can be told to misbehave the way real upstreams do:

- ``await refuse()`` / ``await accept()``: close the listening socket (new connections are
  refused) and drop requests on connections already open; then listen again, same port.
- ``reset = True``: accept connections, then drop each request without an answer.
- ``stall(match)`` / ``release()``: hold matching requests until released.
- ``fail(status, ...)``: answer 429/503 (OCI error JSON, optional ``Retry-After`` and
  ``ratelimit-*`` headers) to the first ``times`` matching requests, then forward again.
- ``cut_blob(after, ...)``: for the next blob GET (without ``Range``, unless ``ranged``),
  send the headers with the full ``Content-Length``, then ``after`` bytes, then close (or
  abort) the connection.
- ``strip_range = True``: drop ``Range`` before forwarding, so the registry answers 200
  with the whole body (an upstream without range support).
- ``ratelimit_remaining = N``: add Docker Hub's ``ratelimit-limit: 100;w=21600`` and
  ``ratelimit-remaining: N;w=21600`` to every forwarded response.
- ``drop_tag(repo, tag)``: answer 404 MANIFEST_UNKNOWN for ``/v2/<repo>/manifests/<tag>``.

Nothing sleeps: stalls wait on an event that ``release()`` (or ``stop()``) sets.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import aiohttp
import pytest
from aiohttp import web
from multidict import CIMultiDict

from .rig import (
    CHUNK,
    HOP_BY_HOP,
    Exchange,
    Registry,
    RequestLog,
    drop_connection,
    relayed_response,
    send_upstream,
)

Match = Callable[[Exchange], bool]

RATELIMIT_LIMIT = 100
RATELIMIT_WINDOW = 21600
ERROR_CODES = {429: "TOOMANYREQUESTS", 503: "UNAVAILABLE", 502: "UNAVAILABLE", 500: "UNKNOWN"}


def anything(_: Exchange) -> bool:
    return True


def manifests(method: str | None = None, *, reference: str | None = None) -> Match:
    """Requests for ``/v2/<repo>/manifests/<ref>`` (with ``method``; ending in ``reference``)."""

    def match(e: Exchange) -> bool:
        return (
            e.is_manifest
            and (method is None or e.method == method)
            and (reference is None or e.path.endswith("/manifests/" + reference))
        )

    return match


def blobs(method: str | None = None, *, digest: str | None = None) -> Match:
    def match(e: Exchange) -> bool:
        return (
            e.is_blob
            and (method is None or e.method == method)
            and (digest is None or e.path.endswith("/blobs/" + digest))
        )

    return match


def ratelimit_headers(remaining: int) -> dict[str, str]:
    return {
        "ratelimit-limit": f"{RATELIMIT_LIMIT};w={RATELIMIT_WINDOW}",
        "ratelimit-remaining": f"{remaining};w={RATELIMIT_WINDOW}",
    }


@dataclass
class Failure:
    status: int
    match: Match
    times: int | None  # None: every matching request
    headers: dict[str, str] = field(default_factory=dict)
    answered: int = 0

    def take(self, exchange: Exchange) -> bool:
        if not self.match(exchange) or (self.times is not None and self.answered >= self.times):
            return False
        self.answered += 1
        return True


@dataclass
class Cut:
    after: int
    match: Match
    times: int
    abort: bool
    ranged: bool
    done: int = 0

    def take(self, exchange: Exchange) -> bool:
        if self.done >= self.times or not self.match(exchange):
            return False
        if "Range" in exchange.headers and not self.ranged:
            return False
        self.done += 1
        return True


@dataclass
class Stall:
    match: Match
    released: asyncio.Event = field(default_factory=asyncio.Event)
    held: int = 0


class FaultProxy:
    """A recording pass-through to ``upstream_url`` with switchable faults."""

    def __init__(self, upstream_url: str) -> None:
        self.upstream_url = upstream_url.rstrip("/")
        self.log = RequestLog()
        self.reset = False
        self.strip_range = False
        self.ratelimit_remaining: int | None = None
        self.dropped_tags: set[tuple[str, str]] = set()
        self._refusing = False
        self._failures: list[Failure] = []
        self._cuts: list[Cut] = []
        self._stall: Stall | None = None
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, handle_signals=False, access_log=None)
        self._site: web.TCPSite | None = None
        self._session: aiohttp.ClientSession | None = None
        self.port = 0

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.host}"

    # Life cycle ----------------------------------------------------------------------

    async def start(self) -> None:
        self._session = aiohttp.ClientSession(
            auto_decompress=False,
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=5, sock_read=60),
            connector=aiohttp.TCPConnector(force_close=True),
        )
        await self._runner.setup()
        await self._listen()

    async def _listen(self) -> None:
        site = web.TCPSite(self._runner, "127.0.0.1", self.port, reuse_address=True)
        await site.start()
        self._site = site
        if self.port == 0:
            self.port = int(self._runner.addresses[0][1])

    async def stop(self) -> None:
        self.release()
        self._site = None
        await self._runner.cleanup()
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def refuse(self) -> None:
        """The upstream goes away: the port refuses connections, and requests on
        connections the proxy already holds are dropped unanswered."""
        self._refusing = True
        site, self._site = self._site, None
        if site is not None:
            await site.stop()

    async def accept(self) -> None:
        """The upstream is back, on the same port."""
        self._refusing = False
        if self._site is None:
            await self._listen()

    # Faults --------------------------------------------------------------------------

    def fail(
        self,
        status: int,
        *,
        match: Match = anything,
        times: int | None = None,
        retry_after: str | None = None,
        ratelimit_remaining: int | None = None,
    ) -> Failure:
        headers: dict[str, str] = {}
        if retry_after is not None:
            headers["Retry-After"] = retry_after
        if ratelimit_remaining is not None:
            headers.update(ratelimit_headers(ratelimit_remaining))
        failure = Failure(status, match, times, headers)
        self._failures.append(failure)
        return failure

    def cut_blob(
        self,
        after: int,
        *,
        match: Match | None = None,
        times: int = 1,
        abort: bool = False,
        ranged: bool = False,
    ) -> Cut:
        """Cut the body of the next ``times`` matching responses after ``after`` bytes;
        requests with ``Range`` (resumptions) only when ``ranged``."""
        cut = Cut(after, match or blobs("GET"), times, abort, ranged)
        self._cuts.append(cut)
        return cut

    def stall(self, match: Match = anything) -> Stall:
        self.release()
        self._stall = Stall(match)
        return self._stall

    def release(self) -> None:
        stall, self._stall = self._stall, None
        if stall is not None:
            stall.released.set()

    def drop_tag(self, repo: str, tag: str) -> None:
        self.dropped_tags.add((repo, tag))

    def clear_faults(self) -> None:
        self.release()
        self.reset = False
        self.strip_range = False
        self.ratelimit_remaining = None
        self.dropped_tags.clear()
        self._failures.clear()
        self._cuts.clear()

    # Handling ------------------------------------------------------------------------

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
            return await self._answer(request, exchange)
        except BaseException as exc:
            exchange.error = exchange.error or type(exc).__name__
            raise
        finally:
            exchange.done = True

    async def _answer(self, request: web.Request, exchange: Exchange) -> web.StreamResponse:
        stall = self._stall
        if stall is not None and stall.match(exchange):
            stall.held += 1
            await stall.released.wait()
        if self._refusing or self.reset:
            return drop_connection(request, exchange, "refused" if self._refusing else "reset")
        for failure in self._failures:
            if failure.take(exchange):
                return _error(exchange, failure.status, failure.headers)
        if exchange.is_manifest and request.method in ("GET", "HEAD"):
            repo, _, reference = request.path.removeprefix("/v2/").rpartition("/manifests/")
            if (repo, reference) in self.dropped_tags:
                return _error(exchange, 404, {}, code="MANIFEST_UNKNOWN")
        cut = next((c for c in self._cuts if c.take(exchange)), None)
        return await self._forward(request, exchange, cut)

    async def _forward(
        self, request: web.Request, exchange: Exchange, cut: Cut | None
    ) -> web.StreamResponse:
        assert self._session is not None
        drop = {*HOP_BY_HOP, "range"} if self.strip_range else HOP_BY_HOP
        try:
            upstream = await send_upstream(self._session, self.upstream_url, request, drop=drop)
        except aiohttp.ClientError as exc:
            return drop_connection(request, exchange, f"upstream unreachable: {exc!r}")
        async with upstream:
            response = relayed_response(upstream, exchange)
            if self.ratelimit_remaining is not None:
                for name, value in ratelimit_headers(self.ratelimit_remaining).items():
                    response.headers[name] = value
            limit = cut.after if cut is not None else None
            try:
                await response.prepare(request)
                if request.method != "HEAD":
                    async for chunk in upstream.content.iter_chunked(CHUNK):
                        if limit is not None and exchange.bytes_sent + len(chunk) >= limit:
                            chunk = chunk[: limit - exchange.bytes_sent]
                            await response.write(chunk)
                            exchange.bytes_sent += len(chunk)
                            return _cut(request, exchange, cut)
                        await response.write(chunk)
                        exchange.bytes_sent += len(chunk)
                await response.write_eof()
            except ConnectionError as exc:
                exchange.error = f"client went away: {exc!r}"
            except aiohttp.ClientError as exc:
                return drop_connection(request, exchange, f"upstream broke: {exc!r}")
            return response


def _error(
    exchange: Exchange, status: int, headers: dict[str, str], *, code: str | None = None
) -> web.Response:
    exchange.status = status
    body = {"errors": [{"code": code or ERROR_CODES.get(status, "UNKNOWN"), "message": "fault"}]}
    response = web.json_response(body, status=status, headers=headers)
    exchange.response_headers = CIMultiDict(response.headers)
    return response


def _cut(request: web.Request, exchange: Exchange, cut: Cut | None) -> web.StreamResponse:
    """End the connection mid-body. ``close`` flushes what was written first (the client
    receives exactly ``after`` bytes); ``abort`` discards whatever is still buffered."""
    exchange.error = f"cut after {exchange.bytes_sent} bytes"
    transport = request.transport
    if transport is not None:
        if cut is not None and cut.abort:
            transport.abort()
        else:
            transport.close()
    return web.Response(status=502)


@pytest.fixture
async def fault_proxy(registry: Registry) -> AsyncIterator[FaultProxy]:
    """A :class:`FaultProxy` in front of the ``registry`` fixture (forwarding, no faults)."""
    server = FaultProxy(registry.url)
    await server.start()
    try:
        yield server
    finally:
        await server.stop()
