"""Coalescer: concurrent calls with one key share one execution."""

from __future__ import annotations

import asyncio

import pytest

from proxy.pullthrough.coalesce import Coalescer


class GatedCall:
    """A call that counts its executions and finishes when the test opens the gate."""

    def __init__(self, result: str = "result", error: Exception | None = None) -> None:
        self.result = result
        self.error = error
        self.calls = 0
        self.started = asyncio.Event()
        self.gate = asyncio.Event()
        self.finished = False
        self.cancelled = False

    async def __call__(self) -> str:
        self.calls += 1
        self.started.set()
        try:
            await self.gate.wait()
        except asyncio.CancelledError:
            self.cancelled = True
            raise
        if self.error is not None:
            raise self.error
        self.finished = True
        return f"{self.result}-{self.calls}"


async def test_concurrent_runs_share_one_call() -> None:
    coalescer: Coalescer[str] = Coalescer("test")
    call = GatedCall()
    waiters = [asyncio.create_task(coalescer.run("key", call)) for _ in range(5)]
    await call.started.wait()
    call.gate.set()

    assert await asyncio.gather(*waiters) == ["result-1"] * 5
    assert call.calls == 1


async def test_different_keys_do_not_share() -> None:
    coalescer: Coalescer[str] = Coalescer("test")
    first, second = GatedCall("a"), GatedCall("b")
    tasks = [
        asyncio.create_task(coalescer.run("a", first)),
        asyncio.create_task(coalescer.run("b", second)),
    ]
    first.gate.set()
    second.gate.set()
    assert await asyncio.gather(*tasks) == ["a-1", "b-1"]


async def test_a_finished_call_is_not_reused() -> None:
    coalescer: Coalescer[str] = Coalescer("test")
    call = GatedCall()
    call.gate.set()
    assert await coalescer.run("key", call) == "result-1"
    assert await coalescer.run("key", call) == "result-2"
    assert call.calls == 2


async def test_a_cancelled_waiter_does_not_cancel_the_shared_call() -> None:
    coalescer: Coalescer[str] = Coalescer("test")
    call = GatedCall()
    leaver = asyncio.create_task(coalescer.run("key", call))
    stayer = asyncio.create_task(coalescer.run("key", call))
    await call.started.wait()

    leaver.cancel()
    with pytest.raises(asyncio.CancelledError):
        await leaver
    call.gate.set()

    assert await stayer == "result-1"
    assert not call.cancelled
    assert call.calls == 1


async def test_the_call_finishes_when_every_waiter_has_gone() -> None:
    coalescer: Coalescer[str] = Coalescer("test")
    call = GatedCall()
    waiter = asyncio.create_task(coalescer.run("key", call))
    await call.started.wait()
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter

    call.gate.set()
    # A later caller joins the call still running and gets its result.
    assert await coalescer.run("key", call) == "result-1"
    assert call.finished and not call.cancelled
    assert call.calls == 1


async def test_errors_propagate_to_every_waiter() -> None:
    coalescer: Coalescer[str] = Coalescer("test")
    error = ValueError("upstream said no")
    call = GatedCall(error=error)
    waiters = [asyncio.create_task(coalescer.run("key", call)) for _ in range(3)]
    await call.started.wait()
    call.gate.set()

    results = await asyncio.gather(*waiters, return_exceptions=True)

    assert results == [error, error, error]
    assert call.calls == 1


async def test_after_an_error_the_next_run_calls_again() -> None:
    coalescer: Coalescer[str] = Coalescer("test")
    failing = GatedCall(error=ValueError("once"))
    failing.gate.set()
    with pytest.raises(ValueError):
        await coalescer.run("key", failing)

    working = GatedCall()
    working.gate.set()
    assert await coalescer.run("key", working) == "result-1"


async def test_close_cancels_pending_calls() -> None:
    coalescer: Coalescer[str] = Coalescer("test")
    call = GatedCall()
    waiter = asyncio.create_task(coalescer.run("key", call))
    await call.started.wait()

    await coalescer.close()

    assert call.cancelled
    with pytest.raises(asyncio.CancelledError):
        await waiter
