"""UpstreamClient against a fake registry: auth flows, redirects, typed errors, digests."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from aiohttp import web
from pytest_aiohttp import AiohttpServer

from proxy.errors import (
    BlobUnknown,
    Denied,
    DigestMismatch,
    ManifestUnknown,
    NameUnknown,
    TooManyRequests,
    UpstreamError,
    UpstreamUnavailable,
)
from proxy.interfaces import DetachableBlob
from proxy.model import (
    MANIFEST_MEDIA_TYPES,
    MEDIA_TYPE_DOCKER_MANIFEST,
    MEDIA_TYPE_OCI_MANIFEST,
    Digest,
)
from proxy.settings import UpstreamSettings
from proxy.upstream.client import SocketBody, UpstreamClient
from tests.unit.fake_registry import (
    AUTH_BASIC,
    AUTH_BEARER,
    BlobStorage,
    Failure,
    FakeRegistry,
    basic,
    manifest_body,
)

REPO = "team/app"
BODY = manifest_body("v1")
DIGEST = Digest.of(BODY)
BLOB = b"layer " * 5000

ClientFactory = Callable[..., Awaitable[UpstreamClient]]


@pytest.fixture
async def make_client() -> AsyncIterator[ClientFactory]:
    """``await make_client(url, username=..., password=...)``; closed after the test."""
    clients: list[UpstreamClient] = []

    async def make(url: str, **settings: Any) -> UpstreamClient:
        client = UpstreamClient.create(UpstreamSettings(name="fake", url=url, **settings))
        clients.append(client)
        return client

    yield make
    for client in clients:
        await client.close()


async def serve(aiohttp_server: AiohttpServer, registry: FakeRegistry) -> str:
    server = await aiohttp_server(registry.app())
    return f"http://{server.host}:{server.port}"


# --- anonymous ------------------------------------------------------------------------------


async def test_anonymous_manifest_by_tag(
    aiohttp_server: AiohttpServer, make_client: ClientFactory
) -> None:
    registry = FakeRegistry()
    registry.add_manifest(REPO, "v1", BODY)
    client = await make_client(await serve(aiohttp_server, registry))

    manifest = await client.get_manifest(REPO, "v1", None)

    assert (manifest.digest, manifest.media_type, manifest.size) == (
        DIGEST,
        MEDIA_TYPE_OCI_MANIFEST,
        len(BODY),
    )
    assert manifest.body == BODY
    (request,) = registry.v2_requests()
    assert request.method == "GET"
    assert request.path == f"/v2/{REPO}/manifests/v1"
    assert request.authorization is None
    accept = request.headers["Accept"]
    assert all(media_type in accept for media_type in MANIFEST_MEDIA_TYPES)


async def test_client_accept_is_passed_on(
    aiohttp_server: AiohttpServer, make_client: ClientFactory
) -> None:
    registry = FakeRegistry()
    registry.add_manifest(REPO, "v1", BODY)
    client = await make_client(await serve(aiohttp_server, registry))
    await client.get_manifest(REPO, "v1", MEDIA_TYPE_DOCKER_MANIFEST)
    assert registry.v2_requests()[0].headers["Accept"] == MEDIA_TYPE_DOCKER_MANIFEST


async def test_manifest_head_has_no_body(
    aiohttp_server: AiohttpServer, make_client: ClientFactory
) -> None:
    registry = FakeRegistry()
    registry.add_manifest(REPO, "v1", BODY)
    client = await make_client(await serve(aiohttp_server, registry))

    head = await client.get_manifest(REPO, "v1", None, head=True)

    assert (head.digest, head.size, head.body) == (DIGEST, len(BODY), None)
    assert registry.v2_requests()[0].method == "HEAD"


async def test_manifest_by_digest(
    aiohttp_server: AiohttpServer, make_client: ClientFactory
) -> None:
    registry = FakeRegistry()
    registry.add_manifest(REPO, None, BODY)
    client = await make_client(await serve(aiohttp_server, registry))
    assert (await client.get_manifest(REPO, str(DIGEST), None)).body == BODY


async def test_blob_and_head_blob(
    aiohttp_server: AiohttpServer, make_client: ClientFactory
) -> None:
    registry = FakeRegistry()
    digest = registry.add_blob(REPO, BLOB)
    client = await make_client(await serve(aiohttp_server, registry))

    head = await client.head_blob(REPO, digest)
    async with client.open_blob(REPO, digest) as blob:
        size = blob.size
        data = b"".join([chunk async for chunk in blob.chunks()])

    assert head.size == len(BLOB)
    assert head.digest == digest
    assert size == len(BLOB)
    assert data == BLOB
    assert [r.method for r in registry.v2_requests()] == ["HEAD", "GET"]


async def test_tags_list_passes_params_and_link(
    aiohttp_server: AiohttpServer, make_client: ClientFactory
) -> None:
    registry = FakeRegistry()
    registry.tags[REPO] = ["a", "b"]
    registry.tags_link = f'</v2/{REPO}/tags/list?last=b&n=2>; rel="next"'
    client = await make_client(await serve(aiohttp_server, registry))

    relayed = await client.tags_list(REPO, {"n": "2"})

    assert relayed.status == 200
    assert relayed.headers["Link"] == registry.tags_link
    assert b'"tags": ["a", "b"]' in relayed.body
    assert registry.v2_requests()[0].query == {"n": "2"}


async def test_ping(aiohttp_server: AiohttpServer, make_client: ClientFactory) -> None:
    registry = FakeRegistry()
    client = await make_client(await serve(aiohttp_server, registry))
    await client.ping()
    assert registry.requests[0].path == "/v2/"


# --- Basic ----------------------------------------------------------------------------------


async def test_basic_auth_after_challenge_then_up_front(
    aiohttp_server: AiohttpServer, make_client: ClientFactory
) -> None:
    registry = FakeRegistry(auth=AUTH_BASIC, username="robot", password="s3cret")
    registry.add_manifest(REPO, "v1", BODY)
    client = await make_client(
        await serve(aiohttp_server, registry), username="robot", password="s3cret"
    )

    await client.get_manifest(REPO, "v1", None)
    await client.get_manifest(REPO, "v1", None)

    sent = [r.authorization for r in registry.v2_requests()]
    # First request anonymous (401), retried with Basic; the second authenticates at once.
    assert sent == [None, basic("robot", "s3cret"), basic("robot", "s3cret")]


async def test_basic_auth_with_wrong_password_is_denied(
    aiohttp_server: AiohttpServer, make_client: ClientFactory
) -> None:
    registry = FakeRegistry(auth=AUTH_BASIC, username="robot", password="s3cret")
    registry.add_manifest(REPO, "v1", BODY)
    client = await make_client(
        await serve(aiohttp_server, registry), username="robot", password="wrong"
    )
    with pytest.raises(Denied):
        await client.get_manifest(REPO, "v1", None)


async def test_basic_auth_without_credentials_is_denied(
    aiohttp_server: AiohttpServer, make_client: ClientFactory
) -> None:
    registry = FakeRegistry(auth=AUTH_BASIC, username="robot", password="s3cret")
    registry.add_manifest(REPO, "v1", BODY)
    client = await make_client(await serve(aiohttp_server, registry))
    with pytest.raises(Denied):
        await client.get_manifest(REPO, "v1", None)


# --- Bearer ---------------------------------------------------------------------------------


async def test_bearer_token_flow_with_credentials(
    aiohttp_server: AiohttpServer, make_client: ClientFactory
) -> None:
    registry = FakeRegistry(auth=AUTH_BEARER, username="robot", password="s3cret")
    registry.add_manifest(REPO, "v1", BODY)
    client = await make_client(
        await serve(aiohttp_server, registry), username="robot", password="s3cret"
    )

    assert (await client.get_manifest(REPO, "v1", None)).body == BODY

    (token_request,) = registry.token_requests
    assert token_request.query == {"service": "fake", "scope": f"repository:{REPO}:pull"}
    assert token_request.authorization == basic("robot", "s3cret")
    assert [r.authorization for r in registry.v2_requests()] == [None, "Bearer token-1"]


async def test_bearer_token_is_reused(
    aiohttp_server: AiohttpServer, make_client: ClientFactory
) -> None:
    registry = FakeRegistry(auth=AUTH_BEARER)
    registry.add_manifest(REPO, "v1", BODY)
    digest = registry.add_blob(REPO, BLOB)
    client = await make_client(await serve(aiohttp_server, registry))

    await client.get_manifest(REPO, "v1", None)
    await client.get_manifest(REPO, "v1", None, head=True)
    await client.head_blob(REPO, digest)

    assert len(registry.token_requests) == 1
    assert registry.token_requests[0].authorization is None  # anonymous token
    assert [r.authorization for r in registry.v2_requests()] == [
        None,
        "Bearer token-1",
        "Bearer token-1",
        "Bearer token-1",
    ]


# --- redirects ------------------------------------------------------------------------------


async def test_cross_origin_blob_redirect_gets_no_credentials(
    aiohttp_server: AiohttpServer, make_client: ClientFactory
) -> None:
    registry = FakeRegistry(auth=AUTH_BASIC, username="robot", password="s3cret")
    digest = registry.add_blob(REPO, BLOB)
    storage = BlobStorage({str(digest): BLOB})
    storage_server = await aiohttp_server(storage.app())
    registry.blob_redirect = f"http://{storage_server.host}:{storage_server.port}/storage"
    client = await make_client(
        await serve(aiohttp_server, registry), username="robot", password="s3cret"
    )

    async with client.open_blob(REPO, digest) as blob:
        data = b"".join([chunk async for chunk in blob.chunks()])

    assert data == BLOB
    assert registry.v2_requests()[-1].authorization == basic("robot", "s3cret")
    (redirected,) = storage.requests
    assert redirected.path == f"/storage/{REPO}/{digest}"
    assert redirected.authorization is None


async def test_cross_origin_redirect_gets_no_bearer_token(
    aiohttp_server: AiohttpServer, make_client: ClientFactory
) -> None:
    registry = FakeRegistry(auth=AUTH_BEARER)
    digest = registry.add_blob(REPO, BLOB)
    storage = BlobStorage({str(digest): BLOB})
    storage_server = await aiohttp_server(storage.app())
    registry.blob_redirect = f"http://{storage_server.host}:{storage_server.port}/storage"
    client = await make_client(await serve(aiohttp_server, registry))

    async with client.open_blob(REPO, digest) as blob:
        assert b"".join([chunk async for chunk in blob.chunks()]) == BLOB

    assert registry.v2_requests()[-1].authorization == "Bearer token-1"
    assert storage.requests[0].authorization is None


async def test_same_origin_redirect_keeps_credentials(
    aiohttp_server: AiohttpServer, make_client: ClientFactory
) -> None:
    registry = FakeRegistry(auth=AUTH_BASIC, username="robot", password="s3cret")
    digest = registry.add_blob(REPO, BLOB)
    url = await serve(aiohttp_server, registry)
    registry.blob_redirect = f"{url}/moved"
    client = await make_client(url, username="robot", password="s3cret")

    async with client.open_blob(REPO, digest) as blob:
        assert b"".join([chunk async for chunk in blob.chunks()]) == BLOB

    moved = [r for r in registry.requests if r.path.startswith("/moved/")]
    assert len(moved) == 1
    assert moved[0].authorization == basic("robot", "s3cret")


# --- typed errors ---------------------------------------------------------------------------


async def test_429_is_too_many_requests_with_retry_after(
    aiohttp_server: AiohttpServer, make_client: ClientFactory
) -> None:
    registry = FakeRegistry()
    registry.failure = Failure(429, {"Retry-After": "42"})
    client = await make_client(await serve(aiohttp_server, registry))

    with pytest.raises(TooManyRequests) as info:
        await client.get_manifest(REPO, "v1", None)

    assert info.value.status == 429
    assert info.value.headers["Retry-After"] == "42"


@pytest.mark.parametrize("status", [500, 502, 503])
async def test_5xx_is_an_upstream_error(
    aiohttp_server: AiohttpServer, make_client: ClientFactory, status: int
) -> None:
    registry = FakeRegistry()
    registry.failure = Failure(status)
    client = await make_client(await serve(aiohttp_server, registry), retries=0)

    with pytest.raises(UpstreamError) as info:
        await client.get_manifest(REPO, "v1", None)

    assert not isinstance(info.value, UpstreamUnavailable | DigestMismatch)
    assert info.value.status == 502
    assert len(registry.v2_requests()) == 1


async def test_5xx_is_retried_then_reported(
    aiohttp_server: AiohttpServer, make_client: ClientFactory
) -> None:
    registry = FakeRegistry()
    registry.failure = Failure(503)
    client = await make_client(await serve(aiohttp_server, registry), retries=1)

    with pytest.raises(UpstreamError):
        await client.get_manifest(REPO, "v1", None)

    assert len(registry.v2_requests()) == 2


async def test_429_is_not_retried(
    aiohttp_server: AiohttpServer, make_client: ClientFactory
) -> None:
    registry = FakeRegistry()
    registry.failure = Failure(429, {"Retry-After": "5"})
    client = await make_client(await serve(aiohttp_server, registry), retries=2)

    with pytest.raises(TooManyRequests):
        await client.get_manifest(REPO, "v1", None)

    assert len(registry.v2_requests()) == 1


async def test_403_is_denied(aiohttp_server: AiohttpServer, make_client: ClientFactory) -> None:
    registry = FakeRegistry()
    registry.failure = Failure(403)
    client = await make_client(await serve(aiohttp_server, registry))
    with pytest.raises(Denied):
        await client.head_blob(REPO, DIGEST)


async def test_connection_refused_is_unavailable(
    make_client: ClientFactory, unused_port: int
) -> None:
    client = await make_client(f"http://127.0.0.1:{unused_port}", retries=0)
    with pytest.raises(UpstreamUnavailable) as info:
        await client.get_manifest(REPO, "v1", None)
    assert info.value.status == 503


async def test_unknown_things_are_404_errors_of_their_kind(
    aiohttp_server: AiohttpServer, make_client: ClientFactory
) -> None:
    registry = FakeRegistry()
    client = await make_client(await serve(aiohttp_server, registry))

    with pytest.raises(ManifestUnknown):
        await client.get_manifest(REPO, "v1", None)
    with pytest.raises(BlobUnknown):
        await client.head_blob(REPO, DIGEST)
    with pytest.raises(BlobUnknown):
        async with client.open_blob(REPO, DIGEST):
            pass
    with pytest.raises(NameUnknown):
        await client.tags_list(REPO, {})


# --- digests --------------------------------------------------------------------------------


async def test_manifest_by_digest_with_wrong_body_is_a_mismatch(
    aiohttp_server: AiohttpServer, make_client: ClientFactory
) -> None:
    registry = FakeRegistry()
    other = manifest_body("something else")
    registry.manifests[(REPO, str(DIGEST))] = (MEDIA_TYPE_OCI_MANIFEST, other)
    client = await make_client(await serve(aiohttp_server, registry))

    with pytest.raises(DigestMismatch):
        await client.get_manifest(REPO, str(DIGEST), None)


async def test_manifest_by_tag_contradicting_its_digest_header_is_a_mismatch(
    aiohttp_server: AiohttpServer, make_client: ClientFactory
) -> None:
    registry = FakeRegistry()
    registry.add_manifest(REPO, "v1", BODY)
    registry.lie_about_manifests = True  # body altered, Docker-Content-Digest unchanged
    client = await make_client(await serve(aiohttp_server, registry))

    with pytest.raises(DigestMismatch):
        await client.get_manifest(REPO, "v1", None)


# --- a body read off the event loop (detach) ------------------------------------------------

BIG_BLOB = bytes(range(256)) * (24 << 12)  # 6 MiB


def read_detached(body: SocketBody) -> bytes:
    """What a pump's receiver does, in short: ``readinto`` and ``wait`` until done."""
    out = bytearray()
    buffer = memoryview(bytearray(1 << 20))
    try:
        while not body.done:
            n = body.readinto(buffer)
            if n:
                out += buffer[:n]
            elif not body.wait(5.0):
                raise TimeoutError
    finally:
        body.close()
    return bytes(out)


async def test_a_plain_http_body_detaches_and_reads_whole_off_the_loop(
    aiohttp_server: AiohttpServer, make_client: ClientFactory
) -> None:
    registry = FakeRegistry()
    digest = registry.add_blob(REPO, BIG_BLOB)
    client = await make_client(await serve(aiohttp_server, registry))

    async with client.open_blob(REPO, digest) as blob:
        assert isinstance(blob, DetachableBlob)
        body = blob.detach()
        assert body is not None
        assert blob.detach() is None, "once only"
        data = await asyncio.to_thread(read_detached, body)
    assert data == BIG_BLOB
    # The detached connection is never handed to another request.
    async with client.open_blob(REPO, digest) as blob:
        assert b"".join([chunk async for chunk in blob.chunks()]) == BIG_BLOB


async def test_a_small_body_is_not_detached(
    aiohttp_server: AiohttpServer, make_client: ClientFactory
) -> None:
    registry = FakeRegistry()
    digest = registry.add_blob(REPO, BLOB)
    client = await make_client(await serve(aiohttp_server, registry))
    async with client.open_blob(REPO, digest) as blob:
        assert isinstance(blob, DetachableBlob)
        assert blob.detach() is None
        assert b"".join([chunk async for chunk in blob.chunks()]) == BLOB


async def test_chunks_resume_with_range_where_the_detached_reader_was_cut(
    aiohttp_server: AiohttpServer, make_client: ClientFactory
) -> None:
    digest = Digest.of(BIG_BLOB)
    cut = 5 << 20
    ranges: list[str | None] = []

    async def blob(request: web.Request) -> web.StreamResponse:
        ranges.append(request.headers.get("Range"))
        if request.headers.get("Range"):
            start = int(request.headers["Range"].removeprefix("bytes=").rstrip("-"))
            rest = BIG_BLOB[start:]
            return web.Response(
                status=206,
                body=rest,
                headers={"Content-Range": f"bytes {start}-{len(BIG_BLOB) - 1}/{len(BIG_BLOB)}"},
            )
        response = web.StreamResponse(headers={"Content-Length": str(len(BIG_BLOB))})
        await response.prepare(request)
        await response.write(BIG_BLOB[:cut])
        assert request.transport is not None
        request.transport.close()
        return response

    app = web.Application()
    app.router.add_get(f"/v2/{REPO}/blobs/{digest}", blob)
    client = await make_client(await serve_app(aiohttp_server, app))
    async with client.open_blob(REPO, digest) as opened:
        assert isinstance(opened, DetachableBlob)
        body = opened.detach()
        assert body is not None
        with pytest.raises(OSError):
            await asyncio.to_thread(read_detached, body)
        assert body.received == cut
        rest = b"".join([chunk async for chunk in opened.chunks()])
    assert BIG_BLOB[:cut] + rest == BIG_BLOB
    assert ranges == [None, f"bytes={cut}-"]


async def serve_app(aiohttp_server: AiohttpServer, app: web.Application) -> str:
    server = await aiohttp_server(app)
    return f"http://{server.host}:{server.port}"
