"""Fetch leases and holder records in Redis.

Key layout (next to ``proxy.cache.redis``'s, same prefix and version)::

    <p>:v1:lease:blob:<alg>:<hex>    string  "<node> <address> <upstream> <repo>"   PX lease_ttl
    <p>:v1:lease:tag:<up>:<repo>:<tag>  string  the same                          PX 5 s
    <p>:v1:holders:<alg>:<hex>       hash    <address> -> "<upstream> <repo>"        EX HOLDERS_TTL

A lease names the replica fetching a digest (``node`` is a random id per process, so a
restarted replica at the same address is not mistaken for its former self) and the
(upstream, repository) it fetches for: a follower for another repository must confirm
its own with the upstream first (repository scoping). It is taken with one script that
sets the key when it is free *or* still names the holder the caller saw die (takeover),
and returns whoever holds it afterwards, so a caller learns in one round trip whether it
owns the fetch or whom to follow. Renewal and release compare before they act, so a
replica never extends or deletes a lease another has taken over.

The holders hash records which replicas have committed a digest (and for which
repository they proved it); it is refreshed on every commit and a holder is removed when
it evicts the digest or answers that it does not have it.

Everything goes through ``RedisLayer.run``: advisory, behind the breaker. ``None`` from a
call means Redis could not answer, and the caller falls back to per-process behaviour.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from proxy.cache.redis import RedisLayer
from proxy.model import Digest

HOLDERS_TTL = 86400

_ACQUIRE = """
local current = redis.call('GET', KEYS[1])
if current == false or current == ARGV[2] then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[3])
  return ARGV[1]
end
return current
"""
_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


@dataclass(frozen=True, slots=True)
class LeaseHolder:
    """Who holds a lease: a process (``node``), where it is reached, and the (upstream,
    repository) it fetches for."""

    node: str
    address: str
    upstream: str
    repo: str

    @property
    def origin(self) -> tuple[str, str]:
        return (self.upstream, self.repo)

    def encode(self) -> str:
        return f"{self.node} {self.address} {self.upstream} {self.repo}"

    @classmethod
    def parse(cls, value: Any) -> LeaseHolder | None:
        parts = _text(value).split(" ")
        if len(parts) != 4 or not all(parts):
            return None
        return cls(*parts)


class RedisLeases:
    """Leases on keys under ``<p>:v1:lease:``, living ``ttl`` seconds unless renewed."""

    def __init__(self, layer: RedisLayer, ttl: float) -> None:
        self._layer = layer
        self.ttl = ttl
        self._acquire = layer.client.register_script(_ACQUIRE)
        self._renew = layer.client.register_script(_RENEW)
        self._release = layer.client.register_script(_RELEASE)

    def key(self, *parts: str) -> str:
        return self._layer.key("lease", *parts)

    def blob_key(self, digest: Digest) -> str:
        return self.key("blob", digest.algorithm, digest.hex)

    def _ttl_ms(self, ttl: float | None = None) -> int:
        return max(1, int((self.ttl if ttl is None else ttl) * 1000))

    async def acquire(
        self,
        key: str,
        holder: LeaseHolder,
        *,
        replacing: LeaseHolder | None = None,
        ttl: float | None = None,
    ) -> LeaseHolder | None:
        """Take the lease (for ``ttl``, default the configured one) if it is free, or if
        it still names ``replacing`` (a holder the caller saw fail); return whoever holds
        it afterwards (``holder`` itself when taken). None: Redis did not answer (or held
        something unreadable)."""
        stale = replacing.encode() if replacing is not None else ""
        ms = self._ttl_ms(ttl)
        value = await self._layer.run(
            "lease", lambda: self._acquire(keys=[key], args=[holder.encode(), stale, ms])
        )
        return LeaseHolder.parse(value) if value is not None else None

    async def renew(self, key: str, holder: LeaseHolder) -> bool | None:
        """Extend the lease if ``holder`` still holds it: True; False if it is lost;
        None if Redis did not answer."""
        done = await self._layer.run(
            "lease", lambda: self._renew(keys=[key], args=[holder.encode(), self._ttl_ms()])
        )
        return None if done is None else bool(done)

    async def release(self, key: str, holder: LeaseHolder) -> None:
        """Delete the lease if ``holder`` still holds it. Idempotent."""
        await self._layer.run("lease", lambda: self._release(keys=[key], args=[holder.encode()]))

    async def held_by(self, key: str, holder: LeaseHolder) -> bool | None:
        """Whether ``holder`` holds the lease now; None if Redis did not answer (which
        says nothing about the holder)."""

        async def read() -> tuple[Any]:
            return (await self._layer.client.get(key),)  # a tuple: an absent key is (None,)

        answer = await self._layer.run("get", read)
        if answer is None:
            return None
        return answer[0] is not None and LeaseHolder.parse(answer[0]) == holder


class RedisHolders:
    """Which replicas hold a committed digest, and for which (upstream, repository)."""

    def __init__(self, layer: RedisLayer, *, ttl: int = HOLDERS_TTL) -> None:
        self._layer = layer
        self._ttl = ttl

    def _key(self, digest: Digest) -> str:
        return self._layer.key("holders", digest.algorithm, digest.hex)

    async def add(self, digest: Digest, address: str, origin: tuple[str, str]) -> None:
        key = self._key(digest)

        async def write() -> None:
            async with self._layer.client.pipeline(transaction=True) as pipe:
                pipe.hset(key, address, f"{origin[0]} {origin[1]}")
                pipe.expire(key, self._ttl)
                await pipe.execute()

        await self._layer.run("set", write)

    async def get(self, digest: Digest) -> dict[str, tuple[str, str]]:
        """Holder address -> the (upstream, repository) it proved; {} when unknown."""
        key = self._key(digest)
        fields = await self._layer.run("get", lambda: self._layer.client.hgetall(key))
        found: dict[str, tuple[str, str]] = {}
        for address, origin in (fields or {}).items():
            upstream, _, repo = _text(origin).partition(" ")
            if upstream and repo:
                found[_text(address)] = (upstream, repo)
        return found

    async def remove(self, digest: Digest, address: str) -> None:
        key = self._key(digest)
        await self._layer.run("clear", lambda: self._layer.client.hdel(key, address))
