"""Verdicts: upstream access checks asked once per key and TTL, shared by concurrent
askers and by replicas (Redis), and the last answer used while the upstream is away."""

from __future__ import annotations

import asyncio

import fakeredis
import pytest
from prometheus_client import REGISTRY

from proxy.access.verdicts import UNKNOWN_TTL, Verdicts
from proxy.cache.redis import RedisLayer
from proxy.errors import TooManyRequests, UpstreamError, UpstreamUnavailable
from tests.unit.clock import Clock

TTL = 300.0


class Probe:
    """An upstream check that answers ``answer`` (or raises it), counted; with ``hold``
    it waits for ``release`` first."""

    def __init__(self, answer: bool | Exception | None, *, hold: bool = False) -> None:
        self.answer = answer
        self.calls = 0
        self.release = asyncio.Event()
        self.started = asyncio.Event()
        if not hold:
            self.release.set()

    async def __call__(self) -> bool | None:
        self.calls += 1
        self.started.set()
        await self.release.wait()
        if isinstance(self.answer, Exception):
            raise self.answer
        return self.answer


def checks(kind: str, result: str) -> float:
    value = REGISTRY.get_sample_value(
        "registry_proxy_access_checks_total", {"kind": kind, "result": result}
    )
    return value or 0.0


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def verdicts(clock: Clock) -> Verdicts:
    return Verdicts("test", TTL, None, clock=clock)


async def test_an_answer_is_remembered_for_the_ttl(verdicts: Verdicts, clock: Clock) -> None:
    probe = Probe(True)

    assert await verdicts.get("k", probe)
    clock.advance(TTL - 1)
    assert await verdicts.get("k", probe)
    assert probe.calls == 1

    clock.advance(1)
    probe.answer = False
    assert not await verdicts.get("k", probe)
    assert probe.calls == 2


async def test_a_refusal_is_remembered_too(verdicts: Verdicts) -> None:
    probe = Probe(False)

    assert not await verdicts.get("k", probe)
    assert not await verdicts.get("k", probe)
    assert probe.calls == 1


async def test_keys_are_separate(verdicts: Verdicts) -> None:
    yes, no = Probe(True), Probe(False)

    assert await verdicts.get("a", yes)
    assert not await verdicts.get("b", no)
    assert await verdicts.get("a", no)
    assert (yes.calls, no.calls) == (1, 1)


async def test_concurrent_askers_share_one_probe(verdicts: Verdicts) -> None:
    probe = Probe(True, hold=True)

    askers = [asyncio.create_task(verdicts.get("k", probe)) for _ in range(5)]
    await probe.started.wait()
    probe.release.set()

    assert await asyncio.gather(*askers) == [True] * 5
    assert probe.calls == 1


async def test_a_cancelled_asker_leaves_the_probe_to_the_others(verdicts: Verdicts) -> None:
    probe = Probe(True, hold=True)
    first = asyncio.create_task(verdicts.get("k", probe))
    second = asyncio.create_task(verdicts.get("k", probe))
    await probe.started.wait()

    first.cancel()
    with pytest.raises(asyncio.CancelledError):
        await first
    probe.release.set()

    assert await second
    assert probe.calls == 1


async def test_an_unknown_answer_is_remembered_briefly(verdicts: Verdicts, clock: Clock) -> None:
    """A 404 proves nothing, but asking again for every request for something missing
    would let clients make the proxy probe the upstream at will: it is remembered for
    UNKNOWN_TTL (or the TTL, when shorter), as None, which callers refuse on."""
    probe = Probe(None)
    before = checks("test", "unknown")

    assert await verdicts.get("k", probe) is None
    assert await verdicts.get("k", probe) is None
    assert probe.calls == 1
    assert checks("test", "unknown") == before + 1
    assert verdicts.fresh("k")

    clock.advance(min(TTL, UNKNOWN_TTL) + 1)
    assert not verdicts.fresh("k")
    probe.answer = True
    assert await verdicts.get("k", probe) is True
    assert probe.calls == 2


@pytest.mark.parametrize(
    "error",
    [UpstreamError("down"), UpstreamUnavailable("breaker open"), TooManyRequests("slow down")],
    ids=["upstream-error", "unavailable", "rate-limited"],
)
@pytest.mark.parametrize("last", [True, False])
async def test_an_unreachable_upstream_gives_the_last_answer(
    verdicts: Verdicts, clock: Clock, error: Exception, last: bool
) -> None:
    assert await verdicts.get("k", Probe(last)) is last
    clock.advance(TTL * 10)
    failing = Probe(error)
    before = checks("test", "stale")

    assert await verdicts.get("k", failing) is last
    assert await verdicts.get("k", failing) is last

    assert failing.calls == 2  # a stale answer is not fresh again: the upstream is asked
    assert checks("test", "stale") == before + 2


async def test_an_unreachable_upstream_with_no_answer_ever_is_refused(verdicts: Verdicts) -> None:
    failing = Probe(UpstreamError("down"))
    before = checks("test", "error")

    assert not await verdicts.get("k", failing)

    assert checks("test", "error") == before + 1
    assert await verdicts.get("k", Probe(True))  # the refusal was not remembered


async def test_an_unexpected_error_reaches_every_asker(verdicts: Verdicts) -> None:
    probe = Probe(RuntimeError("bug"), hold=True)
    askers = [asyncio.create_task(verdicts.get("k", probe)) for _ in range(3)]
    await probe.started.wait()
    probe.release.set()

    results = await asyncio.gather(*askers, return_exceptions=True)

    assert all(isinstance(r, RuntimeError) for r in results)
    assert probe.calls == 1
    assert await verdicts.get("k", Probe(True))


async def test_answers_count_by_result(verdicts: Verdicts) -> None:
    before = {r: checks("test", r) for r in ("granted", "refused", "cached")}

    await verdicts.get("yes", Probe(True))
    await verdicts.get("no", Probe(False))
    await verdicts.get("yes", Probe(True))

    assert checks("test", "granted") == before["granted"] + 1
    assert checks("test", "refused") == before["refused"] + 1
    assert checks("test", "cached") == before["cached"] + 1


# --- shared through Redis --------------------------------------------------------------------


async def settle() -> None:
    """Wait for the background writes ``_remember`` started."""
    others = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
    await asyncio.gather(*others)


async def test_replicas_share_answers_through_redis(clock: Clock) -> None:
    server = fakeredis.FakeServer()
    one = Verdicts("test", TTL, RedisLayer(fakeredis.FakeAsyncRedis(server=server)), clock=clock)
    two = Verdicts("test", TTL, RedisLayer(fakeredis.FakeAsyncRedis(server=server)), clock=clock)
    granted, refused = Probe(True), Probe(False)

    assert await one.get("yes", granted)
    assert not await one.get("no", refused)
    await settle()

    assert await two.get("yes", Probe(False))
    assert not await two.get("no", Probe(True))
    assert (granted.calls, refused.calls) == (1, 1)
    client = fakeredis.FakeAsyncRedis(server=server)
    assert 0 < await client.ttl("rp:v1:access:test:yes") <= TTL


async def test_an_unknown_answer_is_not_shared(clock: Clock) -> None:
    server = fakeredis.FakeServer()
    one = Verdicts("test", TTL, RedisLayer(fakeredis.FakeAsyncRedis(server=server)), clock=clock)

    assert not await one.get("k", Probe(None))
    await settle()

    assert await fakeredis.FakeAsyncRedis(server=server).keys("*") == []


async def test_without_redis_answers_are_still_remembered_locally(clock: Clock) -> None:
    server = fakeredis.FakeServer()
    server.connected = False
    verdicts = Verdicts(
        "test", TTL, RedisLayer(fakeredis.FakeAsyncRedis(server=server)), clock=clock
    )
    probe = Probe(True)

    assert await verdicts.get("k", probe)
    await settle()
    assert await verdicts.get("k", probe)
    assert probe.calls == 1
