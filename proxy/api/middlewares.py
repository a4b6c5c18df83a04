"""Request middleware: OCI error rendering, request metrics, and the headers every
response carries.

Only this layer turns a ``RegistryError`` into the spec's JSON body. Anything else that
escapes a handler is a bug: it is logged once here and answered 500 with an OCI body.

Handlers say what they did by setting request keys (``OUTCOME_KEY``, ``ETAG_KEY``, ...);
this module alone turns them into headers (``X-Cache``, ``Warning``, ``ETag``), and
``outcome`` into the metric label and the access log's field.
"""

from __future__ import annotations

import functools
import json
import logging
import time

from aiohttp import web, web_fileresponse
from aiohttp.typedefs import Handler
from prometheus_client import Counter, Histogram

from proxy import metrics
from proxy.errors import RegistryError
from proxy.model import Outcome

log = logging.getLogger(__name__)

API_VERSION_HEADER = "Docker-Distribution-API-Version"
API_VERSION = "registry/2.0"
ROUTE_KEY = web.RequestKey("route", str)
ETAG_KEY = web.RequestKey("etag", str)
UPSTREAM_KEY = web.RequestKey("upstream", str)
NAMESPACE_KEY = web.RequestKey("namespace", str)
OUTCOME_KEY = web.RequestKey("outcome", Outcome)
SENT_KEY = web.RequestKey("sent", int)
"""Body bytes a handler sent past aiohttp's writer (``loop.sendfile``), which the
response's ``body_length`` does not count."""
CACHE_HEADER = "X-Cache"
STALE_WARNING = '110 - "Response is Stale"'
CACHED_ROUTES = frozenset({"manifest", "blob", "tags", "referrers"})
CHILDREN = 1024


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


def sent_bytes(request: web.BaseRequest, response: web.StreamResponse) -> int:
    """Bytes of the answer that went out: what aiohttp's writer sent (status line,
    headers, a body written through it), what handlers sent by ``loop.sendfile``
    (``SENT_KEY``), and a ``FileResponse``'s file once it was all sent by
    ``loop.sendfile`` (its ``body_length`` is set only when that ended). A HEAD has no
    body, and aiohttp's fallback (``AIOHTTP_NOSENDFILE``, compression) writes the file
    through the writer, where ``body_length`` already counts it."""
    beside: int = request.get(SENT_KEY, 0)
    sent = response.body_length + beside
    if (
        isinstance(response, web.FileResponse)
        and response.body_length > 0
        and response.status in (200, 206)
        and request.method != "HEAD"
        and not (web_fileresponse.NOSENDFILE or response.compression)
    ):
        sent += response.content_length or 0
    return sent


def outcome(request: web.BaseRequest, response: web.StreamResponse | None) -> Outcome:
    """What the handler reported, else what the status says (denied, error or none)."""
    reported: Outcome | None = request.get(OUTCOME_KEY)
    if reported is not None:
        return reported
    if response is None or response.status >= 500:
        return Outcome.ERROR
    if response.status in (401, 403):
        return Outcome.DENIED
    return Outcome.NONE


@web.middleware
async def api_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Request metrics around OCI error rendering: one layer, so one more await per
    request rather than two. What a handler raises is counted with the status it is
    answered with; what escapes (a cancelled request) counts as a 5xx."""
    started = time.monotonic()
    response: web.StreamResponse | None = None
    try:
        response = await handler(request)
    except RegistryError as exc:
        response = render(exc)
    except web.HTTPMethodNotAllowed as exc:
        allow = ",".join(sorted(exc.allowed_methods))
        response = error_response(
            405, "UNSUPPORTED", "method not allowed", headers={"Allow": allow}
        )
    except web.HTTPNotFound:
        response = error_response(404, "UNSUPPORTED", f"no such endpoint: {request.path[:200]!r}")
    except web.HTTPException as exc:
        response = exc  # aiohttp answers it with its own status: count that one
        raise
    except Exception:
        log.exception("unhandled error", extra={"path": request.path[:200]})
        response = error_response(500, "UNKNOWN", "internal error")
    finally:
        _count(request, response, time.monotonic() - started)
    return response


MIDDLEWARES = (api_middleware,)
"""The application's middleware, outermost first."""


def _count(request: web.Request, response: web.StreamResponse | None, seconds: float) -> None:
    route = request.get(ROUTE_KEY, "other")
    status = response.status if response is not None else 500
    _requests(route, request.method, status).inc()
    _request_seconds(route).observe(seconds)
    if route in CACHED_ROUTES:
        _cache_responses(route, outcome(request, response).value).inc()


# Labelled children, looked up once per label values (``labels()`` validates and locks
# on every call). Bounded: a method is whatever token a client sends.
@functools.lru_cache(maxsize=CHILDREN)
def _requests(route: str, method: str, status: int) -> Counter:
    return metrics.REQUESTS.labels(route, method, metrics.status_class(status))


@functools.lru_cache(maxsize=CHILDREN)
def _request_seconds(route: str) -> Histogram:
    return metrics.REQUEST_SECONDS.labels(route)


@functools.lru_cache(maxsize=CHILDREN)
def _cache_responses(route: str, reported: str) -> Counter:
    return metrics.CACHE_RESPONSES.labels(route, reported)


async def on_response_prepare(request: web.Request, response: web.StreamResponse) -> None:
    """Headers every response carries, set last so that nothing overrides them."""
    response.headers[API_VERSION_HEADER] = API_VERSION
    namespace = request.get(NAMESPACE_KEY)
    if namespace is not None:
        response.headers["OCI-Namespace"] = namespace
    reported = request.get(OUTCOME_KEY)
    if reported is not None:
        response.headers[CACHE_HEADER] = reported.header
        if reported is Outcome.STALE:
            response.headers["Warning"] = STALE_WARNING
    etag = request.get(ETAG_KEY)
    if etag is not None:
        # After FileResponse's own ETag and Last-Modified: the digest is the identity.
        response.headers["ETag"] = etag
        response.headers.pop("Last-Modified", None)
