"""RelayCache: tag lists and referrers cached whole, with a TTL, stale serving and
coalescing.

The upstream call is a fake that counts its executions; time is a clock the test moves.
"""

from __future__ import annotations

import asyncio
from collections.abc import Hashable

import pytest
from prometheus_client import REGISTRY

from proxy.errors import (
    Denied,
    NameUnknown,
    RegistryError,
    TooLarge,
    TooManyRequests,
    UpstreamError,
    UpstreamUnavailable,
)
from proxy.model import Outcome
from proxy.pullthrough.relays import MAX_CACHED_BODY, RelayCache, Relayed
from proxy.settings import UpstreamSettings
from proxy.upstream.client import PassThrough
from tests.unit.clock import Clock

TTL = 300.0
MAX_STALE = 3600.0
START = 1000.0
UPSTREAM = "relays-test"
KIND = "relaytest"


def answer(label: str = "v1", size: int | None = None) -> PassThrough:
    body = f'{{"name":"team/app","tags":["{label}"]}}'.encode()
    if size is not None:
        body = body[:1] + b" " * (size - len(body)) + body[1:]
        assert len(body) == size
    return PassThrough(200, {"Content-Type": "application/json"}, body)


class FakeCall:
    """Plays the upstream request: answers (or raises) what the test set, counting calls.

    With ``gated``, each call waits until the test opens ``gate``.
    """

    def __init__(self, result: PassThrough | None = None, *, gated: bool = False) -> None:
        self.result: PassThrough | None = result if result is not None else answer()
        self.error: Exception | None = None
        self.calls = 0
        self.started = asyncio.Event()
        self.gate = asyncio.Event()
        if not gated:
            self.gate.set()

    def fail(self, error: Exception) -> None:
        self.error = error

    def succeed(self, result: PassThrough) -> None:
        self.error = None
        self.result = result

    async def __call__(self) -> PassThrough:
        self.calls += 1
        self.started.set()
        await self.gate.wait()
        if self.error is not None:
            raise self.error
        assert self.result is not None
        return self.result


def relays(
    clock: Clock,
    *,
    tag_ttl: float = TTL,
    max_stale: float = MAX_STALE,
    max_entries: int = 100,
) -> RelayCache:
    settings = UpstreamSettings(
        name=UPSTREAM, url="http://127.0.0.1:9", tag_ttl=tag_ttl, max_stale=max_stale
    )
    return RelayCache(settings, KIND, max_entries=max_entries, clock=clock)


def sample(name: str, **labels: str) -> float:
    value = REGISTRY.get_sample_value(name, labels)
    return value if value is not None else 0.0


def stale_serves() -> float:
    return sample("registry_proxy_stale_serves_total", upstream=UPSTREAM)


def lookups(result: str) -> float:
    return sample("registry_proxy_cache_lookups_total", kind=KIND, layer="memory", result=result)


async def get(cache: RelayCache, call: FakeCall, key: Hashable = "key") -> Relayed:
    return await cache.get(key, call)


# --- TTL ------------------------------------------------------------------------------------


async def test_the_first_get_calls_upstream_and_is_a_miss() -> None:
    cache = relays(Clock(START))
    call = FakeCall()

    relayed = await get(cache, call)

    assert relayed.outcome is Outcome.MISS
    assert relayed.answer == call.result
    assert call.calls == 1


async def test_within_the_ttl_the_answer_is_served_with_no_call() -> None:
    clock = Clock(START)
    cache = relays(clock)
    call = FakeCall()
    first = await get(cache, call)

    clock.advance(TTL - 0.5)
    call.succeed(answer("v2"))
    relayed = await get(cache, call)

    assert relayed.outcome is Outcome.HIT
    assert relayed.answer == first.answer
    assert call.calls == 1


async def test_at_the_ttl_the_upstream_is_asked_again() -> None:
    clock = Clock(START)
    cache = relays(clock)
    call = FakeCall()
    await get(cache, call)

    clock.advance(TTL)
    call.succeed(answer("v2"))
    relayed = await get(cache, call)

    assert relayed.outcome is Outcome.MISS
    assert relayed.answer == answer("v2")
    assert call.calls == 2


async def test_a_fresh_answer_restarts_the_ttl() -> None:
    clock = Clock(START)
    cache = relays(clock)
    call = FakeCall()
    await get(cache, call)
    clock.advance(TTL + 1)
    call.succeed(answer("v2"))
    await get(cache, call)

    clock.advance(TTL - 1)
    relayed = await get(cache, call)

    assert relayed.outcome is Outcome.HIT
    assert relayed.answer == answer("v2")
    assert call.calls == 2


async def test_a_zero_ttl_asks_the_upstream_every_time() -> None:
    cache = relays(Clock(START), tag_ttl=0.0)
    call = FakeCall()

    outcomes = [(await get(cache, call)).outcome for _ in range(3)]

    assert outcomes == [Outcome.MISS] * 3
    assert call.calls == 3


async def test_keys_are_cached_separately() -> None:
    cache = relays(Clock(START))
    first, second = FakeCall(answer("a")), FakeCall(answer("b"))

    a = await get(cache, first, ("team/app", None, None))
    b = await get(cache, second, ("team/app", "10", None))
    again = await get(cache, first, ("team/app", None, None))

    assert (a.answer, b.answer, again.answer) == (answer("a"), answer("b"), answer("a"))
    assert (a.outcome, b.outcome, again.outcome) == (Outcome.MISS, Outcome.MISS, Outcome.HIT)
    assert (first.calls, second.calls) == (1, 1)


async def test_non_200_answers_are_cached_like_any_other() -> None:
    # The referrers API's 404 ("no referrers API upstream") is relayed, and cached.
    cache = relays(Clock(START))
    not_found = PassThrough(404, {"Content-Type": "application/json"}, b'{"errors":[]}')
    call = FakeCall(not_found)

    await get(cache, call)
    relayed = await get(cache, call)

    assert relayed.outcome is Outcome.HIT
    assert relayed.answer.status == 404
    assert call.calls == 1


async def test_lookups_are_counted_as_memory_hits_and_misses() -> None:
    cache = relays(Clock(START))
    call = FakeCall()
    hits, misses = lookups("hit"), lookups("miss")

    await get(cache, call)
    await get(cache, call)
    await get(cache, call)

    assert lookups("miss") - misses == 1
    assert lookups("hit") - hits == 2


# --- stale serving --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "error",
    [
        UpstreamError("upstream answered 500"),
        UpstreamUnavailable("connection refused"),
        TooManyRequests("slow down", headers={"Retry-After": "60"}),
    ],
    ids=["upstream-error", "unavailable", "too-many-requests"],
)
async def test_an_expired_answer_is_served_stale_when_the_upstream_fails(
    error: RegistryError,
) -> None:
    clock = Clock(START)
    cache = relays(clock)
    call = FakeCall()
    first = await get(cache, call)
    before = stale_serves()

    clock.advance(TTL + 10)
    call.fail(error)
    relayed = await get(cache, call)

    assert relayed.outcome is Outcome.STALE
    assert relayed.answer == first.answer
    assert call.calls == 2
    assert stale_serves() - before == 1


async def test_stale_is_served_up_to_max_stale_past_the_ttl() -> None:
    clock = Clock(START)
    cache = relays(clock)
    call = FakeCall()
    await get(cache, call)

    clock.advance(TTL + MAX_STALE)
    call.fail(UpstreamUnavailable("down"))
    relayed = await get(cache, call)

    assert relayed.outcome is Outcome.STALE


async def test_beyond_max_stale_the_error_is_raised() -> None:
    clock = Clock(START)
    cache = relays(clock)
    call = FakeCall()
    await get(cache, call)
    before = stale_serves()

    clock.advance(TTL + MAX_STALE + 1)
    error = UpstreamUnavailable("down")
    call.fail(error)
    with pytest.raises(UpstreamUnavailable) as raised:
        await get(cache, call)

    assert raised.value is error
    assert stale_serves() == before


async def test_a_stale_serve_does_not_extend_the_stale_window() -> None:
    clock = Clock(START)
    cache = relays(clock)
    call = FakeCall()
    await get(cache, call)
    call.fail(UpstreamError("500"))

    clock.advance(TTL + MAX_STALE - 5)
    assert (await get(cache, call)).outcome is Outcome.STALE
    clock.advance(10)

    with pytest.raises(UpstreamError):
        await get(cache, call)
    assert call.calls == 3


async def test_after_a_stale_serve_the_upstream_is_asked_again() -> None:
    clock = Clock(START)
    cache = relays(clock)
    call = FakeCall()
    await get(cache, call)
    clock.advance(TTL + 1)
    call.fail(UpstreamError("500"))
    assert (await get(cache, call)).outcome is Outcome.STALE

    call.succeed(answer("v2"))
    relayed = await get(cache, call)

    assert relayed.outcome is Outcome.MISS
    assert relayed.answer == answer("v2")
    assert call.calls == 3


async def test_an_upstream_error_with_nothing_cached_is_raised() -> None:
    cache = relays(Clock(START))
    call = FakeCall()
    error = UpstreamError("upstream answered 502")
    call.fail(error)
    before = stale_serves()

    with pytest.raises(UpstreamError) as raised:
        await get(cache, call)

    assert raised.value is error
    assert stale_serves() == before


async def test_errors_are_not_cached() -> None:
    cache = relays(Clock(START))
    call = FakeCall()
    call.fail(UpstreamError("502"))
    with pytest.raises(UpstreamError):
        await get(cache, call)

    call.succeed(answer("v1"))
    relayed = await get(cache, call)

    assert relayed.outcome is Outcome.MISS
    assert call.calls == 2


@pytest.mark.parametrize(
    "error",
    [NameUnknown("no such repository"), Denied("no"), TooLarge("too big")],
    ids=["name-unknown", "denied", "too-large"],
)
async def test_answers_that_are_not_upstream_failures_are_not_covered_by_stale(
    error: RegistryError,
) -> None:
    clock = Clock(START)
    cache = relays(clock)
    call = FakeCall()
    await get(cache, call)

    clock.advance(TTL + 1)
    call.fail(error)
    with pytest.raises(type(error)) as raised:
        await get(cache, call)

    assert raised.value is error


# --- size limit and eviction ----------------------------------------------------------------


async def test_an_answer_of_max_cached_body_is_cached() -> None:
    cache = relays(Clock(START))
    call = FakeCall(answer(size=MAX_CACHED_BODY))

    await get(cache, call)
    relayed = await get(cache, call)

    assert relayed.outcome is Outcome.HIT
    assert len(relayed.answer.body) == MAX_CACHED_BODY
    assert call.calls == 1


async def test_a_larger_answer_is_relayed_but_not_cached() -> None:
    cache = relays(Clock(START))
    call = FakeCall(answer(size=MAX_CACHED_BODY + 1))

    first = await get(cache, call)
    second = await get(cache, call)

    assert (first.outcome, second.outcome) == (Outcome.MISS, Outcome.MISS)
    assert len(second.answer.body) == MAX_CACHED_BODY + 1
    assert call.calls == 2


async def test_the_least_recently_used_key_is_evicted_past_max_entries() -> None:
    cache = relays(Clock(START), max_entries=2)
    a, b, c = FakeCall(answer("a")), FakeCall(answer("b")), FakeCall(answer("c"))
    await get(cache, a, "a")
    await get(cache, b, "b")
    assert (await get(cache, a, "a")).outcome is Outcome.HIT  # "a" is now the most recent

    await get(cache, c, "c")

    assert (await get(cache, a, "a")).outcome is Outcome.HIT
    assert (await get(cache, b, "b")).outcome is Outcome.MISS
    assert (a.calls, b.calls, c.calls) == (1, 2, 1)


# --- coalescing -----------------------------------------------------------------------------


async def test_concurrent_misses_share_one_call() -> None:
    cache = relays(Clock(START))
    call = FakeCall(gated=True)
    waiters = [asyncio.create_task(get(cache, call)) for _ in range(5)]
    await call.started.wait()
    call.gate.set()

    results = await asyncio.gather(*waiters)

    assert call.calls == 1
    assert all(r.answer == answer() for r in results)
    assert (await get(cache, call)).outcome is Outcome.HIT
    assert call.calls == 1


async def test_concurrent_misses_for_different_keys_do_not_share() -> None:
    cache = relays(Clock(START))
    call = FakeCall(gated=True)
    waiters = [asyncio.create_task(get(cache, call, key)) for key in ("a", "b")]
    await call.started.wait()
    call.gate.set()

    await asyncio.gather(*waiters)

    assert call.calls == 2


async def test_concurrent_revalidations_that_fail_all_serve_stale() -> None:
    clock = Clock(START)
    cache = relays(clock)
    call = FakeCall()
    first = await get(cache, call)
    clock.advance(TTL + 1)
    call.fail(UpstreamUnavailable("down"))
    call.gate.clear()
    call.started.clear()

    waiters = [asyncio.create_task(get(cache, call)) for _ in range(3)]
    await call.started.wait()
    call.gate.set()
    results = await asyncio.gather(*waiters)

    assert [r.outcome for r in results] == [Outcome.STALE] * 3
    assert all(r.answer == first.answer for r in results)
    assert call.calls == 2


async def test_close_cancels_a_pending_call() -> None:
    cache = relays(Clock(START))
    call = FakeCall(gated=True)
    waiter = asyncio.create_task(get(cache, call))
    await call.started.wait()

    await cache.close()

    with pytest.raises(asyncio.CancelledError):
        await waiter
