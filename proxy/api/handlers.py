"""HTTP handlers of the pull side of the OCI distribution API.

The only code that touches ``web.Request`` and ``web.Response``. Paths under ``/v2/`` are
parsed here (repository names contain slashes, so one route takes the whole tail and
the last ``/manifests/``, ``/blobs/`` or ``/tags/list`` splits it), validated with the
spec's grammar, routed to an upstream, and handed to the pull-through services.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import re
from dataclasses import dataclass
from urllib.parse import parse_qsl, urlencode, urlsplit

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, generate_latest

from proxy import metrics
from proxy.access.control import IDENTITY_KEY, AccessControl
from proxy.access.identity import Credential, Identity, parse_authorization
from proxy.access.limits import QuotaGate
from proxy.api.middlewares import (
    ETAG_KEY,
    NAMESPACE_KEY,
    OUTCOME_KEY,
    ROUTE_KEY,
    SENT_KEY,
    UPSTREAM_KEY,
)
from proxy.errors import Denied, RegistryError, RouteUnknown, Unauthorized, Unsupported
from proxy.interfaces import ColdFetchGate, FetchingBlob, LocalBlob
from proxy.model import (
    MEDIA_TYPE_OCTET_STREAM,
    Digest,
    Outcome,
    Reference,
    parse_digest,
    parse_reference,
)
from proxy.pullthrough.operations import CacheOperations
from proxy.pullthrough.registry import PullThroughRegistry, UpstreamServices
from proxy.pullthrough.warm import PinRefresher, Warmer, warm_refs
from proxy.routing import Route, Router

log = logging.getLogger(__name__)

REGISTRY_KEY = web.AppKey("registry", PullThroughRegistry)
METRICS_REGISTRY_KEY = web.AppKey("metrics_registry", CollectorRegistry)
ROUTER_KEY = web.AppKey("router", Router)
ACCESS_KEY = web.AppKey("access", AccessControl)
PIN_REFRESHER_KEY = web.AppKey("pin_refresher", PinRefresher)
"""Started only with ``cache.pin_refresh`` and ``cache.pin`` set."""
READ_METHODS = frozenset({"GET", "HEAD"})


@dataclass(frozen=True, slots=True)
class Target:
    kind: str  # manifest | blob | tags
    name: str
    reference: str


def parse_target(tail: str) -> Target:
    """Split ``<name>/manifests/<ref>``, ``<name>/blobs/<digest>``, ``<name>/tags/list``."""
    if len(tail) > MAX_CACHED_TAIL:
        return _parse_target(tail)
    return _parsed_target(tail)


def _parse_target(tail: str) -> Target:
    if tail.endswith("/tags/list"):
        return Target("tags", tail[: -len("/tags/list")], "")
    name, found, reference = tail.rpartition("/referrers/")
    if found and name and reference and "/" not in reference:
        return Target("referrers", name, reference)
    if "/blobs/uploads" in tail and _UPLOADS.search(tail):
        raise Unsupported("this is a pull-through cache: pushing is not supported")
    for marker, kind in (("/manifests/", "manifest"), ("/blobs/", "blob")):
        name, found, reference = tail.rpartition(marker)
        if found and name and reference and "/" not in reference:
            return Target(kind, name, reference)
    raise RouteUnknown(f"not an endpoint of this registry: {tail[:200]!r}")


_UPLOADS = re.compile(r"/blobs/uploads(?:/[^/]*)?$")
MAX_CACHED_TAIL = 512
# A pull asks for the same paths again and again; what parses is remembered (a path that
# does not raises again each time).
_parsed_target = functools.lru_cache(maxsize=4096)(_parse_target)


async def base(request: web.Request) -> web.Response:
    """``/v2/``: 200, or, with access control engaged, 401 and the challenge until the
    client presents credentials this proxy accepts (how clients learn to log in)."""
    request[ROUTE_KEY] = "base"
    control = request.app[ACCESS_KEY]
    if control.engaged:
        identity = await control.identify(request)
        await _admit(request, control, identity)
        accepted = identity.authenticated
        if identity.kind == "passthrough" and identity.credential is not None:
            accepted = await control.login_accepted(identity)
        if not accepted:
            raise Unauthorized(
                "authentication required",
                headers={"WWW-Authenticate": control.challenge(request, None, None)},
            )
    return web.json_response({})


async def _admit(request: web.Request, control: AccessControl, identity: Identity) -> None:
    """Count the request for its identity and apply the request rate limit."""
    control.usage.add(identity.key, identity.label, "requests")
    if control.limits.requests is not None:
        await control.limits.admit_request(identity.key, identity.label)


def _served(request: web.Request, source: str, size: int) -> None:
    _served_bytes(source).inc(size)
    identity = request.get(IDENTITY_KEY)
    if identity is not None:
        counter = "cache_bytes" if source == "cache" else "upstream_bytes"
        request.app[ACCESS_KEY].usage.add(identity.key, identity.label, counter, size)


@functools.lru_cache(maxsize=8)
def _served_bytes(source: str) -> Counter:
    """The labelled child, looked up once (``labels()`` validates and locks each call)."""
    return metrics.SERVED_BYTES.labels(source)


async def dispatch(request: web.Request) -> web.StreamResponse:
    tail = request.match_info["tail"]
    if request.method not in READ_METHODS:
        request[ROUTE_KEY] = "write"
        raise Unsupported("this is a pull-through cache: push, delete and mount are not supported")
    target = parse_target(tail)
    request[ROUTE_KEY] = target.kind
    route = request.app[ROUTER_KEY].route(target.name, request.query.get("ns"))  # validates
    request[UPSTREAM_KEY] = route.upstream.name
    if route.namespace is not None:
        request[NAMESPACE_KEY] = route.namespace
    services = request.app[REGISTRY_KEY].services(route.upstream)
    control = request.app[ACCESS_KEY]
    identity = await control.identify(request)
    await _admit(request, control, identity)
    gate = _gate(control, identity)
    if target.kind == "manifest":
        reference = parse_reference(target.reference)
        await control.authorize(request, route.upstream, route.repo, target.name, str(reference))
        response = await manifest(request, route, services, reference, gate)
    elif target.kind == "blob":
        digest = parse_digest(target.reference)
        response = await blob(request, route, digest, target.name, gate)
    elif target.kind == "referrers":
        digest = Digest.parse(target.reference)
        await control.authorize(request, route.upstream, route.repo, target.name, None)
        response = await referrers(request, route, services, digest, target.name)
    else:
        await control.authorize(request, route.upstream, route.repo, target.name, None)
        response = await tags_list(request, route, services, target.name)
    return response


def _gate(control: AccessControl, identity: Identity) -> QuotaGate | None:
    if not control.limits.has_quotas:
        return None
    return QuotaGate(control.limits, identity.key, identity.label)


async def manifest(
    request: web.Request,
    route: Route,
    services: UpstreamServices,
    reference: Reference,
    gate: ColdFetchGate | None = None,
) -> web.StreamResponse:
    # Clients (skopeo, containerd) send one Accept line per media type: read them all.
    accept = ", ".join(request.headers.getall("Accept", [])) or None
    result = await services.manifests.get(route.repo, reference, accept, gate)
    stored = result.manifest
    request[OUTCOME_KEY] = result.outcome
    digest = str(stored.digest)
    request[ETAG_KEY] = f'"{digest}"'
    headers = {"Docker-Content-Digest": digest}
    if gate is not None and result.outcome is Outcome.MISS:
        await gate.charge(len(stored.body))
    if _not_modified(request, stored.digest):
        return web.Response(status=304, headers=headers)
    headers["Content-Type"] = stored.media_type
    if request.method == "HEAD":
        headers["Content-Length"] = str(len(stored.body))
        return web.Response(headers=headers)
    _served(request, result.outcome.source, len(stored.body))
    return web.Response(body=stored.body, headers=headers)


async def blob(
    request: web.Request,
    route: Route,
    digest: Digest,
    client_name: str,
    gate: ColdFetchGate | None = None,
) -> web.StreamResponse:
    """A blob through the repository's chain, access control its outermost layer."""
    headers = {
        "Docker-Content-Digest": str(digest),
        "Content-Type": MEDIA_TYPE_OCTET_STREAM,
        "Accept-Ranges": "bytes",
    }
    etag = f'"{digest}"'
    control = request.app[ACCESS_KEY]
    if _not_modified(request, digest):
        # Nothing is looked up for a 304, but it is still an answer about the blob.
        await control.authorize(request, route.upstream, route.repo, client_name, None)
        request[ETAG_KEY] = etag
        return web.Response(status=304, headers=headers)
    access = control.blob_layer(request, route.upstream, route.repo, client_name)
    blobs = request.app[REGISTRY_KEY].blobs(
        route.upstream, route.repo, middleware=(access,), gate=gate
    )
    # The ETag only once the chain has answered: never on a denial or a 404.
    if request.method == "HEAD":
        descriptor = await blobs.stat(digest)
        request[ETAG_KEY] = etag
        headers["Content-Length"] = str(descriptor.size)
        return web.Response(headers=headers)
    opened = await blobs.open(digest)
    request[ETAG_KEY] = etag
    request[OUTCOME_KEY] = opened.outcome
    if isinstance(opened, LocalBlob):
        _served(request, opened.outcome.source, opened.descriptor.size)
        return web.FileResponse(opened.path, headers=headers)
    if gate is not None and opened.outcome is Outcome.MISS and opened.fetch.size is not None:
        await gate.charge(opened.fetch.size)
    return await _stream_fetch(request, opened, headers)


async def _stream_fetch(
    request: web.Request, opened: FetchingBlob, headers: dict[str, str]
) -> web.StreamResponse:
    """Follow a fetch in progress. On failure, abort the connection: never a clean 200,
    and never anything but more of the same body after the headers.

    With a known length the bytes go out with ``loop.sendfile`` straight from the temp
    file (no copies through Python, no buffers), and the bytes a pass-through fetch holds
    in memory with ``write``; without a length, chunked through ``write``.
    """
    fetch = opened.fetch
    response = web.StreamResponse(headers=headers)
    if fetch.size is not None:
        response.content_length = fetch.size
    await response.prepare(request)
    source = opened.outcome.source
    try:
        if fetch.size is not None and request.transport is not None:
            loop = asyncio.get_running_loop()
            async with contextlib.aclosing(fetch.spans()) as spans:
                async for span in spans:
                    if isinstance(span, memoryview):
                        await response.write(span)
                        _served(request, source, len(span))
                        continue
                    file, offset, length = span
                    await loop.sendfile(request.transport, file, offset, length)
                    request[SENT_KEY] = request.get(SENT_KEY, 0) + length
                    _served(request, source, length)
        else:
            async with contextlib.aclosing(fetch.read()) as chunks:
                async for chunk in chunks:
                    await response.write(chunk)
                    _served(request, source, len(chunk))
    except RegistryError as exc:
        log.warning("aborting blob response: %s", exc.message, extra={"digest": str(fetch.digest)})
        _abort(request, response)
        return response
    except (ConnectionError, RuntimeError):
        # The client went away (RuntimeError: sendfile on a closing transport); the
        # fetch goes on without it.
        return response
    except Exception:
        # Headers are out: an error answer now would land in the middle of the body.
        log.exception("aborting blob response", extra={"digest": str(fetch.digest)})
        _abort(request, response)
        return response
    await response.write_eof()
    return response


def _abort(request: web.Request, response: web.StreamResponse) -> None:
    response.force_close()
    if request.transport is not None:
        request.transport.abort()


async def tags_list(
    request: web.Request, route: Route, services: UpstreamServices, client_name: str
) -> web.Response:
    # Only the spec's pagination parameters go upstream; an ``n`` that is no number is
    # dropped rather than relayed.
    params = {k: v for k, v in request.query.items() if k in ("n", "last")}
    if not params.get("n", "0").isdigit():
        del params["n"]
    key = (route.repo, params.get("n"), params.get("last"))
    relayed = await services.tag_lists.get(
        key, lambda: services.client.tags_list(route.repo, params)
    )
    answer = relayed.answer
    request[OUTCOME_KEY] = relayed.outcome
    headers = {"Content-Type": answer.headers.get("Content-Type", "application/json")}
    link = answer.headers.get("Link")
    if link:
        headers["Link"] = _rewrite_link(link, "tags/list", client_name, route.namespace)
    body = answer.body
    try:
        data = json.loads(body)
        if isinstance(data, dict) and data.get("name") == route.repo:
            data["name"] = client_name
            body = json.dumps(data).encode()
    except ValueError:
        pass
    return web.Response(body=body, headers=headers)


async def referrers(
    request: web.Request,
    route: Route,
    services: UpstreamServices,
    digest: Digest,
    client_name: str,
) -> web.Response:
    """The referrers index, relayed and cached; an upstream 404 is passed through so
    clients fall back to the tag schema."""
    params = {k: v for k, v in request.query.items() if k == "artifactType"}
    key = (route.repo, str(digest), params.get("artifactType"))
    relayed = await services.referrers.get(
        key, lambda: services.client.referrers(route.repo, digest, params)
    )
    answer = relayed.answer
    request[OUTCOME_KEY] = relayed.outcome
    headers = {k: v for k, v in answer.headers.items() if k != "Link"}
    link = answer.headers.get("Link")
    if link:
        headers["Link"] = _rewrite_link(link, f"referrers/{digest}", client_name, route.namespace)
    return web.Response(status=answer.status, body=answer.body, headers=headers)


def _rewrite_link(link: str, endpoint: str, client_name: str, namespace: str | None) -> str:
    """Point the upstream's ``Link: </v2/<repo>/<endpoint>?...>; rel="next"`` at us."""
    target, _, rest = link.partition(";")
    url = target.strip().strip("<>")
    query = [(k, v) for k, v in parse_qsl(urlsplit(url).query) if k != "ns"]
    if namespace is not None:
        query.append(("ns", namespace))
    return f"</v2/{client_name}/{endpoint}?{urlencode(query)}>;{rest}"


def _not_modified(request: web.Request, digest: Digest) -> bool:
    value = request.headers.get("If-None-Match")
    if not value:
        return False
    etags = {item.strip().removeprefix("W/") for item in value.split(",")}
    return f'"{digest}"' in etags or "*" in etags


MAX_SCOPES = 32
MAX_TOKEN_FORM = 16 << 10


async def token(request: web.Request) -> web.Response:
    """The token service: GET (Basic credentials optional) and the OAuth2 password grant
    (POST, as containerd sends it). Grants what ``decide`` allows of the scopes asked."""
    request[ROUTE_KEY] = "token"
    control = request.app[ACCESS_KEY]
    if control.tokens is None:
        raise RouteUnknown("the token service is off: access control is not configured")
    address = control.address(request)
    await control.limits.admit_request(f"ip:{address}", "anonymous")
    credential = None
    if request.method == "POST":
        if (request.content_length or 0) > MAX_TOKEN_FORM:
            raise Unauthorized("token request too large")
        form = await request.post()
        grant = form.get("grant_type")
        if grant != "password":
            raise Unsupported(f"grant_type {str(grant)[:40]!r} is not supported; use password")
        username, password = form.get("username"), form.get("password")
        if not isinstance(username, str) or not isinstance(password, str) or not username:
            raise Unauthorized("username and password are required")
        credential = Credential(username, password)
        scope_value = form.get("scope")
        scopes = str(scope_value).split() if isinstance(scope_value, str) else []
    else:
        presented = parse_authorization(request.headers.get("Authorization"))
        if presented is not None:
            if presented.credential is None:
                raise Unauthorized("the token service takes Basic credentials")
            credential = presented.credential
        scopes = [s for value in request.query.getall("scope", []) for s in value.split()]
    service = request.query.get("service")
    if service is not None and service != control.service:
        raise Unauthorized(f"tokens are issued for service {control.service!r} only")
    if len(scopes) > MAX_SCOPES:
        raise Unauthorized(f"at most {MAX_SCOPES} scopes per token")
    try:
        answer = await control.issue(request, credential, scopes)
    except Unauthorized as exc:
        metrics.ACCESS_DECISIONS.labels("deny", "bad_credentials").inc()
        exc.headers.setdefault("WWW-Authenticate", 'Basic realm="registry-proxy"')
        raise
    return web.json_response(answer)


async def _require_admin(request: web.Request) -> None:
    """401 with the challenge for the anonymous, 403 for users not in ``access.admins``."""
    request[ROUTE_KEY] = "admin"
    control = request.app[ACCESS_KEY]
    identity = await control.identify(request)
    if not control.is_admin(identity):
        if not identity.authenticated:
            raise Unauthorized(
                "authentication required",
                headers={"WWW-Authenticate": control.challenge(request, None, None)},
            )
        raise Denied("the admin endpoints are for access.admins")


async def admin_usage(request: web.Request) -> web.Response:
    """The top identities by requests (``?top=N``, default 20), for ``access.admins``."""
    await _require_admin(request)
    control = request.app[ACCESS_KEY]
    top = request.query.get("top", "20")
    count = min(int(top), 1000) if top.isdigit() and int(top) > 0 else 20
    return web.json_response({"identities": await control.usage.top(count)})


async def metrics_endpoint(request: web.Request) -> web.Response:
    request[ROUTE_KEY] = "metrics"
    # Workers: every worker's metrics, combined (proxy.metrics.multiprocess_registry).
    collectors = request.app.get(METRICS_REGISTRY_KEY)
    body = generate_latest() if collectors is None else generate_latest(collectors)
    response = web.Response(body=body)
    response.headers["Content-Type"] = CONTENT_TYPE_LATEST
    return response


async def healthz(request: web.Request) -> web.Response:
    request[ROUTE_KEY] = "health"
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    request[ROUTE_KEY] = "health"
    ready, report = await request.app[REGISTRY_KEY].readiness()
    return web.json_response(
        {"status": "ready" if ready else "unready", **report}, status=200 if ready else 503
    )


def _flag(request: web.Request, name: str) -> bool:
    return request.query.get(name, "").lower() in ("1", "true", "yes")


def _operations(request: web.Request) -> CacheOperations:
    return CacheOperations(request.app[REGISTRY_KEY])


async def admin_cache_stats(request: web.Request) -> web.Response:
    """``registry-proxy cache stats`` against this proxy."""
    await _require_admin(request)
    return web.json_response(await _operations(request).stats())


async def admin_cache_images(request: web.Request) -> web.Response:
    """``cache ls [PATTERN]``: images with size, last pull, pinned (``?pattern=``)."""
    await _require_admin(request)
    pattern = request.query.get("pattern") or None
    return web.json_response({"images": await _operations(request).images(pattern)})


async def admin_cache_evict(request: web.Request) -> web.Response:
    """``cache evict PATTERN`` (``?pattern=``, required)."""
    await _require_admin(request)
    pattern = request.query.get("pattern")
    if not pattern:
        raise Unsupported("evict needs ?pattern=<upstream>/<repository>:<tag> (globs)")
    return web.json_response(await _operations(request).evict(pattern))


async def admin_cache_gc(request: web.Request) -> web.Response:
    """``cache gc [--dry-run]`` (``?dry_run=1``)."""
    await _require_admin(request)
    return web.json_response(await _operations(request).gc(dry_run=_flag(request, "dry_run")))


async def admin_cache_verify(request: web.Request) -> web.Response:
    """``cache verify [--repair]`` (``?repair=1``)."""
    await _require_admin(request)
    return web.json_response(await _operations(request).verify(repair=_flag(request, "repair")))


MAX_PREWARM_BODY = 1 << 20


async def admin_cache_prewarm(request: web.Request) -> web.StreamResponse:
    """``registry-proxy prewarm``: body ``{"refs": [...], "platforms": [...] | null}``
    (null: every platform). Answers JSON lines as it goes (``image``, ``progress``,
    ``done`` per reference, then ``summary``); one failing reference fails only itself."""
    await _require_admin(request)
    if (request.content_length or 0) > MAX_PREWARM_BODY:
        raise Unsupported("prewarm request too large")
    try:
        body = await request.json()
        refs = [str(ref) for ref in body["refs"]]
        platforms = body.get("platforms")
        wanted = None if platforms is None else {str(p) for p in platforms}
    except (ValueError, KeyError, TypeError):
        raise Unsupported('prewarm takes {"refs": [...], "platforms": [...] | null}') from None
    response = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
    await response.prepare(request)
    events: asyncio.Queue[dict[str, object] | None] = asyncio.Queue()
    warmer = Warmer(request.app[REGISTRY_KEY])

    async def run() -> list[str]:
        return await warm_refs(warmer, request.app[ROUTER_KEY], refs, wanted, events.put_nowait)

    # The work belongs to the request: a client that hangs up stops it (fetches already
    # started are the application's and finish on their own, as for any client).
    task = asyncio.create_task(run(), name="prewarm")
    task.add_done_callback(lambda _t: events.put_nowait(None))
    try:
        while (event := await events.get()) is not None:
            await response.write(json.dumps(event).encode() + b"\n")
        failed = await task
    finally:
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
    summary = {"event": "summary", "refs": len(refs), "failed": failed}
    await response.write(json.dumps(summary).encode() + b"\n")
    await response.write_eof()
    return response
