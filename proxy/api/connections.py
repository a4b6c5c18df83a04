"""Client connections: timeouts for slow clients, a bound on their number, shedding.

The scheme. The listener's ``web.Server`` is a :class:`GuardedServer`; each connection's
protocol is a :class:`GuardedRequestHandler` that tells one :class:`ConnectionGuard` which
state it is in, and when it entered it:

* ``IDLE``: waiting for a request, no byte of it received (a new connection, or a
  keep-alive connection between requests). Closed at ``keepalive_timeout`` after its last
  response, or ``header_timeout`` after it was accepted.
* ``HEADER``: bytes of a request received, its header not complete. Answered ``408`` and
  closed ``header_timeout`` after the first byte (nginx's ``client_header_timeout``): a
  slowloris client trickling bytes gets no extension.
* ``BUSY``: a request is being handled. No deadline (a blob may take long), but while it
  has response bytes queued that the client does not acknowledge for ``send_timeout``
  (the kernel's ``tcpi_bytes_acked`` does not move), the connection is aborted: a client
  that stopped reading holds nothing for ever. This covers ``sendfile`` as well as
  ``write``, since it looks at the socket, not at the code that fills it.

One periodic sweep checks the deadlines of every connection (no timer per connection).

The bound. At most ``max_connections`` connections are open. When one more arrives at the
bound, the least recently active connection that is ``IDLE`` or ``HEADER`` is closed to
make room, so a thousand idle or stalled connections cannot lock out the next client;
only when every connection is ``BUSY`` is the new one answered ``503`` and closed. When
``accept`` fails for want of file descriptors (EMFILE, ENFILE), asyncio's own error is
counted and logged at most once per ``ACCEPT_ERROR_LOG_INTERVAL`` (instead of a traceback
per attempt), and idle connections are shed so the next accept succeeds.

aiohttp hooks used: ``Server.__call__`` (the protocol factory), ``data_received``,
``finish_response`` and ``connection_made``/``connection_lost`` of ``RequestHandler``,
and the server's ``request_factory`` (each request starts there, pipelined ones too).
The request factory also rewrites a request line's HTTP version that is not 1.x (HTTP/2.0
or 0.9 sent over HTTP/1 framing): aiohttp would echo it in the status line; the request
is answered ``505`` over ``HTTP/1.1`` instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import json
import logging
import resource
import socket
import struct
import termios
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from enum import Enum
from typing import Any

from aiohttp import web
from aiohttp.abc import AbstractStreamWriter
from aiohttp.http import HttpVersion11, RawRequestMessage
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.streams import StreamReader
from aiohttp.web_protocol import RequestHandler

from proxy import metrics

log = logging.getLogger(__name__)

ACCEPT_ERROR_LOG_INTERVAL = 10.0
"""Seconds between two log lines about failed accepts (each is counted)."""
FD_RESERVE = 128
"""File descriptors kept for everything but client sockets (upstream connections, the
cache's files, Redis, SQLite) when ``max_connections`` is derived from the limit."""
MIN_DERIVED_CONNECTIONS = 32
SHED_ON_ACCEPT_ERROR = 16
"""Idle connections closed when an accept fails for want of file descriptors."""
MAX_SWEEP_INTERVAL = 1.0
_TCP_INFO_SIZE = 256
_TCPI_BYTES_ACKED = 120  # offset of tcpi_bytes_acked (u64) in Linux's struct tcp_info
_ACCEPT_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
UNSUPPORTED_VERSION_KEY = web.RequestKey("unsupported_http_version", str)


class State(Enum):
    IDLE = "idle"
    HEADER = "header"
    BUSY = "busy"


def derived_max_connections() -> int:
    """Half of what the open-files limit leaves after ``FD_RESERVE``: a client streaming
    a blob holds its socket and the blob's file."""
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        soft = 1 << 20
    return max(MIN_DERIVED_CONNECTIONS, (soft - FD_RESERVE) // 2)


def raise_open_files_limit() -> int:
    """Raise the soft open-files limit to the hard one (as Go's runtime does); returns
    the soft limit in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass
    return soft


def raw_error(status: int, reason: str, code: str, message: str, **headers: str) -> bytes:
    """A complete HTTP/1.1 answer with an OCI error body, for connections that have no
    request object to answer through (header timeout, refused at the bound)."""
    body = json.dumps({"errors": [{"code": code, "message": message, "detail": None}]}).encode()
    lines = [
        f"HTTP/1.1 {status} {reason}",
        "Content-Type: application/json",
        f"Content-Length: {len(body)}",
        "Connection: close",
        "Docker-Distribution-API-Version: registry/2.0",
        *(f"{name.replace('_', '-')}: {value}" for name, value in headers.items()),
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


HEADER_TIMEOUT_ANSWER = raw_error(
    408, "Request Timeout", "UNSUPPORTED", "request header not received in time"
)
BUSY_ANSWER = raw_error(
    503, "Service Unavailable", "UNAVAILABLE", "too many connections", Retry_After="1"
)


def _bytes_acked(transport: asyncio.Transport) -> int | None:
    sock = transport.get_extra_info("socket")
    if sock is None or sock.family not in (socket.AF_INET, socket.AF_INET6):
        return None
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, _TCP_INFO_SIZE)
    except OSError:
        return None
    if len(info) < _TCPI_BYTES_ACKED + 8:
        return None
    return int(struct.unpack_from("Q", info, _TCPI_BYTES_ACKED)[0])


def _unsent(transport: asyncio.Transport) -> int:
    """Response bytes not yet acknowledged: the transport's buffer and the kernel's."""
    queued = transport.get_write_buffer_size()
    sock = transport.get_extra_info("socket")
    if sock is not None:
        try:
            buf = fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0\0\0\0")
            queued += struct.unpack("i", buf)[0]
        except OSError:
            pass
    return queued


class ConnectionGuard:
    """Every open client connection of one listener, its state and its deadline."""

    def __init__(
        self,
        *,
        header_timeout: float,
        keepalive_timeout: float,
        send_timeout: float,
        max_connections: int | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.header_timeout = header_timeout
        self.keepalive_timeout = keepalive_timeout
        self.send_timeout = send_timeout
        self.max_connections = max_connections or derived_max_connections()
        self._clock = clock
        # Least recently active first: the order in which connections are shed.
        self._open: OrderedDict[GuardedRequestHandler, None] = OrderedDict()
        self._sweeper: asyncio.Task[None] | None = None
        self._accept_errors_logged_at = -ACCEPT_ERROR_LOG_INTERVAL
        self._accept_errors_unlogged = 0
        positive = [t for t in (header_timeout, keepalive_timeout, send_timeout) if t > 0]
        self.sweep_interval = min([MAX_SWEEP_INTERVAL, *(t / 4 for t in positive)])
        metrics.CLIENT_CONNECTIONS_LIMIT.set(self.max_connections)

    def __len__(self) -> int:
        return len(self._open)

    # --- life cycle ------------------------------------------------------------------

    def start(self) -> None:
        if self._sweeper is None:
            self._sweeper = asyncio.create_task(self._sweep_forever(), name="connection guard")

    async def close(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
            self._sweeper = None

    def install(self, loop: asyncio.AbstractEventLoop) -> Callable[[], None]:
        """Route asyncio's "accept failed" errors of ``loop`` here; returns the undo."""
        previous = loop.get_exception_handler()

        def handler(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
            exc = context.get("exception")
            if (
                isinstance(exc, OSError)
                and exc.errno in _ACCEPT_ERRNOS
                and str(context.get("message", "")).startswith("socket.accept()")
            ):
                self.accept_failed(exc)
            elif previous is not None:
                previous(loop, context)
            else:
                loop.default_exception_handler(context)

        loop.set_exception_handler(handler)
        return lambda: loop.set_exception_handler(previous)

    # --- what the connections report -------------------------------------------------

    def admit(self, conn: GuardedRequestHandler) -> bool:
        """A connection was accepted: make room if at the bound; False to refuse it."""
        if len(self._open) >= self.max_connections and not self._shed(1, "shed"):
            metrics.CLIENT_CONNECTIONS_CLOSED.labels("refused").inc()
            return False
        self._open[conn] = None
        metrics.CLIENT_CONNECTIONS.set(len(self._open))
        return True

    def forget(self, conn: GuardedRequestHandler) -> None:
        if self._open.pop(conn, 0) is None:
            metrics.CLIENT_CONNECTIONS.set(len(self._open))

    def idle(self, conn: GuardedRequestHandler) -> None:
        """The connection finished a response: it is the most recently active now."""
        if conn in self._open:
            self._open.move_to_end(conn)

    def accept_failed(self, exc: OSError) -> None:
        metrics.ACCEPT_ERRORS.inc()
        self._accept_errors_unlogged += 1
        shed = self._shed(SHED_ON_ACCEPT_ERROR, "shed")
        now = self._clock()
        if now - self._accept_errors_logged_at >= ACCEPT_ERROR_LOG_INTERVAL:
            log.error(
                "accepting connections fails: %s (%d times since the last report); %d open, "
                "%d idle ones closed",
                exc.strerror or exc,
                self._accept_errors_unlogged,
                len(self._open),
                shed,
            )
            self._accept_errors_logged_at = now
            self._accept_errors_unlogged = 0

    # --- deadlines -------------------------------------------------------------------

    def _shed(self, count: int, reason: str) -> int:
        """Close up to ``count`` of the least recently active IDLE or HEADER connections."""
        victims = []
        for conn in self._open:
            if conn.state is not State.BUSY:
                victims.append(conn)
                if len(victims) >= count:
                    break
        for conn in victims:
            self.drop(conn, reason)
        return len(victims)

    def drop(self, conn: GuardedRequestHandler, reason: str, answer: bytes | None = None) -> None:
        self.forget(conn)
        metrics.CLIENT_CONNECTIONS_CLOSED.labels(reason).inc()
        conn.drop(answer)

    def sweep(self) -> None:
        """Close every connection past its deadline."""
        now = self._clock()
        for conn in list(self._open):
            if conn.state is State.IDLE:
                limit = self.keepalive_timeout if conn.served else self.header_timeout
                if limit > 0 and now - conn.since >= limit:
                    self.drop(conn, "keepalive_timeout")
            elif conn.state is State.HEADER:
                if self.header_timeout > 0 and now - conn.since >= self.header_timeout:
                    self.drop(conn, "header_timeout", HEADER_TIMEOUT_ANSWER)
            elif self.send_timeout > 0 and conn.send_stalled(now) >= self.send_timeout:
                log.info("client stopped reading for %.0fs: connection aborted", self.send_timeout)
                self.drop(conn, "send_timeout")

    async def _sweep_forever(self) -> None:
        while True:
            await asyncio.sleep(self.sweep_interval)
            try:
                self.sweep()
            except Exception:
                log.exception("connection sweep failed")


class GuardedRequestHandler(RequestHandler):
    """aiohttp's protocol, reporting its state to the guard (see the module docstring)."""

    def __init__(self, manager: web.Server, guard: ConnectionGuard, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self.guard = guard
        self.state = State.IDLE
        self.since = guard._clock()
        self.served = False
        self._acked: int | None = None
        self._acked_at = self.since

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        if not self.guard.admit(self):
            self.drop(BUSY_ANSWER)

    def connection_lost(self, exc: BaseException | None) -> None:
        self.guard.forget(self)
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self.state is State.IDLE and data:
            self.state, self.since = State.HEADER, self.guard._clock()
        super().data_received(data)

    def request_started(self) -> None:
        self.state, self.since = State.BUSY, self.guard._clock()
        self._acked, self._acked_at = None, self.since

    async def finish_response(
        self, request: web.BaseRequest, resp: web.StreamResponse, start_time: float | None
    ) -> tuple[web.StreamResponse, bool]:
        try:
            return await super().finish_response(request, resp, start_time)
        finally:
            self.state, self.since, self.served = State.IDLE, self.guard._clock(), True
            self.guard.idle(self)

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        """A request aiohttp could not parse gets an OCI error body, and a debug line
        instead of a traceback at error level (a client controls how often it happens)."""
        if not isinstance(exc, HttpProcessingError) or request.writer.output_size > 0:
            return super().handle_error(request, status, exc, message)
        log.debug("malformed request from %s: %s", request.remote, exc.message)
        metrics.MALFORMED_REQUESTS.inc()
        body = {
            "errors": [{"code": "UNSUPPORTED", "message": "malformed HTTP request", "detail": None}]
        }
        response = web.json_response(body, status=status)
        response.force_close()
        return response

    def send_stalled(self, now: float) -> float:
        """Seconds for which queued response bytes have not been acknowledged (0 when
        nothing is queued or the client is reading)."""
        transport = self.transport
        if transport is None or _unsent(transport) == 0:
            self._acked, self._acked_at = None, now
            return 0.0
        acked = _bytes_acked(transport)
        if acked is None or acked != self._acked:
            self._acked, self._acked_at = acked, now
            return 0.0
        return now - self._acked_at

    def drop(self, answer: bytes | None = None) -> None:
        """Close the connection, after ``answer`` if given; abort when busy."""
        transport = self.transport
        if transport is None:
            return
        if self.state is State.BUSY:
            # A handler blocked in loop.sendfile on this socket would wait for ever once
            # the socket is gone (asyncio drops no writer it did not add): cancel it.
            task = self._task_handler
            transport.abort()
            if task is not None:
                task.cancel()
            return
        if answer is not None:
            transport.write(answer)
        self.force_close()


class GuardedServer(web.Server):
    """aiohttp's low-level server with :class:`GuardedRequestHandler` as its protocol."""

    def __init__(self, guard: ConnectionGuard, inner: web.Server) -> None:
        # The application's server, rebuilt with the same handler, factory and options
        # (``_kwargs``: what AppRunner passes on to every RequestHandler).
        super().__init__(
            self._check_version(inner.request_handler),
            request_factory=inner.request_factory,
            handler_cancellation=inner.handler_cancellation,
            loop=asyncio.get_running_loop(),
            **inner._kwargs,
        )
        self.guard = guard
        self.request_factory = self._start_request(inner.request_factory)

    def __call__(self) -> RequestHandler:
        return GuardedRequestHandler(self, self.guard, loop=self._loop, **self._kwargs)

    @staticmethod
    def _start_request(factory: Any) -> Any:
        def start(
            message: RawRequestMessage,
            payload: StreamReader,
            protocol: RequestHandler,
            writer: AbstractStreamWriter,
            task: asyncio.Task[None],
        ) -> web.BaseRequest:
            if isinstance(protocol, GuardedRequestHandler):
                protocol.request_started()
            unsupported = None
            if message.version.major != 1:
                unsupported = f"{message.version.major}.{message.version.minor}"
                message = message._replace(version=HttpVersion11, should_close=True)
            request: web.BaseRequest = factory(message, payload, protocol, writer, task)
            if unsupported is not None:
                request[UNSUPPORTED_VERSION_KEY] = unsupported
            return request

        return start

    @staticmethod
    def _check_version(
        handler: Callable[[web.BaseRequest], Awaitable[web.StreamResponse]],
    ) -> Callable[[web.BaseRequest], Awaitable[web.StreamResponse]]:
        # A plain function handing on the handler's awaitable: no coroutine of its own
        # per request.
        def handle(request: web.BaseRequest) -> Awaitable[web.StreamResponse]:
            version = request.get(UNSUPPORTED_VERSION_KEY)
            if version is not None:
                return _unsupported_version(version)
            return handler(request)

        return handle


async def _unsupported_version(version: str) -> web.StreamResponse:
    body = {
        "errors": [
            {
                "code": "UNSUPPORTED",
                "message": f"HTTP/{version} is not supported; use HTTP/1.1",
                "detail": None,
            }
        ]
    }
    response = web.json_response(
        body, status=505, headers={"Docker-Distribution-API-Version": "registry/2.0"}
    )
    response.force_close()
    return response


class GuardedAppRunner(web.AppRunner):
    """``web.AppRunner`` whose server is a :class:`GuardedServer` for ``guard``."""

    def __init__(self, app: web.Application, guard: ConnectionGuard, **kwargs: Any) -> None:
        # aiohttp's own keep-alive timer is only a backstop behind the guard's deadlines.
        backstop = guard.keepalive_timeout + 2 * guard.header_timeout + 3600
        kwargs.setdefault("keepalive_timeout", backstop)
        super().__init__(app, **kwargs)
        self.guard = guard

    async def _make_server(self) -> web.Server:
        return GuardedServer(self.guard, await super()._make_server())

    async def setup(self) -> None:
        await super().setup()
        self.guard.start()

    async def cleanup(self) -> None:
        await self.guard.close()
        await super().cleanup()
