"""Micro-benchmark of one descriptor look-up: memory vs Redis, and Redis down.

Times ``stat()`` on :class:`proxy.cache.memory.MemoryDescriptorCache` and on
:class:`proxy.cache.redis.RedisDescriptorCache` over ``RedisLayer(connect(url))`` against a
real redis-server (one look-up at a time, as a request does it), then points a layer at
a closed port: the first ``BREAKER_FAILURES`` look-ups fail (connection refused) and open
the breaker; after that each ``stat()`` is skipped, and its cost is the latency a request
pays while Redis is down.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace

from proxy.breaker import OPEN
from proxy.cache.memory import MemoryDescriptorCache
from proxy.cache.redis import BREAKER_FAILURES, RedisDescriptorCache, RedisLayer, connect
from proxy.errors import BlobUnknown
from proxy.interfaces import BlobDescriptorService
from proxy.model import Descriptor, Digest

DISTINCT = 1000


@dataclass(frozen=True, slots=True)
class MicroResult:
    name: str
    lookups: int
    mean_us: float
    p50_us: float
    p99_us: float
    note: str = ""


def _digests(n: int) -> list[Digest]:
    return [Digest.parse("sha256:" + os.urandom(32).hex()) for _ in range(n)]


async def _time(
    name: str, n: int, digests: list[Digest], call: Callable[[Digest], Awaitable[object]]
) -> MicroResult:
    for digest in digests[:50]:  # warm-up: connections, code paths
        await call(digest)
    samples: list[int] = []
    count = len(digests)
    total_start = time.perf_counter_ns()
    for i in range(n):
        started = time.perf_counter_ns()
        await call(digests[i % count])
        samples.append(time.perf_counter_ns() - started)
    total = time.perf_counter_ns() - total_start
    samples.sort()
    return MicroResult(
        name,
        n,
        total / n / 1000,
        samples[len(samples) // 2] / 1000,
        samples[min(len(samples) - 1, int(len(samples) * 0.99))] / 1000,
    )


def _hit(service: BlobDescriptorService) -> Callable[[Digest], Awaitable[object]]:
    async def call(digest: Digest) -> object:
        return await service.stat(digest)

    return call


def _miss(service: BlobDescriptorService) -> Callable[[Digest], Awaitable[object]]:
    async def call(digest: Digest) -> object:
        try:
            await service.stat(digest)
        except BlobUnknown:
            return None
        raise AssertionError("expected a miss")

    return call


async def run(redis_url: str, closed_port: int, lookups: int) -> list[MicroResult]:
    present = _digests(DISTINCT)
    absent = _digests(DISTINCT)
    results: list[MicroResult] = []

    memory = MemoryDescriptorCache(100_000)
    for d in present:
        await memory.set_descriptor(d, Descriptor(d, 1234, "application/octet-stream"))
    results.append(await _time("memory hit", lookups, present, _hit(memory)))
    results.append(await _time("memory miss", lookups, absent, _miss(memory)))

    layer = RedisLayer(connect(redis_url))
    try:
        redis_cache = RedisDescriptorCache(layer)
        for d in present:
            await redis_cache.set_descriptor(d, Descriptor(d, 1234, "application/octet-stream"))
        redis_n = max(1, lookups // 4)
        results.append(await _time("redis hit", redis_n, present, _hit(redis_cache)))
        results.append(await _time("redis miss", redis_n, absent, _miss(redis_cache)))
    finally:
        await layer.close()

    down = RedisLayer(connect(f"redis://127.0.0.1:{closed_port}/0"))
    try:
        down_cache = RedisDescriptorCache(down)
        failing: list[int] = []
        for d in absent[:BREAKER_FAILURES]:
            started = time.perf_counter_ns()
            await _miss(down_cache)(d)
            failing.append(time.perf_counter_ns() - started)
        if down.breaker.state != OPEN:
            raise AssertionError(f"breaker not open after {BREAKER_FAILURES} failures")
        results.append(
            MicroResult(
                f"redis down, first {BREAKER_FAILURES} (refused)",
                len(failing),
                statistics.fmean(failing) / 1000,
                statistics.median(failing) / 1000,
                max(failing) / 1000,
                "each a refused connect; then the breaker opens",
            )
        )
        opened = await _time("redis down, breaker open", lookups, absent, _miss(down_cache))
        if down.breaker.state != OPEN:
            opened = replace(opened, note="breaker probed during the run")
        results.append(opened)
    finally:
        await down.close()
    return results
