"""Per-identity limits (request rate, cold-fetch quotas) and usage counters.

Every limit is a GCRA (generic cell rate algorithm) bucket: ``amount`` per ``period``,
a burst of up to ``amount`` at once, one key per (limit, identity) holding one number,
the "theoretical arrival time". That gives exact ``remaining`` and ``Retry-After``
figures with one read-modify-write, which with Redis is one Lua script (atomic across
replicas; Redis's own clock, so replicas agree). Without Redis, or while it is
unreachable, the same algorithm runs in memory (per process: limits loosen, they never
block pulls because Redis is down).

Time is a float of seconds since the epoch, so a theoretical arrival time drifts by an
ulp or so per unit taken (and Lua's ``tostring`` keeps 14 digits: the script stores 17).
A unit is therefore admitted when at most ``SLACK`` (or half an interval, if less) is
missing for it, and ``remaining`` counts the same way: a burst is exactly ``amount``,
never one short.

Three operations: ``take`` (admit ``cost`` or refuse), ``check`` (is there room at all;
nothing taken) and ``charge`` (count ``cost`` whatever the state: bytes, known only once
a fetch has started).

Usage counters (requests, bytes from cache, bytes from upstream, cold fetches, denials,
limited) are kept in memory per identity and, with Redis, added to shared hashes every
``FLUSH_INTERVAL`` seconds, so the admin endpoint sees every replica's traffic without a
Redis write per request.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from proxy import metrics
from proxy.access.bounded import Bounded
from proxy.cache.redis import RedisLayer
from proxy.errors import TooManyRequests
from proxy.settings import Rate

log = logging.getLogger(__name__)

MAX_KEYS = 100_000
FLUSH_INTERVAL = 5.0
USAGE_TTL = 7 * 86400
MAX_INDEXED = 10_000
SLACK = 0.001
COUNTERS = ("requests", "cache_bytes", "upstream_bytes", "cold_fetches", "denials", "limited")
Mode = Literal["take", "check", "charge"]

# KEYS[1] bucket; ARGV: interval (s per unit), period (s), cost, mode, slack (s).
# Returns {allowed (0/1), seconds until allowed, seconds of usage ahead of now} as strings
# (Redis truncates Lua numbers to integers).
GCRA_SCRIPT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local interval = tonumber(ARGV[1])
local period = tonumber(ARGV[2])
local cost = tonumber(ARGV[3])
local mode = ARGV[4]
local slack = tonumber(ARGV[5])
local tat = tonumber(redis.call('GET', KEYS[1]) or '0')
if tat < now then tat = now end
local new = tat + cost * interval
if mode ~= 'charge' and new - period - now > slack then
  return {'0', tostring(new - period - now), tostring(tat - now)}
end
if mode ~= 'check' then
  local stored = string.format('%.17g', new)
  redis.call('SET', KEYS[1], stored, 'PX', math.ceil((new - now) * 1000) + 1000)
  tat = new
end
return {'1', '0', tostring(tat - now)}
"""


@dataclass(frozen=True, slots=True)
class Verdict:
    allowed: bool
    limit: int
    remaining: int
    retry_after: float
    period: float

    def headers(self) -> dict[str, str]:
        """Docker Hub's form: ``ratelimit-limit: 100;w=21600``."""
        window = max(1, round(self.period))
        out = {
            "RateLimit-Limit": f"{self.limit};w={window}",
            "RateLimit-Remaining": f"{max(0, self.remaining)};w={window}",
        }
        if not self.allowed:
            out["Retry-After"] = str(max(1, math.ceil(self.retry_after)))
        return out


class Bucket:
    """One limit (``name``: requests, cold_fetches, cold_bytes) over every identity."""

    def __init__(
        self,
        name: str,
        rate: Rate,
        redis: RedisLayer | None,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.name = name
        self.rate = rate
        self._interval = rate.period / rate.amount
        self._slack = min(self._interval / 2, SLACK)
        self._redis = redis
        self._clock = clock
        self._local: Bounded[str, float] = Bounded(MAX_KEYS)
        self._script: Any = None

    async def take(self, key: str, cost: int = 1) -> Verdict:
        return await self._run(key, cost, "take")

    async def check(self, key: str) -> Verdict:
        return await self._run(key, 1, "check")

    async def charge(self, key: str, cost: int) -> None:
        await self._run(key, cost, "charge")

    async def _run(self, key: str, cost: int, mode: Mode) -> Verdict:
        result = None
        if self._redis is not None:
            result = await self._redis_run(key, cost, mode)
        if result is None:
            result = self._local_run(key, cost, mode)
        allowed, wait, ahead = result
        remaining = math.floor((self.rate.period - ahead + self._slack) / self._interval)
        return Verdict(allowed, self.rate.amount, remaining, wait, self.rate.period)

    async def _redis_run(self, key: str, cost: int, mode: Mode) -> tuple[bool, float, float] | None:
        assert self._redis is not None
        redis = self._redis
        if self._script is None:
            self._script = redis.client.register_script(GCRA_SCRIPT)
        script = self._script
        name = redis.key("limit", self.name, key)

        async def call() -> Any:
            return await script(
                keys=[name],
                args=[repr(self._interval), repr(self.rate.period), cost, mode, repr(self._slack)],
            )

        reply = await redis.run("limit", call)
        if reply is None:
            return None
        allowed, wait, ahead = (_text(v) for v in reply)
        return allowed == "1", float(wait), float(ahead)

    def _local_run(self, key: str, cost: int, mode: Mode) -> tuple[bool, float, float]:
        now = self._clock()
        tat = max(self._local.get(key, now), now)
        new = tat + cost * self._interval
        if mode != "charge" and new - self.rate.period - now > self._slack:
            return False, new - self.rate.period - now, tat - now
        if mode != "check":
            self._local[key] = new
            tat = new
        return True, 0.0, tat - now


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


@dataclass
class IdentityUsage:
    label: str
    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(COUNTERS, 0))
    last_seen: float = 0.0


class Usage:
    """Usage per identity key: in memory, and summed in Redis across replicas."""

    def __init__(self, redis: RedisLayer | None, *, clock: Callable[[], float] = time.time) -> None:
        self._redis = redis
        self._clock = clock
        self._totals: Bounded[str, IdentityUsage] = Bounded(MAX_KEYS)
        self._children: dict[tuple[str, str], Any] = {}  # labels are bounded: users, kinds
        self._pending: dict[str, dict[str, int]] = {}
        self._labels: dict[str, str] = {}
        self._task: asyncio.Task[None] | None = None

    def add(self, key: str, label: str, counter: str, amount: int = 1) -> None:
        usage = self._totals.get(key)
        if usage is None:
            usage = self._totals[key] = IdentityUsage(label)
        usage.counts[counter] += amount
        usage.last_seen = self._clock()
        if self._redis is not None:
            pending = self._pending.setdefault(key, {})
            pending[counter] = pending.get(counter, 0) + amount
            self._labels[key] = label
            if self._task is None:
                self._task = asyncio.get_running_loop().create_task(self._flush_later())
        child = self._children.get((label, counter))
        if child is None:
            child = metrics.IDENTITY_USAGE.labels(label, counter)
            self._children[(label, counter)] = child
        child.inc(amount)

    async def _flush_later(self) -> None:
        try:
            await asyncio.sleep(FLUSH_INTERVAL)
        finally:
            self._task = None
        await self.flush()

    async def flush(self) -> None:
        redis = self._redis
        if redis is None or not self._pending:
            return
        pending, self._pending = self._pending, {}
        labels, self._labels = self._labels, {}
        index = redis.key("usage", "index")
        now = str(self._clock())

        async def write() -> None:
            async with redis.client.pipeline(transaction=False) as pipe:
                for key, counts in pending.items():
                    name = redis.key("usage", key)
                    for counter, amount in counts.items():
                        pipe.hincrby(name, counter, amount)
                    pipe.hset(name, mapping={"label": labels.get(key, ""), "last_seen": now})
                    pipe.expire(name, USAGE_TTL)
                    pipe.zincrby(index, counts.get("requests", 0), key)
                # Only the busiest MAX_INDEXED identities stay ranked: the index cannot
                # grow without bound however many addresses come and go.
                pipe.zremrangebyrank(index, 0, -(MAX_INDEXED + 1))
                pipe.expire(index, USAGE_TTL)
                await pipe.execute()

        await redis.run("usage", write)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None
        await self.flush()

    async def top(self, count: int) -> list[dict[str, Any]]:
        """The ``count`` identities with the most requests, with their counters."""
        redis = self._redis
        if redis is not None:
            await self.flush()
            shared = await self._redis_top(redis, count)
            if shared is not None:
                return shared
        ranked = sorted(self._totals.items(), key=lambda kv: -kv[1].counts["requests"])
        return [
            {"identity": key, "label": u.label, **u.counts, "last_seen": u.last_seen}
            for key, u in ranked[:count]
        ]

    async def _redis_top(self, redis: RedisLayer, count: int) -> list[dict[str, Any]] | None:
        index = redis.key("usage", "index")

        async def read() -> list[dict[str, Any]]:
            keys = await redis.client.zrevrange(index, 0, count - 1)
            out: list[dict[str, Any]] = []
            for raw in keys:
                key = _text(raw)
                data = {
                    _text(k): _text(v)
                    for k, v in (await redis.client.hgetall(redis.key("usage", key))).items()
                }
                entry: dict[str, Any] = {"identity": key, "label": data.get("label", "")}
                for counter in COUNTERS:
                    entry[counter] = int(data.get(counter, 0))
                entry["last_seen"] = float(data.get("last_seen", 0))
                out.append(entry)
            return out

        return await redis.run("usage", read)


class Limits:
    """The configured buckets; raises ``TooManyRequests`` with Docker Hub's headers."""

    def __init__(
        self,
        requests: Rate | None,
        cold_fetches: Rate | None,
        cold_bytes: Rate | None,
        redis: RedisLayer | None,
        usage: Usage,
    ) -> None:
        self.requests = Bucket("requests", requests, redis) if requests else None
        self.cold_fetches = Bucket("cold_fetches", cold_fetches, redis) if cold_fetches else None
        self.cold_bytes = Bucket("cold_bytes", cold_bytes, redis) if cold_bytes else None
        self.usage = usage

    async def admit_request(self, key: str, label: str) -> None:
        if self.requests is None:
            return
        verdict = await self.requests.take(key)
        if not verdict.allowed:
            self._refuse("requests", key, label, verdict, "too many requests")

    async def admit_cold_fetch(self, key: str, label: str) -> None:
        """Before an upstream fetch for this identity: one fetch taken, and room left in
        the bytes quota; cache hits never come here."""
        if self.cold_bytes is not None:
            verdict = await self.cold_bytes.check(key)
            if not verdict.allowed:
                self._refuse("cold_bytes", key, label, verdict, "cold-fetch byte quota used up")
        if self.cold_fetches is not None:
            verdict = await self.cold_fetches.take(key)
            if not verdict.allowed:
                self._refuse("cold_fetches", key, label, verdict, "cold-fetch quota used up")
        self.usage.add(key, label, "cold_fetches")

    @property
    def has_quotas(self) -> bool:
        return self.cold_fetches is not None or self.cold_bytes is not None

    async def charge_cold_bytes(self, key: str, label: str, size: int) -> None:
        if self.cold_bytes is not None and size > 0:
            await self.cold_bytes.charge(key, size)

    def _refuse(self, limit: str, key: str, label: str, verdict: Verdict, message: str) -> None:
        metrics.LIMIT_REJECTIONS.labels(limit, label).inc()
        self.usage.add(key, label, "limited")
        raise TooManyRequests(
            f"{message}: {verdict.limit} per {verdict.period:g}s", headers=verdict.headers()
        )


class QuotaGate:
    """``ColdFetchGate`` for one request: the identity's cold-fetch quotas."""

    def __init__(self, limits: Limits, key: str, label: str) -> None:
        self._limits = limits
        self._key = key
        self._label = label

    async def admit(self) -> None:
        await self._limits.admit_cold_fetch(self._key, self._label)

    async def charge(self, size: int) -> None:
        await self._limits.charge_cold_bytes(self._key, self._label, size)
