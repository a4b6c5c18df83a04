"""Limits: GCRA buckets (in memory with a clock the test moves, and the Redis Lua script
under fakeredis with lupa), Docker Hub's rate-limit headers, the 429s and usage counters."""

from __future__ import annotations

import math

import fakeredis
import pytest
from prometheus_client import REGISTRY

from proxy.access.limits import Bucket, Limits, QuotaGate, Usage, Verdict
from proxy.cache.redis import RedisLayer
from proxy.errors import TooManyRequests
from proxy.settings import Rate
from tests.unit.clock import Clock

HOUR = 3600.0


def sample(name: str, labels: dict[str, str]) -> float:
    return REGISTRY.get_sample_value(f"registry_proxy_{name}", labels) or 0.0


@pytest.fixture
def clock() -> Clock:
    return Clock()


def bucket(amount: int, period: float, clock: Clock, redis: RedisLayer | None = None) -> Bucket:
    return Bucket("requests", Rate(amount, period), redis, clock=clock)


# --- the bucket, in memory -------------------------------------------------------------------


async def test_a_burst_of_amount_then_refusal(clock: Clock) -> None:
    limit = bucket(5, 60, clock)

    verdicts = [await limit.take("k") for _ in range(5)]
    refused = await limit.take("k")

    assert all(v.allowed for v in verdicts)
    assert [v.remaining for v in verdicts] == [4, 3, 2, 1, 0]
    assert not refused.allowed
    assert refused.remaining == 0
    assert refused.retry_after == pytest.approx(60 / 5)
    assert (refused.limit, refused.period) == (5, 60)


@pytest.mark.parametrize("now", [1_000_000.0, 1_733_000_000.123])
@pytest.mark.parametrize(("amount", "period"), [(3, 1.0), (7, 60.0), (50, 1.0), (1000, 21600.0)])
async def test_the_burst_is_exactly_amount_at_any_time(
    now: float, amount: int, period: float
) -> None:
    # Time as floats drifts by an ulp or so per unit taken: never by a whole unit.
    limit = bucket(amount, period, Clock(now))

    verdicts = [await limit.take("k") for _ in range(amount + 1)]

    assert [v.allowed for v in verdicts] == [True] * amount + [False]
    assert [v.remaining for v in verdicts[:amount]] == list(range(amount - 1, -1, -1))
    assert verdicts[-1].retry_after == pytest.approx(period / amount, rel=1e-3)


async def test_one_unit_comes_back_per_interval(clock: Clock) -> None:
    limit = bucket(4, 60, clock)
    for _ in range(4):
        await limit.take("k")

    clock.advance(15 - 0.01)
    early = await limit.take("k")
    clock.advance(0.01)
    on_time = await limit.take("k")
    again = await limit.take("k")

    assert not early.allowed
    assert early.retry_after == pytest.approx(0.01)
    assert on_time.allowed and on_time.remaining == 0
    assert not again.allowed


async def test_after_a_full_period_the_whole_burst_is_back(clock: Clock) -> None:
    limit = bucket(3, 60, clock)
    for _ in range(3):
        await limit.take("k")

    clock.advance(600)

    assert (await limit.check("k")).remaining == 3
    assert [(await limit.take("k")).allowed for _ in range(4)] == [True, True, True, False]


async def test_keys_are_independent(clock: Clock) -> None:
    limit = bucket(1, 60, clock)

    assert (await limit.take("a")).allowed
    assert not (await limit.take("a")).allowed
    assert (await limit.take("b")).allowed


async def test_check_takes_nothing(clock: Clock) -> None:
    limit = bucket(2, 60, clock)

    checks = [await limit.check("k") for _ in range(10)]
    first = await limit.take("k")
    second = await limit.take("k")
    full = await limit.check("k")

    assert all(c.allowed and c.remaining == 2 for c in checks)
    assert first.allowed and second.allowed
    assert not full.allowed
    assert full.retry_after == pytest.approx(30)
    assert not (await limit.take("k")).allowed  # the refused check took nothing either


async def test_charge_always_counts(clock: Clock) -> None:
    limit = bucket(100, 100, clock)  # 100 bytes per 100 s: one a second

    await limit.charge("k", 80)
    assert (await limit.check("k")).remaining == 20
    await limit.charge("k", 80)  # beyond the limit: counted all the same
    over = await limit.check("k")
    await limit.charge("k", 40)
    further = await limit.check("k")

    assert not over.allowed and not further.allowed
    assert over.retry_after == pytest.approx(61)  # 160 used: 60 over, and room for 1 more
    assert further.retry_after == pytest.approx(101)
    clock.advance(101)
    assert (await limit.check("k")).allowed


async def test_a_cost_above_the_amount_is_never_admitted(clock: Clock) -> None:
    limit = bucket(10, 10, clock)

    verdict = await limit.take("k", cost=11)

    assert not verdict.allowed
    assert (await limit.check("k")).remaining == 10


# --- the headers ---------------------------------------------------------------------------


def test_headers_of_an_allowed_verdict() -> None:
    verdict = Verdict(allowed=True, limit=100, remaining=37, retry_after=0, period=21600)

    assert verdict.headers() == {
        "RateLimit-Limit": "100;w=21600",
        "RateLimit-Remaining": "37;w=21600",
    }


def test_headers_of_a_refusal() -> None:
    verdict = Verdict(allowed=False, limit=5, remaining=-3, retry_after=12.2, period=60)

    assert verdict.headers() == {
        "RateLimit-Limit": "5;w=60",
        "RateLimit-Remaining": "0;w=60",
        "Retry-After": "13",
    }


@pytest.mark.parametrize(
    ("retry_after", "period", "header", "window"),
    [(0.0001, 0.5, "1", "1"), (59.0, 1.4, "59", "1"), (0, 2.6, "1", "3")],
)
def test_headers_round_up_and_are_never_zero(
    retry_after: float, period: float, header: str, window: str
) -> None:
    verdict = Verdict(allowed=False, limit=1, remaining=0, retry_after=retry_after, period=period)

    headers = verdict.headers()

    assert headers["Retry-After"] == header
    assert headers["RateLimit-Limit"] == f"1;w={window}"


# --- Limits -------------------------------------------------------------------------------------


def limits(
    requests: Rate | None = None,
    cold_fetches: Rate | None = None,
    cold_bytes: Rate | None = None,
) -> Limits:
    return Limits(requests, cold_fetches, cold_bytes, None, Usage(None))


async def test_admit_request_refuses_with_the_headers_and_counts() -> None:
    table = limits(requests=Rate(2, HOUR))
    before = sample("limit_rejections_total", {"limit": "requests", "identity": "t-req"})

    await table.admit_request("user:t-req", "t-req")
    await table.admit_request("user:t-req", "t-req")
    with pytest.raises(TooManyRequests) as info:
        await table.admit_request("user:t-req", "t-req")

    error = info.value
    assert error.status == 429
    assert error.headers["RateLimit-Limit"] == "2;w=3600"
    assert error.headers["RateLimit-Remaining"] == "0;w=3600"
    assert math.isclose(int(error.headers["Retry-After"]), HOUR / 2, abs_tol=2)
    assert "2 per 3600s" in error.message
    after = sample("limit_rejections_total", {"limit": "requests", "identity": "t-req"})
    assert after == before + 1
    (usage,) = await table.usage.top(1)
    assert usage["limited"] == 1


async def test_without_limits_everything_is_admitted() -> None:
    table = limits()

    for _ in range(100):
        await table.admit_request("ip:192.0.2.1", "anonymous")
        await table.admit_cold_fetch("ip:192.0.2.1", "anonymous")
    await table.charge_cold_bytes("ip:192.0.2.1", "anonymous", 10**12)

    assert not table.has_quotas
    (usage,) = await table.usage.top(1)
    assert usage["cold_fetches"] == 100
    assert usage["limited"] == 0


async def test_admit_cold_fetch_takes_one_fetch() -> None:
    table = limits(cold_fetches=Rate(1, HOUR))
    before = sample("limit_rejections_total", {"limit": "cold_fetches", "identity": "t-cf"})

    await table.admit_cold_fetch("user:t-cf", "t-cf")
    with pytest.raises(TooManyRequests) as info:
        await table.admit_cold_fetch("user:t-cf", "t-cf")

    assert table.has_quotas
    assert info.value.headers["RateLimit-Limit"] == "1;w=3600"
    assert int(info.value.headers["Retry-After"]) > HOUR - 5
    assert sample("limit_rejections_total", {"limit": "cold_fetches", "identity": "t-cf"}) == (
        before + 1
    )
    (usage,) = await table.usage.top(1)
    assert (usage["cold_fetches"], usage["limited"]) == (1, 1)  # only the admitted one


async def test_the_byte_quota_refuses_once_used_up_and_takes_no_fetch() -> None:
    table = limits(cold_fetches=Rate(10, HOUR), cold_bytes=Rate(1000, HOUR))
    gate = QuotaGate(table, "user:t-cb", "t-cb")
    before = sample("limit_rejections_total", {"limit": "cold_bytes", "identity": "t-cb"})

    await gate.admit()
    await gate.charge(600)
    await gate.admit()  # room left: admitted, though the next blob may go beyond
    await gate.charge(600)
    with pytest.raises(TooManyRequests) as info:
        await gate.admit()

    assert info.value.headers["RateLimit-Limit"] == "1000;w=3600"
    assert "byte quota" in info.value.message
    assert sample("limit_rejections_total", {"limit": "cold_bytes", "identity": "t-cb"}) == (
        before + 1
    )
    assert table.cold_fetches is not None
    assert (await table.cold_fetches.check("user:t-cb")).remaining == 8  # the refusal took none


async def test_charging_nothing_or_without_a_byte_quota_does_nothing() -> None:
    table = limits(cold_bytes=Rate(10, HOUR))
    assert table.cold_bytes is not None

    await table.charge_cold_bytes("k", "l", 0)
    await table.charge_cold_bytes("k", "l", -5)

    assert (await table.cold_bytes.check("k")).remaining == 10


# --- usage --------------------------------------------------------------------------------------


async def test_usage_top_orders_by_requests(clock: Clock) -> None:
    usage = Usage(None, clock=clock)
    for key, requests in (("ip:a", 3), ("user:b", 10), ("ip:c", 1), ("user:d", 5)):
        for _ in range(requests):
            usage.add(key, key.split(":")[1], "requests")
    clock.advance(5)
    usage.add("ip:c", "c", "upstream_bytes", 4096)

    top = await usage.top(3)

    assert [entry["identity"] for entry in top] == ["user:b", "user:d", "ip:a"]
    assert top[0]["requests"] == 10 and top[0]["label"] == "b"
    assert top[0]["last_seen"] == clock.now - 5
    every = await usage.top(10)
    assert len(every) == 4
    (c,) = [entry for entry in every if entry["identity"] == "ip:c"]
    assert (c["requests"], c["upstream_bytes"], c["last_seen"]) == (1, 4096, clock.now)


async def test_usage_counts_bounded_metrics() -> None:
    usage = Usage(None)
    before = sample("identity_usage_total", {"identity": "t-use", "counter": "cache_bytes"})
    fetches = sample("identity_usage_total", {"identity": "t-use", "counter": "cold_fetches"})

    usage.add("user:t-use", "t-use", "cache_bytes", 512)
    usage.add("user:t-use", "t-use", "cold_fetches")

    assert sample("identity_usage_total", {"identity": "t-use", "counter": "cache_bytes"}) == (
        before + 512
    )
    counted = sample("identity_usage_total", {"identity": "t-use", "counter": "cold_fetches"})
    assert counted == fetches + 1


# --- Redis: the Lua script under fakeredis (lupa) -------------------------------------------------


@pytest.fixture
def server() -> fakeredis.FakeServer:
    return fakeredis.FakeServer()


def layer(server: fakeredis.FakeServer) -> RedisLayer:
    return RedisLayer(fakeredis.FakeAsyncRedis(server=server))


async def test_the_script_gives_a_burst_then_refusal(
    server: fakeredis.FakeServer, clock: Clock
) -> None:
    limit = bucket(3, HOUR, clock, layer(server))

    verdicts = [await limit.take("k") for _ in range(4)]

    assert [v.allowed for v in verdicts] == [True, True, True, False]
    assert [v.remaining for v in verdicts[:3]] == [2, 1, 0]
    assert verdicts[3].retry_after == pytest.approx(HOUR / 3, abs=5)
    assert verdicts[3].headers()["Retry-After"] in {str(n) for n in range(1195, 1202)}


async def test_replicas_share_the_bucket(server: fakeredis.FakeServer, clock: Clock) -> None:
    one = bucket(2, HOUR, clock, layer(server))
    two = bucket(2, HOUR, clock, layer(server))

    assert (await one.take("k")).allowed
    assert (await two.take("k")).allowed
    assert not (await one.take("k")).allowed
    assert not (await two.take("k")).allowed
    assert (await two.take("other")).allowed


async def test_the_script_check_takes_nothing_and_charge_always_counts(
    server: fakeredis.FakeServer, clock: Clock
) -> None:
    limit = bucket(100, HOUR, clock, layer(server))

    for _ in range(5):
        assert (await limit.check("k")).remaining == 100
    await limit.charge("k", 150)
    full = await limit.check("k")

    assert not full.allowed
    assert full.remaining < 0
    assert full.retry_after == pytest.approx(51 * HOUR / 100, abs=5)
    assert full.headers()["RateLimit-Remaining"] == f"0;w={int(HOUR)}"


async def test_the_script_keys_expire(server: fakeredis.FakeServer, clock: Clock) -> None:
    redis = layer(server)
    limit = bucket(10, 60, clock, redis)

    await limit.take("k")

    ttl = await redis.client.pttl(redis.key("limit", "requests", "k"))
    assert 0 < ttl <= 6000 + 1000 + 100


async def test_the_script_stores_the_arrival_time_at_full_precision(
    server: fakeredis.FakeServer, clock: Clock
) -> None:
    # Lua's tostring keeps 14 digits: about 0.1 ms at today's epoch, a unit of 1000/s.
    redis = layer(server)
    limit = bucket(1000, 1, clock, redis)

    await limit.take("k")

    raw = await redis.client.get(redis.key("limit", "requests", "k"))
    assert isinstance(raw, bytes)
    stored = raw.decode()
    assert len(stored.replace(".", "").lstrip("0")) >= 16


async def test_without_redis_the_bucket_runs_in_memory(
    server: fakeredis.FakeServer, clock: Clock
) -> None:
    server.connected = False
    limit = bucket(2, HOUR, clock, layer(server))

    verdicts = [await limit.take("k") for _ in range(3)]

    assert [v.allowed for v in verdicts] == [True, True, False]
    assert verdicts[2].retry_after == pytest.approx(HOUR / 2)


async def test_usage_is_summed_across_replicas_in_redis(server: fakeredis.FakeServer) -> None:
    one, two = Usage(layer(server)), Usage(layer(server))
    for _ in range(3):
        one.add("user:alice", "alice", "requests")
    two.add("user:alice", "alice", "requests")
    two.add("user:alice", "alice", "upstream_bytes", 2048)
    for _ in range(2):
        two.add("ip:192.0.2.1", "anonymous", "requests")

    await one.flush()
    top = await two.top(5)  # flushes its own first
    await one.close()
    await two.close()

    assert [entry["identity"] for entry in top] == ["user:alice", "ip:192.0.2.1"]
    assert top[0]["requests"] == 4
    assert top[0]["upstream_bytes"] == 2048
    assert top[0]["label"] == "alice"
    assert top[1]["requests"] == 2 and top[1]["label"] == "anonymous"


async def test_usage_top_falls_back_to_memory_without_redis(server: fakeredis.FakeServer) -> None:
    server.connected = False
    usage = Usage(layer(server))
    usage.add("user:alice", "alice", "requests")

    top = await usage.top(5)
    await usage.close()

    assert [(entry["identity"], entry["requests"]) for entry in top] == [("user:alice", 1)]
