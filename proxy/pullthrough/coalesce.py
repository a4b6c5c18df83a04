"""Single-flight: concurrent calls with one key share one execution.

The shared call runs in a task of its own, so a caller that goes away (its request was
cancelled) does not cancel the work others wait for; each caller waits on it shielded.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine, Hashable
from typing import Any, Generic, TypeVar

from proxy import metrics

T = TypeVar("T")


class Coalescer(Generic[T]):
    def __init__(self, kind: str) -> None:
        self._kind = kind
        self._pending: dict[Hashable, asyncio.Task[T]] = {}

    def running(self, key: Hashable) -> bool:
        """Whether a call for ``key`` is in flight (a caller now would join it)."""
        return key in self._pending

    async def run(self, key: Hashable, call: Callable[[], Coroutine[Any, Any, T]]) -> T:
        task = self._pending.get(key)
        if task is None:
            task = asyncio.create_task(call())
            self._pending[key] = task
            task.add_done_callback(lambda t: self._forget(key, t))
        else:
            metrics.COALESCED.labels(self._kind).inc()
        return await asyncio.shield(task)

    def _forget(self, key: Hashable, task: asyncio.Task[T]) -> None:
        if self._pending.get(key) is task:
            del self._pending[key]
        if not task.cancelled():
            task.exception()  # retrieved: the waiters may all have gone

    async def close(self) -> None:
        tasks = list(self._pending.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
