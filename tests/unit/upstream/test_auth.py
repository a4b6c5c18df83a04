"""UpstreamAuth: challenges, the Bearer token flow against a fake token service, caching."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import aiohttp
import pytest
from aiohttp import web
from pytest_aiohttp import AiohttpServer

from proxy.errors import Denied, UpstreamError, UpstreamUnavailable
from proxy.upstream.auth import (
    DEFAULT_TOKEN_LIFETIME,
    TOKEN_EXPIRY_MARGIN,
    Challenge,
    UpstreamAuth,
    parse_challenge,
    pull_scope,
)
from tests.unit.clock import Clock
from tests.unit.fake_registry import AUTH_BEARER, FakeRegistry, basic


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


async def token_service(aiohttp_server: AiohttpServer, registry: FakeRegistry) -> tuple[str, str]:
    """Start ``registry``; return its realm URL and a Bearer challenge naming it."""
    server = await aiohttp_server(registry.app())
    realm = str(server.make_url("/token"))
    return realm, f'Bearer realm="{realm}",service="fake"'


# --- parsing ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        (
            'Bearer realm="https://auth.docker.io/token",service="registry.docker.io"',
            Challenge(
                "bearer",
                {"realm": "https://auth.docker.io/token", "service": "registry.docker.io"},
            ),
        ),
        (
            'Bearer realm="https://r/token",service="s",scope="repository:a/b:pull,push"',
            Challenge(
                "bearer",
                {"realm": "https://r/token", "service": "s", "scope": "repository:a/b:pull,push"},
            ),
        ),
        ('Basic realm="Registry Realm"', Challenge("basic", {"realm": "Registry Realm"})),
        ("BASIC Realm=plain", Challenge("basic", {"realm": "plain"})),
        (
            'Bearer realm="a \\"quoted\\" realm"',
            Challenge("bearer", {"realm": 'a \\"quoted\\" realm'}),
        ),
        ("Negotiate", Challenge("negotiate", {})),
    ],
)
def test_parse_challenge(header: str, expected: Challenge) -> None:
    assert parse_challenge(header) == expected


def test_pull_scope() -> None:
    assert pull_scope("library/nginx") == "repository:library/nginx:pull"
    assert pull_scope(None) is None


# --- schemes ------------------------------------------------------------------------------


async def test_no_header_before_any_challenge(session: aiohttp.ClientSession) -> None:
    auth = UpstreamAuth(session, "user", "pass")
    assert await auth.header("library/nginx") is None


async def test_basic_challenge_with_credentials(session: aiohttp.ClientSession) -> None:
    auth = UpstreamAuth(session, "user", "pa:ss")
    retry = await auth.on_challenge('Basic realm="x"', "library/nginx")
    assert retry == basic("user", "pa:ss")
    # The scheme is remembered: the next request authenticates up front.
    assert await auth.header("library/redis") == basic("user", "pa:ss")


async def test_basic_challenge_without_credentials_cannot_retry(
    session: aiohttp.ClientSession,
) -> None:
    auth = UpstreamAuth(session, None, None)
    assert await auth.on_challenge('Basic realm="x"', "library/nginx") is None
    assert await auth.header("library/nginx") is None


@pytest.mark.parametrize("header", [None, "", "Negotiate", 'Bearer service="no realm"'])
async def test_unusable_challenge_cannot_retry(
    session: aiohttp.ClientSession, header: str | None
) -> None:
    auth = UpstreamAuth(session, "user", "pass")
    assert await auth.on_challenge(header, "library/nginx") is None


# --- Bearer ---------------------------------------------------------------------------------


async def test_bearer_fetches_a_token_for_the_repository_scope(
    aiohttp_server: AiohttpServer, session: aiohttp.ClientSession
) -> None:
    registry = FakeRegistry(auth=AUTH_BEARER)
    _, challenge = await token_service(aiohttp_server, registry)
    auth = UpstreamAuth(session, None, None)

    assert await auth.on_challenge(challenge, "library/nginx") == "Bearer token-1"

    (request,) = registry.token_requests
    assert request.query == {"service": "fake", "scope": "repository:library/nginx:pull"}
    assert request.authorization is None


async def test_bearer_sends_basic_credentials_to_the_token_service(
    aiohttp_server: AiohttpServer, session: aiohttp.ClientSession
) -> None:
    registry = FakeRegistry(auth=AUTH_BEARER, username="robot", password="s3cret")
    _, challenge = await token_service(aiohttp_server, registry)
    auth = UpstreamAuth(session, "robot", "s3cret")

    assert await auth.on_challenge(challenge, "team/app") == "Bearer token-1"
    (request,) = registry.token_requests
    assert request.authorization == basic("robot", "s3cret")
    assert request.query["scope"] == "repository:team/app:pull"


async def test_bearer_token_is_cached_per_scope(
    aiohttp_server: AiohttpServer, session: aiohttp.ClientSession
) -> None:
    registry = FakeRegistry(auth=AUTH_BEARER)
    _, challenge = await token_service(aiohttp_server, registry)
    auth = UpstreamAuth(session, None, None)
    await auth.on_challenge(challenge, "library/nginx")

    assert await auth.header("library/nginx") == "Bearer token-1"
    assert len(registry.token_requests) == 1

    assert await auth.header("library/redis") == "Bearer token-2"
    assert registry.token_requests[1].query["scope"] == "repository:library/redis:pull"
    assert await auth.header("library/nginx") == "Bearer token-1"
    assert len(registry.token_requests) == 2


async def test_bearer_token_expires(
    aiohttp_server: AiohttpServer, session: aiohttp.ClientSession
) -> None:
    registry = FakeRegistry(auth=AUTH_BEARER, token_lifetime=300)
    _, challenge = await token_service(aiohttp_server, registry)
    clock = Clock(1000.0)
    auth = UpstreamAuth(session, None, None, clock=clock)
    await auth.on_challenge(challenge, "library/nginx")

    clock.now += 300 - TOKEN_EXPIRY_MARGIN - 1
    assert await auth.header("library/nginx") == "Bearer token-1"
    clock.now += 2
    assert await auth.header("library/nginx") == "Bearer token-2"


async def test_bearer_token_without_expires_in_lives_60_seconds(
    aiohttp_server: AiohttpServer, session: aiohttp.ClientSession
) -> None:
    registry = FakeRegistry(auth=AUTH_BEARER, token_lifetime=None)
    _, challenge = await token_service(aiohttp_server, registry)
    clock = Clock(1000.0)
    auth = UpstreamAuth(session, None, None, clock=clock)
    await auth.on_challenge(challenge, "library/nginx")

    clock.now += DEFAULT_TOKEN_LIFETIME - TOKEN_EXPIRY_MARGIN - 1
    assert await auth.header("library/nginx") == "Bearer token-1"
    clock.now += 2
    assert await auth.header("library/nginx") == "Bearer token-2"


async def test_a_new_challenge_drops_the_refused_token(
    aiohttp_server: AiohttpServer, session: aiohttp.ClientSession
) -> None:
    registry = FakeRegistry(auth=AUTH_BEARER)
    _, challenge = await token_service(aiohttp_server, registry)
    auth = UpstreamAuth(session, None, None)
    await auth.on_challenge(challenge, "library/nginx")

    assert await auth.on_challenge(challenge, "library/nginx") == "Bearer token-2"


async def test_concurrent_requests_share_one_token_fetch(
    aiohttp_server: AiohttpServer, session: aiohttp.ClientSession
) -> None:
    registry = FakeRegistry(auth=AUTH_BEARER)
    _, challenge = await token_service(aiohttp_server, registry)
    auth = UpstreamAuth(session, None, None)
    await auth.on_challenge(challenge, "library/nginx")

    headers = await asyncio.gather(*(auth.header("library/redis") for _ in range(5)))

    assert headers == ["Bearer token-2"] * 5
    assert len(registry.token_requests) == 2


async def test_token_service_refusing_credentials_is_denied(
    aiohttp_server: AiohttpServer, session: aiohttp.ClientSession
) -> None:
    registry = FakeRegistry(auth=AUTH_BEARER, username="robot", password="right")
    _, challenge = await token_service(aiohttp_server, registry)
    auth = UpstreamAuth(session, "robot", "wrong")
    with pytest.raises(Denied):
        await auth.on_challenge(challenge, "library/nginx")


async def test_unreadable_token_answer_is_an_upstream_error(
    aiohttp_server: AiohttpServer, session: aiohttp.ClientSession
) -> None:
    async def garbage(_request: web.Request) -> web.Response:
        return web.Response(text="<html>not json</html>")

    app = web.Application()
    app.router.add_get("/token", garbage)
    server = await aiohttp_server(app)
    auth = UpstreamAuth(session, None, None)
    with pytest.raises(UpstreamError):
        await auth.on_challenge(f'Bearer realm="{server.make_url("/token")}"', "a/b")


async def test_unreachable_token_service_is_unavailable(
    session: aiohttp.ClientSession, unused_port: int
) -> None:
    auth = UpstreamAuth(session, None, None)
    with pytest.raises(UpstreamUnavailable):
        await auth.on_challenge(f'Bearer realm="http://127.0.0.1:{unused_port}/token"', "a/b")
