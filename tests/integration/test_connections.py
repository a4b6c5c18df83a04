"""Slow and hostile clients on raw sockets: request-header and keep-alive timeouts, the
connection bound with shedding, stalled readers, and HTTP versions other than 1.x.

The proxy is served with the runner ``proxy.app.run`` uses (the connection guard in front),
with short timeouts so the deadlines pass within the test; every wait is a deadline on a
condition (the server closing, a counter moving), never a sleep standing in for one.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest
from prometheus_client import REGISTRY

from proxy.api.connections import GuardedAppRunner
from tests.rig import oci
from tests.rig.distribution import push_blob, push_image, random_blob, raw_request
from tests.rig.faults import FaultProxy, manifests
from tests.rig.process import async_wait_until
from tests.rig.proxy_app import ProxyFactory, ProxyUnderTest
from tests.rig.proxy_process import ProxyProcess
from tests.rig.recording import PassThrough
from tests.rig.registry import Registry

pytestmark = pytest.mark.integration

MiB = 1 << 20
CLOSE_DEADLINE = 10.0


@dataclass
class Client:
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def read_until_closed(self, within: float = CLOSE_DEADLINE) -> bytes:
        """Everything the server sends until it closes; AssertionError if it does not
        close within ``within`` seconds."""
        try:
            async with asyncio.timeout(within):
                return await self.reader.read()
        except TimeoutError:
            raise AssertionError(f"the server kept the connection open for {within}s") from None
        except ConnectionResetError:
            return b""

    def close(self) -> None:
        self.writer.close()


@contextlib.asynccontextmanager
async def clients(host: str, count: int) -> AsyncIterator[list[Client]]:
    address, _, port = host.rpartition(":")
    opened: list[Client] = []
    try:
        for _ in range(count):
            opened.append(Client(*await asyncio.open_connection(address, int(port))))
        yield opened
    finally:
        for client in opened:
            client.close()


def guard_of(proxy: ProxyUnderTest) -> GuardedAppRunner:
    runner = proxy.server._runner
    assert isinstance(runner, GuardedAppRunner), "the proxy is not served by its own runner"
    return runner


async def guarded_proxy(
    factory: ProxyFactory, upstream_url: str, **server: object
) -> ProxyUnderTest:
    return await factory(upstream_url, sections={"server": server})


def closed_for(reason: str) -> float:
    value = REGISTRY.get_sample_value(
        "registry_proxy_client_connections_closed_total", {"reason": reason}
    )
    return value or 0.0


def status_line(data: bytes) -> str:
    return data.split(b"\r\n", 1)[0].decode("latin-1")


def error_code(data: bytes) -> str:
    body = data.partition(b"\r\n\r\n")[2]
    return str(json.loads(body)["errors"][0]["code"])


@pytest.mark.parametrize(
    "request_line",
    [b"GET /v2/ HTTP/2.0", b"GET /v2/ HTTP/0.9", b"GET /v2/library/x/manifests/1 HTTP/2.0"],
)
async def test_a_version_other_than_1x_is_answered_505_over_http_1_1(
    passthrough: PassThrough, proxy: ProxyUnderTest, request_line: bytes
) -> None:
    """The request line's version used to be echoed in the status line (HTTP/2.0 200)."""
    async with clients(proxy.host, 1) as (client,):
        await client.send(request_line + b"\r\nHost: x\r\n\r\n")
        answer = await client.read_until_closed()
    assert status_line(answer) == "HTTP/1.1 505 HTTP Version Not Supported"
    assert error_code(answer) == "UNSUPPORTED"
    assert passthrough.log.exchanges == [], "nothing reaches the upstream"


async def test_http_1_0_and_1_1_are_answered_as_before(proxy: ProxyUnderTest) -> None:
    for version in (b"1.0", b"1.1"):
        async with clients(proxy.host, 1) as (client,):
            request = b"GET /v2/ HTTP/" + version + b"\r\nHost: x\r\nConnection: close\r\n\r\n"
            await client.send(request)
            answer = await client.read_until_closed()
        assert status_line(answer) == f"HTTP/{version.decode()} 200 OK"


async def test_partial_request_headers_are_answered_408_at_the_header_timeout(
    passthrough: PassThrough, proxy_factory: ProxyFactory
) -> None:
    """The adversarial run's 300 stalled partial request lines were open after 20 s."""
    proxy = await guarded_proxy(proxy_factory, passthrough.url, header_timeout="1s")
    started = asyncio.get_running_loop().time()
    async with clients(proxy.host, 50) as stalled:
        for client in stalled:
            await client.send(b"GET /v2/library/x/manifests/la")
        answers = await asyncio.gather(*(c.read_until_closed() for c in stalled))
    elapsed = asyncio.get_running_loop().time() - started
    assert {status_line(a) for a in answers} == {"HTTP/1.1 408 Request Timeout"}
    assert {error_code(a) for a in answers} == {"UNSUPPORTED"}
    assert 1.0 <= elapsed < CLOSE_DEADLINE
    assert passthrough.log.exchanges == []


async def test_a_trickled_header_gets_no_extension(
    passthrough: PassThrough, proxy_factory: ProxyFactory
) -> None:
    """Slowloris: one byte every 50 ms never completes the header; the deadline runs from
    the first byte, so the connection is closed although bytes keep coming."""
    proxy = await guarded_proxy(proxy_factory, passthrough.url, header_timeout="1s")
    async with clients(proxy.host, 1) as (client,):
        closed = asyncio.create_task(client.read_until_closed())
        sent = 0
        line = b"GET /v2/" + b"a" * 4000
        while not closed.done() and sent < len(line):
            with contextlib.suppress(ConnectionError):
                await client.send(line[sent : sent + 1])
            sent += 1
            await asyncio.sleep(0.05)  # the client's pace, not a synchronisation
        answer = await closed
    assert status_line(answer) == "HTTP/1.1 408 Request Timeout"
    assert sent < 100, f"{sent} bytes trickled in before the connection was closed"


async def test_an_idle_keepalive_connection_is_closed_at_the_keepalive_timeout(
    passthrough: PassThrough, proxy_factory: ProxyFactory
) -> None:
    proxy = await guarded_proxy(proxy_factory, passthrough.url, keepalive_timeout="1s")
    async with clients(proxy.host, 1) as (client,):
        await client.send(b"GET /v2/ HTTP/1.1\r\nHost: x\r\n\r\n")
        head = await client.reader.readuntil(b"\r\n\r\n")
        assert status_line(head) == "HTTP/1.1 200 OK"
        length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
        await client.reader.readexactly(length)
        # A second request on the same connection is still served before the timeout.
        await client.send(b"GET /v2/ HTTP/1.1\r\nHost: x\r\n\r\n")
        assert status_line(await client.reader.readuntil(b"\r\n\r\n")) == "HTTP/1.1 200 OK"
        await client.reader.readexactly(length)
        assert await client.read_until_closed() == b"", "closed without another answer"


async def test_idle_connections_at_the_bound_do_not_lock_out_a_new_client(
    passthrough: PassThrough, proxy_factory: ProxyFactory
) -> None:
    """A few hundred connections that sent only ``GET /v2/`` from one address: the oldest
    are shed, so the next client is answered at once and the bound holds."""
    proxy = await guarded_proxy(proxy_factory, passthrough.url, max_connections=50)
    guard = guard_of(proxy).guard
    async with clients(proxy.host, 300) as idle:
        for client in idle:
            await client.send(b"GET /v2/")
        await async_wait_until(
            lambda: len(guard) <= 50, within=CLOSE_DEADLINE, what="the bound to hold"
        )
        response = await raw_request(proxy.host, "GET", "/v2/", time_limit=5)
        assert response.status == 200
        assert len(guard) <= 50
        # The newest stalled clients are the ones still open; the oldest were shed.
        shed = await asyncio.gather(*(c.read_until_closed(within=5) for c in idle[:200]))
        assert len(shed) == 200


async def test_a_client_that_stops_reading_is_dropped_at_the_send_timeout(
    registry: Registry,
    passthrough: PassThrough,
    proxy_factory: ProxyFactory,
    http: aiohttp.ClientSession,
) -> None:
    data, digest = random_blob(48 * MiB)
    await push_blob(http, registry.url, "big/stall", data)
    proxy = await guarded_proxy(proxy_factory, passthrough.url, send_timeout="1s")
    before = closed_for("send_timeout")
    async with http.get(f"{proxy.url}/v2/big/stall/blobs/{digest}") as warm:
        assert (await warm.read()) == data  # cached now: the stalled GET is a sendfile
    async with clients(proxy.host, 1) as (client,):
        await client.send(f"GET /v2/big/stall/blobs/{digest} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        await client.reader.readuntil(b"\r\n\r\n")  # headers in; then the client stops reading
        await async_wait_until(
            lambda: closed_for("send_timeout") == before + 1,
            within=CLOSE_DEADLINE,
            what="the stalled reader dropped",
        )
        assert await client.read_until_closed(within=5) is not None  # the socket is closed
        # A reading client is still served the whole blob meanwhile.
        async with http.get(f"{proxy.url}/v2/big/stall/blobs/{digest}") as response:
            assert len(await response.read()) == len(data)


def child_proxy(workdir: Path, upstream_url: str, **server: object) -> ProxyProcess:
    mapping: dict[str, object] = {
        "log_level": "info",
        "cache": {"dir": str(workdir / "cache")},
        "upstreams": [{"name": "up", "url": upstream_url, "default": True}],
    }
    if server:
        mapping["server"] = server
    return ProxyProcess(workdir, mapping, open_files=1024)


async def test_a_thousand_idle_connections_under_ulimit_1024_lock_nobody_out(
    tmp_path: Path, registry: Registry, passthrough: PassThrough
) -> None:
    """The adversarial run's repro: under ``ulimit -n 1024``, 1,100 connections that each
    sent only ``GET /v2/`` made ``GET /v2/`` and cached manifests time out, and the log got
    a traceback per failed accept. max_connections is derived from the limit now, and
    the oldest stalled connections are shed for new ones."""
    async with aiohttp.ClientSession() as http:
        image = await push_image(http, registry.url, tmp_path / "image", "team/app", "v1")
    accept = {"Accept": oci.OCI_MANIFEST}
    with child_proxy(tmp_path / "proxy", passthrough.url) as proxy:
        warm = await raw_request(proxy.host, "GET", "/v2/team/app/manifests/v1", headers=accept)
        assert warm.status == 200
        async with clients(proxy.host, 1100) as idle:
            for client in idle:
                await client.send(b"GET /v2/")
            for _ in range(3):
                base = await raw_request(proxy.host, "GET", "/v2/", time_limit=5)
                assert base.status == 200
                cached = await raw_request(
                    proxy.host, "GET", "/v2/team/app/manifests/v1", headers=accept, time_limit=5
                )
                assert cached.status == 200 and cached.body == image.manifest_bytes
            assert proxy.metric("registry_proxy_client_connections") <= proxy.metric(
                "registry_proxy_client_connections_limit"
            )
        assert proxy.open_fds() < 1024
        log = proxy.log_text()
    assert log.count("Traceback") == 0, log[-3000:]


async def test_out_of_file_descriptors_is_logged_once_per_interval_and_counted(
    tmp_path: Path, passthrough: PassThrough
) -> None:
    """With max_connections set above what the open-files limit allows, accept fails
    with EMFILE: counted, one log line per interval, idle connections shed so the next
    client is served."""
    with child_proxy(tmp_path / "proxy", passthrough.url, max_connections=5000) as proxy:
        async with clients(proxy.host, 1100) as idle:
            for client in idle:
                with contextlib.suppress(ConnectionError):
                    await client.send(b"GET /v2/")
            base = await raw_request(proxy.host, "GET", "/v2/", time_limit=10)
            assert base.status == 200
            assert proxy.metric("registry_proxy_accept_errors_total") > 0
        log = proxy.log_text()
    assert 1 <= log.count("accepting connections fails") <= 2, log[-3000:]
    assert log.count("Traceback") == 0, log[-3000:]


@pytest.mark.parametrize(
    "garbage",
    [b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n", b"GET /v2/ HTTP/3.7\r\n\r\n"],
)
async def test_a_malformed_request_gets_an_oci_body_and_no_traceback(
    proxy: ProxyUnderTest, garbage: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    """skopeo's TLS ClientHello on a plain-HTTP port, a version aiohttp cannot parse:
    each used to log a traceback at error level and answer a text/plain 400."""
    async with clients(proxy.host, 1) as (client,):
        await client.send(garbage)
        answer = await client.read_until_closed()
    assert status_line(answer).split(" ", 1)[1] == "400 Bad Request"
    assert error_code(answer) == "UNSUPPORTED"
    assert [r for r in caplog.records if r.levelname == "ERROR"] == []


async def test_at_the_bound_with_every_connection_busy_a_new_one_gets_503(
    fault_proxy: FaultProxy, proxy_factory: ProxyFactory
) -> None:
    """Busy connections are never shed: the newcomer is told to come back."""
    proxy = await guarded_proxy(proxy_factory, fault_proxy.url, max_connections=2)
    stall = fault_proxy.stall(manifests("GET"))
    async with clients(proxy.host, 2) as busy:
        for n, client in enumerate(busy):  # two tags: coalescing would make it one
            await client.send(
                f"GET /v2/team/app/manifests/v{n} HTTP/1.1\r\nHost: x\r\n\r\n".encode()
            )
        await async_wait_until(lambda: stall.held == 2, within=10, what="two requests held")
        async with clients(proxy.host, 1) as (late,):
            answer = await late.read_until_closed()
        assert status_line(answer) == "HTTP/1.1 503 Service Unavailable"
        assert b"Retry-After: 1" in answer and error_code(answer) == "UNAVAILABLE"
        fault_proxy.release()
        for client in busy:
            head = await client.reader.readuntil(b"\r\n\r\n")
            assert status_line(head).startswith("HTTP/1.1 ")
