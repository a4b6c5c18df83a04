"""Remembered answers of upstream access checks (visibility, pass-through, logins).

Each check is asked of the upstream once per key and TTL: concurrent askers share one
probe; the answer is kept in memory and, with Redis, shared by replicas (``SET EX``).
A key holds the credential's fingerprint (a hash), never the credential.

When the upstream cannot be asked (unreachable, breaker open, 5xx), the last answer is
used even past its TTL, so cached content stays servable offline to those it was
servable to; with no answer ever, the check fails closed (refused).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

from proxy import metrics
from proxy.access.bounded import Bounded
from proxy.cache.redis import RedisLayer
from proxy.errors import TooManyRequests, UpstreamError

log = logging.getLogger(__name__)

MAX_VERDICTS = 100_000
UNKNOWN_TTL = 30.0
"""How long an answer that proved nothing (a 404) is remembered: long enough that
repeated requests for something missing do not each cost upstream probes."""


class Verdicts:
    def __init__(
        self,
        kind: str,
        ttl: float,
        redis: RedisLayer | None,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._kind = kind
        self._ttl = ttl
        self._redis = redis
        self._clock = clock
        self._fresh: Bounded[str, tuple[bool | None, float]] = Bounded(MAX_VERDICTS)
        self._last: Bounded[str, bool] = Bounded(MAX_VERDICTS)
        self._pending: dict[str, asyncio.Task[bool | None]] = {}
        self._writes: set[asyncio.Task[object]] = set()  # strong references until done

    def fresh(self, key: str) -> bool:
        """Whether an answer for ``key`` is remembered here (asking costs no probe)."""
        known = self._fresh.get(key)
        return known is not None and known[1] > self._clock()

    async def get(self, key: str, probe: Callable[[], Awaitable[bool | None]]) -> bool | None:
        """The remembered answer for ``key``, else ``probe()``'s. None: the upstream's
        answer proved nothing (remembered for ``UNKNOWN_TTL``); callers refuse on it."""
        known = self._fresh.get(key)
        if known is not None and known[1] > self._clock():
            metrics.ACCESS_CHECKS.labels(self._kind, "cached").inc()
            return known[0]
        shared = await self._shared(key)
        if shared is not None:
            metrics.ACCESS_CHECKS.labels(self._kind, "cached").inc()
            self._remember(key, shared, share=False)
            return shared
        task = self._pending.get(key)
        if task is None:
            task = asyncio.get_running_loop().create_task(self._probe(key, probe))
            self._pending[key] = task
            task.add_done_callback(lambda _t: self._pending.pop(key, None))
        return await asyncio.shield(task)

    async def _probe(self, key: str, probe: Callable[[], Awaitable[bool | None]]) -> bool | None:
        try:
            result = await probe()
        except (UpstreamError, TooManyRequests) as exc:
            last = self._last.get(key)
            metrics.ACCESS_CHECKS.labels(self._kind, "stale" if last is not None else "error").inc()
            log.info(
                "%s check could not ask the upstream (%s); %s",
                self._kind,
                exc.message,
                "using the last answer" if last is not None else "refusing",
            )
            return bool(last)
        if result is None:
            metrics.ACCESS_CHECKS.labels(self._kind, "unknown").inc()
            self._fresh[key] = (None, self._clock() + min(self._ttl, UNKNOWN_TTL))
            return None
        metrics.ACCESS_CHECKS.labels(self._kind, "granted" if result else "refused").inc()
        self._remember(key, result, share=True)
        return result

    def _remember(self, key: str, value: bool, *, share: bool) -> None:
        self._fresh[key] = (value, self._clock() + self._ttl)
        self._last[key] = value
        if share and self._redis is not None:
            redis = self._redis
            name = redis.key("access", self._kind, key)
            ttl = max(1, int(self._ttl))
            task: asyncio.Task[object] = asyncio.get_running_loop().create_task(
                redis.run("set", lambda: redis.client.set(name, "1" if value else "0", ex=ttl))
            )
            self._writes.add(task)
            task.add_done_callback(self._writes.discard)

    async def _shared(self, key: str) -> bool | None:
        if self._redis is None:
            return None
        redis = self._redis
        name = redis.key("access", self._kind, key)
        value = await redis.run("get", lambda: redis.client.get(name))
        if value is None:
            return None
        return value in (b"1", "1")
