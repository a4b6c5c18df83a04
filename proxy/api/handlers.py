"""HTTP handlers of the pull side of the OCI distribution API.

The only code that touches ``web.Request`` and ``web.Response``. Paths under ``/v2/`` are
parsed here (repository names contain slashes, so one route takes the whole tail and
the last ``/manifests/``, ``/blobs/`` or ``/tags/list`` splits it), validated with the
spec's grammar, routed to an upstream, and handed to the pull-through services.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
from dataclasses import dataclass
from urllib.parse import parse_qsl, urlencode, urlsplit

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from proxy import metrics
from proxy.api.middlewares import ETAG_KEY, NAMESPACE_KEY, OUTCOME_KEY, ROUTE_KEY, UPSTREAM_KEY
from proxy.errors import RegistryError, RouteUnknown, Unsupported
from proxy.interfaces import FetchingBlob, LocalBlob
from proxy.model import MEDIA_TYPE_OCTET_STREAM, Digest, Reference
from proxy.pullthrough.registry import PullThroughRegistry, UpstreamServices
from proxy.routing import Route, Router

log = logging.getLogger(__name__)

REGISTRY_KEY = web.AppKey("registry", PullThroughRegistry)
ROUTER_KEY = web.AppKey("router", Router)
READ_METHODS = frozenset({"GET", "HEAD"})


@dataclass(frozen=True, slots=True)
class Target:
    kind: str  # manifest | blob | tags
    name: str
    reference: str


def parse_target(tail: str) -> Target:
    """Split ``<name>/manifests/<ref>``, ``<name>/blobs/<digest>``, ``<name>/tags/list``."""
    if tail.endswith("/tags/list"):
        return Target("tags", tail[: -len("/tags/list")], "")
    name, found, reference = tail.rpartition("/referrers/")
    if found and name and reference and "/" not in reference:
        return Target("referrers", name, reference)
    if re.search(r"/blobs/uploads(?:/[^/]*)?$", tail):
        raise Unsupported("this is a pull-through cache: pushing is not supported")
    for marker, kind in (("/manifests/", "manifest"), ("/blobs/", "blob")):
        name, found, reference = tail.rpartition(marker)
        if found and name and reference and "/" not in reference:
            return Target(kind, name, reference)
    raise RouteUnknown(f"not an endpoint of this registry: {tail[:200]!r}")


async def base(request: web.Request) -> web.Response:
    request[ROUTE_KEY] = "base"
    return web.json_response({})


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
    if target.kind == "manifest":
        response = await manifest(request, route, services, Reference.parse(target.reference))
    elif target.kind == "blob":
        response = await blob(request, route, services, Digest.parse(target.reference))
    elif target.kind == "referrers":
        digest = Digest.parse(target.reference)
        response = await referrers(request, route, services, digest, target.name)
    else:
        response = await tags_list(request, route, services, target.name)
    return response


async def manifest(
    request: web.Request, route: Route, services: UpstreamServices, reference: Reference
) -> web.StreamResponse:
    # Clients (skopeo, containerd) send one Accept line per media type: read them all.
    accept = ", ".join(request.headers.getall("Accept", [])) or None
    result = await services.manifests.get(route.repo, reference, accept)
    stored = result.manifest
    request[OUTCOME_KEY] = result.outcome
    request[ETAG_KEY] = f'"{stored.digest}"'
    headers = {"Docker-Content-Digest": str(stored.digest)}
    if _not_modified(request, stored.digest):
        return web.Response(status=304, headers=headers)
    headers["Content-Type"] = stored.media_type
    if request.method == "HEAD":
        headers["Content-Length"] = str(len(stored.body))
        return web.Response(headers=headers)
    metrics.SERVED_BYTES.labels(result.outcome.source).inc(len(stored.body))
    return web.Response(body=stored.body, headers=headers)


async def blob(
    request: web.Request, route: Route, services: UpstreamServices, digest: Digest
) -> web.StreamResponse:
    headers = {
        "Docker-Content-Digest": str(digest),
        "Content-Type": MEDIA_TYPE_OCTET_STREAM,
        "Accept-Ranges": "bytes",
    }
    request[ETAG_KEY] = f'"{digest}"'
    if _not_modified(request, digest):
        return web.Response(status=304, headers=headers)
    blobs = request.app[REGISTRY_KEY].blobs(route.upstream, route.repo)
    if request.method == "HEAD":
        descriptor = await blobs.stat(digest)
        headers["Content-Length"] = str(descriptor.size)
        return web.Response(headers=headers)
    opened = await blobs.open(digest)
    request[OUTCOME_KEY] = opened.outcome
    if isinstance(opened, LocalBlob):
        metrics.SERVED_BYTES.labels(opened.outcome.source).inc(opened.descriptor.size)
        return web.FileResponse(opened.path, headers=headers)
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
    served = metrics.SERVED_BYTES.labels(opened.outcome.source)
    try:
        if fetch.size is not None and request.transport is not None:
            loop = asyncio.get_running_loop()
            async with contextlib.aclosing(fetch.spans()) as spans:
                async for span in spans:
                    if isinstance(span, memoryview):
                        await response.write(span)
                        served.inc(len(span))
                        continue
                    file, offset, length = span
                    await loop.sendfile(request.transport, file, offset, length)
                    served.inc(length)
        else:
            async with contextlib.aclosing(fetch.read()) as chunks:
                async for chunk in chunks:
                    await response.write(chunk)
                    served.inc(len(chunk))
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


async def metrics_endpoint(request: web.Request) -> web.Response:
    request[ROUTE_KEY] = "metrics"
    response = web.Response(body=generate_latest())
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
