"""Request middleware: OCI error rendering and request metrics.

Only this layer turns a ``RegistryError`` into the spec's JSON body. Anything else that
escapes a handler is a bug: it is logged once here and answered 500 with an OCI body.
"""

from __future__ import annotations

import json
import logging
import time

from aiohttp import web
from aiohttp.typedefs import Handler

from proxy import metrics
from proxy.errors import RegistryError

log = logging.getLogger(__name__)

API_VERSION_HEADER = "Docker-Distribution-API-Version"
API_VERSION = "registry/2.0"
ROUTE_KEY = web.RequestKey("route", str)
ETAG_KEY = web.RequestKey("etag", str)
UPSTREAM_KEY = web.RequestKey("upstream", str)
NAMESPACE_KEY = web.RequestKey("namespace", str)
CACHED_ROUTES = frozenset({"manifest", "blob", "tags", "referrers"})


def error_response(
    status: int,
    code: str,
    message: str,
    detail: object = None,
    headers: dict[str, str] | None = None,
) -> web.Response:
    body = {"errors": [{"code": code, "message": message, "detail": detail}]}
    return web.Response(
        status=status,
        body=json.dumps(body).encode(),
        content_type="application/json",
        headers=headers,
    )


def render(exc: RegistryError) -> web.Response:
    return error_response(exc.status, exc.code, exc.message, exc.detail, exc.headers)


@web.middleware
async def errors_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except RegistryError as exc:
        return render(exc)
    except web.HTTPMethodNotAllowed:
        return error_response(405, "UNSUPPORTED", "method not allowed")
    except web.HTTPNotFound:
        return error_response(404, "UNSUPPORTED", f"no such endpoint: {request.path[:200]!r}")
    except web.HTTPException:
        raise
    except Exception:
        log.exception("unhandled error", extra={"path": request.path[:200]})
        return error_response(500, "UNKNOWN", "internal error")


def outcome(response: web.StreamResponse) -> str:
    """hit, miss, coalesced, revalidated, stale (from X-Cache), denied, error or none."""
    cache = response.headers.get("X-Cache")
    if cache:
        return cache.lower()
    if response.status in (401, 403):
        return "denied"
    if response.status >= 500:
        return "error"
    return "none"


@web.middleware
async def metrics_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    started = time.monotonic()
    response: web.StreamResponse | None = None
    try:
        response = await handler(request)
        return response
    finally:
        route = request.get(ROUTE_KEY, "other")
        status = response.status if response is not None else 500
        metrics.REQUESTS.labels(route, request.method, metrics.status_class(status)).inc()
        metrics.REQUEST_SECONDS.labels(route).observe(time.monotonic() - started)
        if route in CACHED_ROUTES:
            kind = outcome(response) if response is not None else "error"
            metrics.CACHE_RESPONSES.labels(route, kind).inc()


async def on_response_prepare(request: web.Request, response: web.StreamResponse) -> None:
    """Headers every response carries, set last so that nothing overrides them."""
    response.headers[API_VERSION_HEADER] = API_VERSION
    namespace = request.get(NAMESPACE_KEY)
    if namespace is not None:
        response.headers["OCI-Namespace"] = namespace
    etag = request.get(ETAG_KEY)
    if etag is not None:
        response.headers["ETag"] = etag
        response.headers.pop("Last-Modified", None)
