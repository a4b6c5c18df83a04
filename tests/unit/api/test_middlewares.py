"""The request middleware: OCI error bodies, request and cache metrics, and the headers
every response carries (API version, OCI-Namespace, X-Cache, Warning, ETag).

Each test serves a tiny application with the production middleware and signal in front
of a handler that sets request keys or raises. Metrics are process-global, so they are
read as deltas.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, make_mocked_request
from prometheus_client import REGISTRY
from pytest_aiohttp import AiohttpClient

from proxy.api import middlewares
from proxy.api.middlewares import (
    ETAG_KEY,
    MIDDLEWARES,
    NAMESPACE_KEY,
    OUTCOME_KEY,
    ROUTE_KEY,
    api_middleware,
    on_response_prepare,
    outcome,
)
from proxy.errors import (
    BlobUnknown,
    Denied,
    DigestMismatch,
    ManifestUnknown,
    NameInvalid,
    RegistryError,
    TooLarge,
    TooManyRequests,
    Unauthorized,
    Unsupported,
    UpstreamError,
    UpstreamUnavailable,
)
from proxy.model import Outcome

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
Serve = Callable[[Handler], Awaitable[TestClient[Any, Any]]]
DIGEST = "sha256:" + "ab" * 32


def app_for(handler: Handler) -> web.Application:
    """What create_app wires, around one handler at /x (any method) and a GET-only route."""
    app = web.Application(middlewares=MIDDLEWARES)
    app.on_response_prepare.append(on_response_prepare)
    app.router.add_route("*", "/x", handler)
    app.router.add_get("/only-get", handler)
    return app


@pytest.fixture
def serve(aiohttp_client: AiohttpClient) -> Serve:
    async def start(handler: Handler) -> TestClient[Any, Any]:
        return await aiohttp_client(app_for(handler))

    return start


def responding(
    status: int = 200,
    *,
    route: str | None = None,
    reported: Outcome | None = None,
    namespace: str | None = None,
    etag: str | None = None,
) -> Handler:
    async def handler(request: web.Request) -> web.StreamResponse:
        if route is not None:
            request[ROUTE_KEY] = route
        if reported is not None:
            request[OUTCOME_KEY] = reported
        if namespace is not None:
            request[NAMESPACE_KEY] = namespace
        if etag is not None:
            request[ETAG_KEY] = etag
        return web.Response(status=status, body=b"" if status in (204, 304) else b"body")

    return handler


def raising(error: BaseException, *, route: str | None = None) -> Handler:
    async def handler(request: web.Request) -> web.StreamResponse:
        if route is not None:
            request[ROUTE_KEY] = route
        raise error

    return handler


async def oci_error(response: aiohttp.ClientResponse) -> dict[str, Any]:
    """The single error of an OCI error body, checking the body's shape."""
    assert response.content_type == "application/json"
    body = json.loads(await response.read())
    assert set(body) == {"errors"}
    (error,) = body["errors"]
    assert set(error) == {"code", "message", "detail"}
    result: dict[str, Any] = error
    return result


def sample(name: str, **labels: str) -> float:
    value = REGISTRY.get_sample_value(name, labels)
    return value if value is not None else 0.0


def requests_total(route: str, method: str, status: str) -> float:
    return sample("registry_proxy_http_requests_total", route=route, method=method, status=status)


def cache_responses(route: str, reported: str) -> float:
    return sample("registry_proxy_cache_responses_total", route=route, outcome=reported)


# --- api_middleware: errors ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("error_class", "status", "code"),
    [
        (BlobUnknown, 404, "BLOB_UNKNOWN"),
        (ManifestUnknown, 404, "MANIFEST_UNKNOWN"),
        (NameInvalid, 400, "NAME_INVALID"),
        (Unsupported, 405, "UNSUPPORTED"),
        (Unauthorized, 401, "UNAUTHORIZED"),
        (Denied, 403, "DENIED"),
        (TooManyRequests, 429, "TOOMANYREQUESTS"),
        (UpstreamError, 502, "UNAVAILABLE"),
        (UpstreamUnavailable, 503, "UNAVAILABLE"),
        (DigestMismatch, 502, "DIGEST_INVALID"),
        (TooLarge, 502, "SIZE_INVALID"),
        (RegistryError, 500, "UNKNOWN"),
    ],
)
async def test_registry_errors_are_rendered_as_oci_errors(
    serve: Serve, error_class: type[RegistryError], status: int, code: str
) -> None:
    client = await serve(raising(error_class("what went wrong")))

    response = await client.get("/x")

    assert response.status == status
    assert await oci_error(response) == {
        "code": code,
        "message": "what went wrong",
        "detail": None,
    }


async def test_the_error_detail_is_rendered_as_json(serve: Serve) -> None:
    detail = {"digest": DIGEST, "sizes": [1, 2]}
    client = await serve(raising(BlobUnknown("blob unknown", detail=detail)))

    response = await client.get("/x")

    assert (await oci_error(response))["detail"] == detail


async def test_the_error_headers_are_sent(serve: Serve) -> None:
    error = TooManyRequests("slow down", headers={"Retry-After": "42"})
    client = await serve(raising(error))

    response = await client.get("/x")

    assert response.status == 429
    assert response.headers["Retry-After"] == "42"
    assert (await oci_error(response))["code"] == "TOOMANYREQUESTS"


async def test_a_head_error_has_the_status_and_no_body(serve: Serve) -> None:
    client = await serve(raising(ManifestUnknown("no such manifest")))

    response = await client.head("/x")

    assert response.status == 404
    assert await response.read() == b""


async def test_an_unknown_exception_is_a_500_unknown_logged_once(
    serve: Serve, caplog: pytest.LogCaptureFixture
) -> None:
    client = await serve(raising(RuntimeError("secret detail of /etc/shadow")))

    with caplog.at_level(logging.DEBUG):
        response = await client.get("/x")
        error = await oci_error(response)

    assert response.status == 500
    assert error == {"code": "UNKNOWN", "message": "internal error", "detail": None}
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1
    assert errors[0].name == "proxy.api.middlewares"
    assert errors[0].exc_info is not None
    assert isinstance(errors[0].exc_info[1], RuntimeError)


async def test_an_unknown_exception_does_not_leak_its_message(serve: Serve) -> None:
    client = await serve(raising(RuntimeError("secret detail of /etc/shadow")))

    response = await client.get("/x")

    assert response.status == 500
    assert b"secret" not in await response.read()


async def test_an_unknown_path_is_an_oci_404(serve: Serve) -> None:
    client = await serve(responding())

    response = await client.get("/nowhere")

    assert response.status == 404
    error = await oci_error(response)
    assert error["code"] == "UNSUPPORTED"
    assert "/nowhere" in error["message"]


async def test_the_path_in_a_404_is_truncated(serve: Serve) -> None:
    client = await serve(responding())
    path = "/" + "a" * 5000

    response = await client.get(path)

    assert response.status == 404
    message = (await oci_error(response))["message"]
    assert "a" * 199 in message
    assert "a" * 201 not in message


async def test_a_method_not_routed_is_an_oci_405(serve: Serve) -> None:
    client = await serve(responding())

    response = await client.post("/only-get")

    assert response.status == 405
    assert (await oci_error(response))["code"] == "UNSUPPORTED"


async def test_a_405_says_which_methods_are_allowed(serve: Serve) -> None:
    client = await serve(responding())

    response = await client.post("/only-get")

    assert response.status == 405
    assert set(response.headers["Allow"].split(",")) == {"GET", "HEAD"}


async def test_other_http_exceptions_pass_through_unchanged(serve: Serve) -> None:
    client = await serve(raising(web.HTTPBadRequest(text="plain refusal")))

    response = await client.get("/x")

    assert response.status == 400
    assert await response.text() == "plain refusal"


async def test_a_raised_redirect_is_not_turned_into_an_error(serve: Serve) -> None:
    client = await serve(raising(web.HTTPTemporaryRedirect("/elsewhere")))

    response = await client.get("/x", allow_redirects=False)

    assert response.status == 307
    assert response.headers["Location"] == "/elsewhere"


# --- outcome --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "expected"),
    [
        (200, Outcome.NONE),
        (206, Outcome.NONE),
        (304, Outcome.NONE),
        (400, Outcome.NONE),
        (404, Outcome.NONE),
        (429, Outcome.NONE),
        (401, Outcome.DENIED),
        (403, Outcome.DENIED),
        (500, Outcome.ERROR),
        (502, Outcome.ERROR),
        (503, Outcome.ERROR),
    ],
)
def test_outcome_from_the_status_when_nothing_was_reported(status: int, expected: Outcome) -> None:
    request = make_mocked_request("GET", "/x")
    assert outcome(request, web.Response(status=status)) is expected


def test_outcome_without_a_response_is_an_error() -> None:
    assert outcome(make_mocked_request("GET", "/x"), None) is Outcome.ERROR


@pytest.mark.parametrize("status", [200, 401, 503])
@pytest.mark.parametrize("reported", [Outcome.HIT, Outcome.STALE, Outcome.MISS])
def test_a_reported_outcome_wins_over_the_status(status: int, reported: Outcome) -> None:
    request = make_mocked_request("GET", "/x")
    request[OUTCOME_KEY] = reported
    assert outcome(request, web.Response(status=status)) is reported
    assert outcome(request, None) is reported


# --- api_middleware: metrics -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "status_class"),
    [
        (200, "2xx"),
        (204, "2xx"),
        (304, "3xx"),
        (404, "4xx"),
        (429, "429"),
        (500, "5xx"),
        (503, "5xx"),
    ],
)
async def test_requests_are_counted_by_route_method_and_status_class(
    serve: Serve, status: int, status_class: str
) -> None:
    client = await serve(responding(status, route="tags"))
    before = requests_total("tags", "GET", status_class)

    response = await client.get("/x")

    assert response.status == status
    assert requests_total("tags", "GET", status_class) - before == 1


async def test_the_method_is_a_label(serve: Serve) -> None:
    client = await serve(responding(route="blob"))
    get_before = requests_total("blob", "GET", "2xx")
    head_before = requests_total("blob", "HEAD", "2xx")

    await client.head("/x")

    assert requests_total("blob", "HEAD", "2xx") - head_before == 1
    assert requests_total("blob", "GET", "2xx") == get_before


async def test_a_request_with_no_route_is_counted_as_other(serve: Serve) -> None:
    client = await serve(responding())
    before = requests_total("other", "GET", "4xx")

    response = await client.get("/nowhere")

    assert response.status == 404
    assert requests_total("other", "GET", "4xx") - before == 1


async def test_a_rendered_registry_error_is_counted_with_its_status(serve: Serve) -> None:
    client = await serve(raising(TooManyRequests("slow down"), route="manifest"))
    throttled = requests_total("manifest", "GET", "429")
    none = cache_responses("manifest", "none")

    await client.get("/x")

    assert requests_total("manifest", "GET", "429") - throttled == 1
    assert cache_responses("manifest", "none") - none == 1


async def test_an_unknown_exception_is_counted_as_a_5xx_error(serve: Serve) -> None:
    client = await serve(raising(RuntimeError("bug"), route="blob"))
    errors = requests_total("blob", "GET", "5xx")
    error_outcomes = cache_responses("blob", "error")

    await client.get("/x")

    assert requests_total("blob", "GET", "5xx") - errors == 1
    assert cache_responses("blob", "error") - error_outcomes == 1


async def test_a_raised_http_exception_is_counted_with_its_status(serve: Serve) -> None:
    client = await serve(raising(web.HTTPRequestEntityTooLarge(1024, 4096), route="manifest"))
    client_errors = requests_total("manifest", "GET", "4xx")

    response = await client.get("/x")

    assert response.status == 413
    assert requests_total("manifest", "GET", "4xx") - client_errors == 1


async def test_an_exception_escaping_the_chain_is_counted_and_re_raised() -> None:
    # What escapes the middleware (a cancelled request) has no response, and counts as a
    # 5xx error.
    request = make_mocked_request("GET", "/x")

    async def handler(request: web.Request) -> web.StreamResponse:
        request[ROUTE_KEY] = "referrers"
        raise asyncio.CancelledError

    errors = requests_total("referrers", "GET", "5xx")
    error_outcomes = cache_responses("referrers", "error")

    with pytest.raises(asyncio.CancelledError):
        await api_middleware(request, handler)

    assert requests_total("referrers", "GET", "5xx") - errors == 1
    assert cache_responses("referrers", "error") - error_outcomes == 1


@pytest.mark.parametrize("route", ["manifest", "blob", "tags", "referrers"])
@pytest.mark.parametrize("reported", list(Outcome))
async def test_cached_routes_count_the_reported_outcome(
    serve: Serve, route: str, reported: Outcome
) -> None:
    client = await serve(responding(route=route, reported=reported))
    before = cache_responses(route, reported.value)

    await client.get("/x")

    assert cache_responses(route, reported.value) - before == 1


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (Unauthorized("log in"), "denied"),
        (Denied("no"), "denied"),
        (UpstreamUnavailable("down"), "error"),
        (ManifestUnknown("no such manifest"), "none"),
    ],
)
async def test_cached_routes_count_the_outcome_the_status_implies(
    serve: Serve, error: RegistryError, expected: str
) -> None:
    client = await serve(raising(error, route="manifest"))
    before = cache_responses("manifest", expected)

    await client.get("/x")

    assert cache_responses("manifest", expected) - before == 1


@pytest.mark.parametrize("route", ["base", "other", "metrics"])
async def test_other_routes_count_no_cache_outcome(serve: Serve, route: str) -> None:
    client = await serve(responding(route=route, reported=Outcome.HIT))

    response = await client.get("/x")

    assert response.status == 200
    assert (
        REGISTRY.get_sample_value(
            "registry_proxy_cache_responses_total", {"route": route, "outcome": "hit"}
        )
        is None
    )


class FakeTime:
    """Stands in for the ``time`` module the middleware reads (and only there)."""

    def __init__(self) -> None:
        self.now = 5000.0

    def monotonic(self) -> float:
        return self.now


async def test_the_latency_is_observed_per_route(
    serve: Serve, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = FakeTime()
    monkeypatch.setattr(middlewares, "time", clock)

    async def slow(request: web.Request) -> web.StreamResponse:
        request[ROUTE_KEY] = "tags"
        clock.now += 0.375
        return web.Response(body=b"{}")

    client = await serve(slow)
    name = "registry_proxy_http_request_duration_seconds"
    count, total = sample(name + "_count", route="tags"), sample(name + "_sum", route="tags")
    within = sample(name + "_bucket", route="tags", le="0.5")
    below = sample(name + "_bucket", route="tags", le="0.25")

    await client.get("/x")

    assert sample(name + "_count", route="tags") - count == 1
    assert sample(name + "_sum", route="tags") - total == pytest.approx(0.375)
    assert sample(name + "_bucket", route="tags", le="0.5") - within == 1
    assert sample(name + "_bucket", route="tags", le="0.25") == below


# --- on_response_prepare --------------------------------------------------------------------


async def test_every_response_carries_the_api_version(serve: Serve) -> None:
    client = await serve(raising(RuntimeError("bug")))

    responses = [
        await client.get("/only-get"),
        await client.get("/x"),
        await client.get("/nowhere"),
        await client.post("/only-get"),
    ]

    assert [r.status for r in responses] == [500, 500, 404, 405]
    assert {r.headers["Docker-Distribution-API-Version"] for r in responses} == {"registry/2.0"}


async def test_a_passed_through_http_exception_carries_the_api_version(serve: Serve) -> None:
    client = await serve(raising(web.HTTPBadRequest()))

    response = await client.get("/x")

    assert response.status == 400
    assert response.headers["Docker-Distribution-API-Version"] == "registry/2.0"


async def test_the_namespace_is_sent_when_known(serve: Serve) -> None:
    client = await serve(responding(namespace="registry.example"))

    response = await client.get("/x")

    assert response.headers["OCI-Namespace"] == "registry.example"


async def test_no_namespace_header_when_none_is_known(serve: Serve) -> None:
    client = await serve(responding())

    response = await client.get("/x")

    assert "OCI-Namespace" not in response.headers
    assert "X-Cache" not in response.headers
    assert "Warning" not in response.headers
    assert "ETag" not in response.headers


@pytest.mark.parametrize("reported", list(Outcome))
async def test_x_cache_says_the_reported_outcome(serve: Serve, reported: Outcome) -> None:
    client = await serve(responding(reported=reported))

    response = await client.get("/x")

    assert response.headers["X-Cache"] == reported.header
    if reported is Outcome.STALE:
        assert response.headers.getall("Warning") == ['110 - "Response is Stale"']
    else:
        assert "Warning" not in response.headers


async def test_the_headers_override_what_the_handler_set(serve: Serve) -> None:
    async def handler(request: web.Request) -> web.StreamResponse:
        request[OUTCOME_KEY] = Outcome.HIT
        request[NAMESPACE_KEY] = "registry.example"
        request[ETAG_KEY] = f'"{DIGEST}"'
        headers = {
            "Docker-Distribution-API-Version": "bogus",
            "X-Cache": "MISS",
            "OCI-Namespace": "elsewhere",
            "ETag": '"weak"',
        }
        return web.Response(body=b"x", headers=headers)

    client = await serve(handler)

    response = await client.get("/x")

    assert response.headers.getall("Docker-Distribution-API-Version") == ["registry/2.0"]
    assert response.headers.getall("X-Cache") == ["HIT"]
    assert response.headers.getall("OCI-Namespace") == ["registry.example"]
    assert response.headers.getall("ETag") == [f'"{DIGEST}"']


async def test_the_etag_is_the_one_the_handler_reported(serve: Serve) -> None:
    client = await serve(responding(etag=f'"{DIGEST}"'))

    response = await client.get("/x")

    assert response.headers["ETag"] == f'"{DIGEST}"'


async def test_a_file_response_carries_the_reported_etag_and_no_last_modified(
    serve: Serve, tmp_path: Path
) -> None:
    blob = tmp_path / "blob"
    blob.write_bytes(b"blob bytes")

    async def handler(request: web.Request) -> web.StreamResponse:
        request[ETAG_KEY] = f'"{DIGEST}"'
        return web.FileResponse(blob)

    client = await serve(handler)

    response = await client.get("/x")

    assert response.status == 200
    assert await response.read() == b"blob bytes"
    assert response.headers.getall("ETag") == [f'"{DIGEST}"']
    assert "Last-Modified" not in response.headers


async def test_a_file_response_keeps_its_own_validators_when_no_etag_is_reported(
    serve: Serve, tmp_path: Path
) -> None:
    # The control for the test above: FileResponse does set both.
    blob = tmp_path / "blob"
    blob.write_bytes(b"blob bytes")

    async def handler(request: web.Request) -> web.StreamResponse:
        return web.FileResponse(blob)

    client = await serve(handler)

    response = await client.get("/x")

    assert response.status == 200
    assert "ETag" in response.headers
    assert response.headers["ETag"] != f'"{DIGEST}"'
    assert "Last-Modified" in response.headers
