"""UpstreamHealth: the breaker as the upstream sees it (up/down/probing, 503 with
Retry-After while down), the rate-limit budget (header parsing, the floor, the window)
and the readiness report. Time is a clock the test moves."""

from __future__ import annotations

import itertools
import logging
from collections.abc import AsyncIterator

import pytest
from prometheus_client import REGISTRY
from pytest_aiohttp import AiohttpServer

from proxy.errors import (
    Denied,
    ManifestUnknown,
    TooManyRequests,
    UpstreamError,
    UpstreamUnavailable,
)
from proxy.settings import UpstreamSettings
from proxy.upstream.client import UpstreamClient
from proxy.upstream.health import (
    DEFAULT_WINDOW,
    DOWN,
    PROBING,
    UP,
    Budget,
    UpstreamHealth,
    parse_ratelimit,
)
from tests.unit.clock import Clock
from tests.unit.fake_registry import Failure, FakeRegistry

COOLDOWN = 30.0
FLOOR = 10
_names = itertools.count()


@pytest.fixture
def clock() -> Clock:
    return Clock(1_000.0)


@pytest.fixture
def health(clock: Clock) -> UpstreamHealth:
    # A name of its own per test: the gauges are process-wide.
    return UpstreamHealth(
        f"up{next(_names)}", failures=3, cooldown=COOLDOWN, budget_floor=FLOOR, clock=clock
    )


def gauge(metric: str, upstream: str) -> float | None:
    return REGISTRY.get_sample_value(f"registry_proxy_{metric}", {"upstream": upstream})


def mark_down(health: UpstreamHealth) -> None:
    for i in range(3):
        health.failure(f"ClientConnectorError {i}")
    assert health.state == DOWN


# --- parse_ratelimit ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("76;w=21600", (76, 21600.0)),
        ("100;w=21600", (100, 21600.0)),
        ("0;w=60", (0, 60.0)),
        ("76", (76, None)),
        (" 76 ; w = 21600", (76, 21600.0)),
        ("76;w=21600;comment=x", (76, 21600.0)),
        ("76;burst=5", (76, None)),
    ],
)
def test_parse_ratelimit(value: str, expected: tuple[int, float | None]) -> None:
    assert parse_ratelimit(value) == expected


@pytest.mark.parametrize("value", [None, "", "none", "-1;w=60", ";w=60", "abc"])
def test_parse_ratelimit_of_absent_or_unreadable_is_none(value: str | None) -> None:
    assert parse_ratelimit(value) is None


# --- breaker ------------------------------------------------------------------------------


def test_starts_up_and_check_passes(health: UpstreamHealth) -> None:
    assert health.state == UP
    health.check()
    assert gauge("upstream_up", health.name) == 1.0


def test_marked_down_after_consecutive_failures(health: UpstreamHealth) -> None:
    health.failure("HTTP 502")
    health.failure("HTTP 503")
    assert health.state == UP
    health.check()

    health.failure("TimeoutError")

    assert health.state == DOWN
    assert health.last_error == "TimeoutError"
    assert gauge("upstream_up", health.name) == 0.0


def test_a_success_resets_the_count(health: UpstreamHealth) -> None:
    health.failure("HTTP 502")
    health.failure("HTTP 502")
    health.success()
    health.failure("HTTP 502")
    health.failure("HTTP 502")
    assert health.state == UP


def test_check_while_down_raises_503_with_retry_after(health: UpstreamHealth, clock: Clock) -> None:
    mark_down(health)
    clock.now += 10.5

    with pytest.raises(UpstreamUnavailable) as info:
        health.check()

    assert info.value.status == 503
    assert info.value.headers == {"Retry-After": "20"}
    assert health.name in info.value.message
    assert "ClientConnectorError 2" in info.value.message


def test_after_the_cooldown_one_request_probes(health: UpstreamHealth, clock: Clock) -> None:
    mark_down(health)
    clock.now += COOLDOWN

    health.check()  # the probe

    assert health.state == PROBING
    assert gauge("upstream_up", health.name) == 0.0
    with pytest.raises(UpstreamUnavailable):
        health.check()  # everyone else still waits


def test_probe_success_marks_it_up(
    health: UpstreamHealth, clock: Clock, caplog: pytest.LogCaptureFixture
) -> None:
    mark_down(health)
    clock.now += COOLDOWN
    health.check()
    caplog.clear()

    with caplog.at_level(logging.INFO, logger="proxy.upstream.health"):
        health.success()

    assert health.state == UP
    assert gauge("upstream_up", health.name) == 1.0
    health.check()
    assert [r.getMessage() for r in caplog.records] == [
        f"upstream {health.name} is reachable again"
    ]


def test_probe_failure_marks_it_down_again(health: UpstreamHealth, clock: Clock) -> None:
    mark_down(health)
    clock.now += COOLDOWN
    health.check()

    health.failure("HTTP 500")

    assert health.state == DOWN
    assert health.last_error == "HTTP 500"
    with pytest.raises(UpstreamUnavailable) as info:
        health.check()
    assert info.value.headers == {"Retry-After": "30"}


def test_marked_down_is_logged_once(
    health: UpstreamHealth, clock: Clock, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="proxy.upstream.health"):
        mark_down(health)
        clock.now += COOLDOWN
        health.check()
        health.failure("again")  # probing -> down: not a new outage

    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert [r.getMessage() for r in warnings] == [
        f"upstream {health.name} marked down (ClientConnectorError 2)"
    ]


# --- budget -------------------------------------------------------------------------------


def test_no_ratelimit_headers_no_budget(health: UpstreamHealth) -> None:
    health.observe({"content-type": "application/json"})
    health.observe({"ratelimit-limit": "100;w=21600"})  # remaining is what counts
    assert health.budget is None
    assert health.budget_low() is False
    health.refuse_cold_pull()


def test_observe_keeps_the_latest_values_and_exports_them(
    health: UpstreamHealth, clock: Clock
) -> None:
    health.observe({"ratelimit-limit": "100;w=21600", "ratelimit-remaining": "76;w=21600"})
    assert health.budget == Budget(100, 76, 21600.0, clock.now)
    clock.now += 5
    health.observe({"ratelimit-limit": "100;w=21600", "ratelimit-remaining": "75;w=21600"})

    assert health.budget == Budget(100, 75, 21600.0, clock.now)
    assert gauge("upstream_ratelimit_remaining", health.name) == 75.0
    assert gauge("upstream_ratelimit_limit", health.name) == 100.0


def test_window_comes_from_remaining_then_limit_then_the_default(health: UpstreamHealth) -> None:
    health.observe({"ratelimit-remaining": "5;w=60", "ratelimit-limit": "100;w=3600"})
    assert health.budget is not None and health.budget.window == 60.0
    health.observe({"ratelimit-remaining": "5", "ratelimit-limit": "100;w=3600"})
    assert health.budget is not None and health.budget.window == 3600.0
    health.observe({"ratelimit-remaining": "5"})
    assert health.budget is not None
    assert health.budget.window == DEFAULT_WINDOW
    assert health.budget.limit is None


def test_unreadable_remaining_keeps_the_last_budget(health: UpstreamHealth) -> None:
    health.observe({"ratelimit-remaining": "3;w=600"})
    before = health.budget
    health.observe({"ratelimit-remaining": "garbage"})
    assert health.budget == before
    assert health.budget_low() is True


@pytest.mark.parametrize(
    ("remaining", "low"), [(0, True), (FLOOR - 1, True), (FLOOR, False), (FLOOR + 50, False)]
)
def test_low_means_under_the_floor(health: UpstreamHealth, remaining: int, low: bool) -> None:
    health.observe({"ratelimit-remaining": f"{remaining};w=21600"})
    assert health.budget_low() is low


def test_a_floor_of_zero_never_reports_low(clock: Clock) -> None:
    health = UpstreamHealth("nofloor", failures=3, cooldown=COOLDOWN, budget_floor=0, clock=clock)
    health.observe({"ratelimit-remaining": "0;w=21600"})
    assert health.budget_low() is False
    health.refuse_cold_pull()


def test_low_lasts_until_the_window_has_passed(health: UpstreamHealth, clock: Clock) -> None:
    health.observe({"ratelimit-remaining": "2;w=600"})
    clock.now += 599.9
    assert health.budget_low() is True
    clock.now += 0.1
    assert health.budget_low() is False
    health.refuse_cold_pull()


def test_a_fresh_budget_over_the_floor_ends_low_at_once(health: UpstreamHealth) -> None:
    health.observe({"ratelimit-remaining": "2;w=600"})
    assert health.budget_low() is True
    health.observe({"ratelimit-remaining": "100;w=600"})
    assert health.budget_low() is False


def test_refuse_cold_pull_raises_429_until_the_window_ends(
    health: UpstreamHealth, clock: Clock
) -> None:
    health.observe({"ratelimit-remaining": "3;w=600"})
    clock.now += 100.5

    with pytest.raises(TooManyRequests) as info:
        health.refuse_cold_pull()

    assert info.value.status == 429
    assert info.value.headers == {"Retry-After": "500"}
    assert "3 pulls left" in info.value.message
    clock.now += 499.4
    with pytest.raises(TooManyRequests) as info:
        health.refuse_cold_pull()
    assert info.value.headers == {"Retry-After": "1"}


# --- report -------------------------------------------------------------------------------


def test_report_when_up_and_nothing_observed(health: UpstreamHealth) -> None:
    assert health.report() == {"state": UP}


def test_report_names_the_last_error_only_while_not_up(
    health: UpstreamHealth, clock: Clock
) -> None:
    health.failure("HTTP 502")
    assert health.report() == {"state": UP}  # one failure: still up, nothing to say

    mark_down(health)
    assert health.report() == {"state": DOWN, "last_error": "ClientConnectorError 2"}

    clock.now += COOLDOWN
    health.check()
    assert health.report() == {"state": PROBING, "last_error": "ClientConnectorError 2"}

    health.success()
    assert health.report() == {"state": UP}


def test_report_carries_the_budget(health: UpstreamHealth, clock: Clock) -> None:
    health.observe({"ratelimit-remaining": "4;w=600"})
    assert health.report() == {"state": UP, "ratelimit_remaining": 4, "ratelimit_low": True}
    clock.now += 600
    assert health.report() == {"state": UP, "ratelimit_remaining": 4, "ratelimit_low": False}


# --- what counts as a failure (as UpstreamClient reports it) -------------------------------


@pytest.fixture
async def clients() -> AsyncIterator[list[UpstreamClient]]:
    made: list[UpstreamClient] = []
    yield made
    for client in made:
        await client.close()


async def client_for(url: str, clients: list[UpstreamClient]) -> UpstreamClient:
    """A client whose first counted failure marks the upstream down (no retries)."""
    client = UpstreamClient.create(
        UpstreamSettings(
            name=f"up{next(_names)}", url=url, retries=0, failure_threshold=1, cooldown=COOLDOWN
        )
    )
    clients.append(client)
    return client


@pytest.mark.parametrize("status", [502, 503, 504])
async def test_an_unwell_5xx_answer_is_a_failure(
    aiohttp_server: AiohttpServer, clients: list[UpstreamClient], status: int
) -> None:
    registry = FakeRegistry()
    registry.failure = Failure(status)
    server = await aiohttp_server(registry.app())
    client = await client_for(f"http://{server.host}:{server.port}", clients)

    with pytest.raises(UpstreamError):
        await client.get_manifest("team/app", "v1", None)

    assert client.health.state == DOWN
    assert client.health.last_error == f"HTTP {status}"
    # Marked down: the next request is refused without reaching the upstream.
    with pytest.raises(UpstreamUnavailable):
        await client.get_manifest("team/app", "v1", None)
    assert len(registry.v2_requests()) == 1


@pytest.mark.parametrize("status", [500, 501, 505])
async def test_a_5xx_this_request_provoked_is_no_failure(
    aiohttp_server: AiohttpServer, clients: list[UpstreamClient], status: int
) -> None:
    """docker-registry answers 500 for some names it chokes on: however often a client
    sends one, the upstream is not marked down for everyone (issue: breaker abuse)."""
    registry = FakeRegistry()
    registry.failure = Failure(status)
    server = await aiohttp_server(registry.app())
    client = await client_for(f"http://{server.host}:{server.port}", clients)

    for _ in range(5):
        with pytest.raises(UpstreamError):
            await client.get_manifest("team/app", "v1", None)

    assert client.health.state == UP
    assert client.health.last_error is None
    assert len(registry.v2_requests()) == 5, "every request still reached the upstream"


async def test_a_refused_connection_is_a_failure(
    clients: list[UpstreamClient], unused_port: int
) -> None:
    client = await client_for(f"http://127.0.0.1:{unused_port}", clients)

    with pytest.raises(UpstreamUnavailable):
        await client.get_manifest("team/app", "v1", None)

    assert client.health.state == DOWN
    assert client.health.last_error is not None


@pytest.mark.parametrize(("status", "error"), [(404, None), (403, Denied), (429, TooManyRequests)])
async def test_any_other_answer_is_a_success(
    aiohttp_server: AiohttpServer,
    clients: list[UpstreamClient],
    status: int,
    error: type[Exception] | None,
) -> None:
    registry = FakeRegistry()
    if error is not None:
        registry.failure = Failure(status, {"ratelimit-remaining": "0;w=21600"})
    server = await aiohttp_server(registry.app())
    client = await client_for(f"http://{server.host}:{server.port}", clients)

    with pytest.raises(error or ManifestUnknown):
        await client.get_manifest("team/app", "v1", None)
    with pytest.raises(error or ManifestUnknown):
        await client.get_manifest("team/app", "v1", None)

    assert client.health.state == UP
    assert client.health.last_error is None
    assert len(registry.v2_requests()) == 2
    if error is not None:  # the answer's rate-limit headers are read whatever its status
        assert client.health.budget is not None
        assert client.health.budget.remaining == 0
