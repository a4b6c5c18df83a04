"""Small upstream answers relayed and cached whole: tag lists and referrers.

Within the upstream's ``tag_ttl`` a cached answer is served with no upstream request;
after it the upstream is asked again, and when it cannot answer (unreachable, 5xx, 429)
the cached answer is served stale up to ``max_stale``. Concurrent misses share one
upstream request.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Coroutine, Hashable
from dataclasses import dataclass
from typing import Any

from cachetools import LRUCache

from proxy import metrics
from proxy.errors import TooManyRequests, UpstreamError
from proxy.model import Outcome
from proxy.pullthrough.coalesce import Coalescer
from proxy.settings import UpstreamSettings
from proxy.upstream.client import PassThrough

DEFAULT_ENTRIES = 10_000
MAX_CACHED_BODY = 1 << 20


@dataclass(frozen=True, slots=True)
class Relayed:
    answer: PassThrough
    outcome: Outcome


class RelayCache:
    def __init__(
        self,
        settings: UpstreamSettings,
        kind: str,
        *,
        max_entries: int = DEFAULT_ENTRIES,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._settings = settings
        self._kind = kind
        self._entries: LRUCache[Hashable, tuple[float, PassThrough]] = LRUCache(max_entries)
        self._coalescer: Coalescer[PassThrough] = Coalescer(kind)
        self._clock = clock

    async def close(self) -> None:
        await self._coalescer.close()

    async def get(
        self, key: Hashable, call: Callable[[], Coroutine[Any, Any, PassThrough]]
    ) -> Relayed:
        cached = self._entries.get(key)
        age = self._clock() - cached[0] if cached is not None else 0.0
        if cached is not None and age < self._settings.tag_ttl:
            metrics.CACHE_LOOKUPS.labels(self._kind, "memory", "hit").inc()
            return Relayed(cached[1], Outcome.HIT)
        metrics.CACHE_LOOKUPS.labels(self._kind, "memory", "miss").inc()
        try:
            answer = await self._coalescer.run(key, call)
        except (UpstreamError, TooManyRequests):
            if cached is None or age - self._settings.tag_ttl > self._settings.max_stale:
                raise
            metrics.STALE_SERVES.labels(self._settings.name).inc()
            return Relayed(cached[1], Outcome.STALE)
        if len(answer.body) <= MAX_CACHED_BODY:
            self._entries[key] = (self._clock(), answer)
        return Relayed(answer, Outcome.MISS)
