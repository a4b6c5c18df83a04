"""Upstream authentication: anonymous, Basic, and the registry Bearer-token flow.

The first 401 from an upstream teaches us its scheme. For Bearer, the challenge names a
token ``realm`` and ``service``; we GET ``realm?service=..&scope=repository:<repo>:pull``
(with Basic credentials when configured) and cache the token per scope until shortly
before it expires (``expires_in``, 60 s when absent). Concurrent requests for one scope
share one token fetch. Credentials are only ever sent to the upstream's own origin and
to the realm it named.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass

import aiohttp
from cachetools import LRUCache

from proxy.errors import Denied, UpstreamError, UpstreamUnavailable

log = logging.getLogger(__name__)

DEFAULT_TOKEN_LIFETIME = 60.0
TOKEN_EXPIRY_MARGIN = 10.0
MAX_TOKEN_RESPONSE = 1 << 20
MAX_CACHED_TOKENS = 10_000

_PARAM = re.compile(r'(\w+)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^\s,]+))')


@dataclass(frozen=True, slots=True)
class Challenge:
    scheme: str
    params: dict[str, str]


def parse_challenge(header: str) -> Challenge:
    """``Bearer realm="...",service="...",scope="..."`` -> Challenge."""
    scheme, _, rest = header.strip().partition(" ")
    params = {
        m.group(1).lower(): (m.group(2) if m.group(2) is not None else m.group(3))
        for m in _PARAM.finditer(rest)
    }
    return Challenge(scheme.lower(), params)


def pull_scope(repo: str | None) -> str | None:
    return f"repository:{repo}:pull" if repo else None


class UpstreamAuth:
    """Produces the Authorization header for one upstream, learning from its challenges."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        username: str | None,
        password: str | None,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._session = session
        self._basic = (
            "Basic " + base64.b64encode(f"{username}:{password or ''}".encode()).decode()
            if username is not None
            else None
        )
        self._clock = clock
        self._challenge: Challenge | None = None
        self._tokens: LRUCache[str | None, tuple[str, float]] = LRUCache(MAX_CACHED_TOKENS)
        self._pending: dict[str | None, asyncio.Task[str]] = {}

    async def header(self, repo: str | None) -> str | None:
        """The Authorization value to send, fetching a token when needed and known how."""
        challenge = self._challenge
        if challenge is None:
            return None
        if challenge.scheme == "basic":
            return self._basic
        if challenge.scheme == "bearer":
            return "Bearer " + await self._token(pull_scope(repo))
        return None

    async def on_challenge(self, www_authenticate: str | None, repo: str | None) -> str | None:
        """Handle a 401: remember the scheme; return the header to retry with, or None.

        None means retrying cannot help (no usable challenge, or Basic without credentials).
        A token already cached for this scope was refused, so it is dropped first.
        """
        if not www_authenticate:
            return None
        challenge = parse_challenge(www_authenticate)
        self._challenge = challenge
        scope = pull_scope(repo)
        self._tokens.pop(scope, None)
        if challenge.scheme == "basic":
            return self._basic
        if challenge.scheme == "bearer" and "realm" in challenge.params:
            return "Bearer " + await self._token(scope)
        return None

    async def _token(self, scope: str | None) -> str:
        cached = self._tokens.get(scope)
        if cached is not None and cached[1] > self._clock():
            return cached[0]
        task = self._pending.get(scope)
        if task is None:
            task = asyncio.create_task(self._fetch_token(scope))
            self._pending[scope] = task
            task.add_done_callback(lambda _t: self._pending.pop(scope, None))
        return await asyncio.shield(task)

    async def _fetch_token(self, scope: str | None) -> str:
        challenge = self._challenge
        assert challenge is not None
        realm = challenge.params["realm"]
        query: list[tuple[str, str]] = []
        if "service" in challenge.params:
            query.append(("service", challenge.params["service"]))
        if scope is not None:
            query.append(("scope", scope))
        headers = {"Authorization": self._basic} if self._basic else {}
        try:
            async with self._session.get(realm, params=query, headers=headers) as resp:
                if resp.status in (401, 403):
                    raise Denied("the upstream's token service refused the credentials")
                if resp.status != 200:
                    raise UpstreamError(f"token service answered {resp.status}")
                body = await resp.content.read(MAX_TOKEN_RESPONSE)
        except (aiohttp.ClientError, TimeoutError) as exc:
            # Never the exception's repr: aiohttp's carries the request headers.
            reason = type(exc).__name__
            if isinstance(exc, aiohttp.ClientResponseError):
                reason += f" (HTTP {exc.status})"
            raise UpstreamUnavailable(f"token service unreachable: {reason}") from exc
        try:
            data = json.loads(body)
            token = data.get("token") or data.get("access_token")
            lifetime = float(data.get("expires_in") or DEFAULT_TOKEN_LIFETIME)
        except (ValueError, AttributeError, TypeError):
            raise UpstreamError("token service sent an unreadable answer") from None
        if not isinstance(token, str) or not token:
            raise UpstreamError("token service sent no token")
        expires = self._clock() + max(lifetime - TOKEN_EXPIRY_MARGIN, lifetime / 2)
        self._tokens[scope] = (token, expires)
        return token
