"""A fault-injecting HTTP pass-through between the proxy under test and docker-registry.

:class:`FaultProxy` is a :class:`~tests.rig.recording.PassThrough` (method, raw path and
query, headers including ``Range``, streamed bodies, redirects passed back, every exchange
recorded in ``log``) that can be told to misbehave the way real upstreams do:

- ``await refuse()`` / ``await accept()``: close the listening socket (new connections are
  refused) and drop requests on connections already open; then listen again, same port.
- ``reset = True``: accept connections, then drop each request without an answer.
- ``stall(match)`` / ``release()``: hold matching requests until released.
- ``fail(status, ...)``: answer 429/503 (OCI error JSON, optional ``Retry-After`` and
  ``ratelimit-*`` headers) to the first ``times`` matching requests, then forward again.
- ``cut_blob(after, ...)``: for the next blob GET (without ``Range``, unless ``ranged``),
  send the headers with the full ``Content-Length``, then ``after`` bytes, then close (or
  abort) the connection.
- ``pause_blob(after, ...)``: for the next blob GET, send ``after`` bytes of the body,
  then hold the rest until ``resume()`` (``reached`` is set when the pause begins).
- ``strip_range = True``: drop ``Range`` before forwarding, so the registry answers 200
  with the whole body (an upstream without range support).
- ``ratelimit_remaining = N``: add Docker Hub's ``ratelimit-limit: 100;w=21600`` and
  ``ratelimit-remaining: N;w=21600`` to every forwarded response.
- ``drop_tag(repo, tag)``: answer 404 MANIFEST_UNKNOWN for ``/v2/<repo>/manifests/<tag>``.

Nothing sleeps: stalls wait on an event that ``release()`` (or ``stop()``) sets.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field

from aiohttp import web

from .recording import (
    HOP_BY_HOP,
    BodyCut,
    Exchange,
    PassThrough,
    drop_connection,
    oci_error,
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
class Pause:
    """A blob body held after ``after`` bytes until :meth:`resume`."""

    after: int
    match: Match
    reached: asyncio.Event = field(default_factory=asyncio.Event)
    released: asyncio.Event = field(default_factory=asyncio.Event)
    taken: bool = False

    async def hold(self) -> None:
        self.reached.set()
        await self.released.wait()

    def resume(self) -> None:
        self.released.set()


@dataclass
class Stall:
    match: Match
    released: asyncio.Event = field(default_factory=asyncio.Event)
    held: int = 0


class FaultProxy(PassThrough):
    """A recording pass-through to ``upstream_url`` with switchable faults."""

    def __init__(self, upstream_url: str) -> None:
        super().__init__(upstream_url)
        self.reset = False
        self.strip_range = False
        self.ratelimit_remaining: int | None = None
        self.dropped_tags: set[tuple[str, str]] = set()
        self._refusing = False
        self._failures: list[Failure] = []
        self._cuts: list[Cut] = []
        self._pauses: list[Pause] = []
        self._stall: Stall | None = None

    # Life cycle ----------------------------------------------------------------------

    async def stop(self) -> None:
        self.release()
        for pause in self._pauses:
            pause.resume()
        await super().stop()

    async def refuse(self) -> None:
        """The upstream goes away: the port refuses connections, and requests on
        connections the proxy already holds are dropped unanswered."""
        self._refusing = True
        await self._server.close_listener()

    async def accept(self) -> None:
        """The upstream is back, on the same port."""
        self._refusing = False
        await self._server.listen()

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

    def pause_blob(self, after: int, *, match: Match | None = None) -> Pause:
        """Hold the body of the next matching blob GET after ``after`` bytes."""
        pause = Pause(after, match or blobs("GET"))
        self._pauses.append(pause)
        return pause

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
        for pause in self._pauses:
            pause.resume()
        self.reset = False
        self.strip_range = False
        self.ratelimit_remaining = None
        self.dropped_tags.clear()
        self._failures.clear()
        self._cuts.clear()
        self._pauses.clear()

    # Handling ------------------------------------------------------------------------

    async def answer(self, request: web.Request, exchange: Exchange) -> web.StreamResponse:
        stall = self._stall
        if stall is not None and stall.match(exchange):
            stall.held += 1
            await stall.released.wait()
        if self._refusing or self.reset:
            return drop_connection(request, exchange, "refused" if self._refusing else "reset")
        for failure in self._failures:
            if failure.take(exchange):
                code = ERROR_CODES.get(failure.status, "UNKNOWN")
                return oci_error(exchange, failure.status, code, "fault", failure.headers)
        if exchange.is_manifest and request.method in ("GET", "HEAD"):
            repo, _, reference = request.path.removeprefix("/v2/").rpartition("/manifests/")
            if (repo, reference) in self.dropped_tags:
                return oci_error(exchange, 404, "MANIFEST_UNKNOWN", "fault")
        cut = next((c for c in self._cuts if c.take(exchange)), None)
        body_cut = BodyCut(cut.after, cut.abort) if cut is not None else None
        pause = next((p for p in self._pauses if not p.taken and p.match(exchange)), None)
        if pause is not None and body_cut is None:
            pause.taken = True
            body_cut = BodyCut(pause.after, pause=pause.hold)
        return await self.forward(
            request,
            exchange,
            drop={*HOP_BY_HOP, "range"} if self.strip_range else HOP_BY_HOP,
            add_headers=(
                ratelimit_headers(self.ratelimit_remaining)
                if self.ratelimit_remaining is not None
                else None
            ),
            cut=body_cut,
        )
