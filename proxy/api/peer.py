"""The peer endpoint: ``GET /_cluster/blobs/<digest>?offset=N`` for the other replicas.

Signed requests only (``proxy.cluster.peer``); anything else, including every request
when the cluster is not configured, gets 403 ``DENIED`` with an OCI error body. Serves a
digest's bytes from ``offset``: the fetch in progress here (bytes as they are written,
the last one after the digest check) or the committed file; 404 ``BLOB_UNKNOWN`` when
neither. A fetch that fails mid-stream aborts the connection: never a complete-looking
body.
"""

from __future__ import annotations

import asyncio
import logging
import os

from aiohttp import web

from proxy import metrics
from proxy.api.handlers import REGISTRY_KEY
from proxy.api.middlewares import ROUTE_KEY, error_response
from proxy.cluster.peer import SIZE_HEADER
from proxy.errors import BlobUnknown, RegistryError
from proxy.interfaces import ArrivingBlob
from proxy.model import MEDIA_TYPE_OCTET_STREAM, Digest
from proxy.pullthrough.registry import PullThroughRegistry

log = logging.getLogger(__name__)


def denied() -> web.Response:
    metrics.PEER_REQUESTS.labels("denied").inc()
    return error_response(403, "DENIED", "peer requests must carry a valid signature")


async def other(request: web.Request) -> web.Response:
    """Any other method or path under ``/_cluster/``: 403, signed or not."""
    request[ROUTE_KEY] = "peer"
    return denied()


async def peer_blob(request: web.Request) -> web.StreamResponse:
    request[ROUTE_KEY] = "peer"
    registry = request.app[REGISTRY_KEY]
    node = registry.cluster
    if node is None or not node.signer.verify(request.method, request.path_qs, request.headers):
        return denied()
    offset_text = request.query.get("offset", "0")
    try:
        digest = Digest.parse(request.match_info["digest"])
    except RegistryError:
        metrics.PEER_REQUESTS.labels("unknown").inc()
        return error_response(404, "BLOB_UNKNOWN", "not a digest")
    if not offset_text.isdigit():
        metrics.PEER_REQUESTS.labels("error").inc()
        return error_response(400, "RANGE_INVALID", "offset must be a byte count")
    offset = int(offset_text)
    # Workers: the fetch may be another worker's of this node; followed through its file.
    fetch = await registry.inflight.follow_elsewhere(digest)
    if fetch is not None:
        try:
            await fetch.wait_ready()
        except RegistryError:
            fetch = None  # it failed before any byte; the file may still be there
    if fetch is not None:
        return await _stream_fetch(request, fetch, offset)
    try:
        descriptor = await registry.store.stat(digest)
    except BlobUnknown:
        metrics.PEER_REQUESTS.labels("unknown").inc()
        return error_response(404, "BLOB_UNKNOWN", f"no fetch or file for {digest}")
    return await _send_file(request, registry, digest, descriptor.size, offset)


def _response(size: int | None, offset: int) -> web.StreamResponse:
    response = web.StreamResponse(headers={"Content-Type": MEDIA_TYPE_OCTET_STREAM})
    if size is not None:
        response.headers[SIZE_HEADER] = str(size)
        response.content_length = max(0, size - offset)
    return response


async def _stream_fetch(
    request: web.Request, fetch: ArrivingBlob, offset: int
) -> web.StreamResponse:
    response = _response(fetch.size, offset)
    await response.prepare(request)
    counter = metrics.PEER_BYTES.labels("out")
    try:
        async for chunk in fetch.read(offset):
            await response.write(chunk)
            counter.inc(len(chunk))
    except RegistryError as exc:
        metrics.PEER_REQUESTS.labels("error").inc()
        log.info("aborting peer stream: %s", exc.message, extra={"digest": str(fetch.digest)})
        _abort(request, response)
        return response
    except ConnectionError:
        return response  # the peer went away
    metrics.PEER_REQUESTS.labels("ok").inc()
    await response.write_eof()
    return response


async def _send_file(
    request: web.Request, registry: PullThroughRegistry, digest: Digest, size: int, offset: int
) -> web.StreamResponse:
    try:
        file = await asyncio.to_thread(open, registry.store.path(digest), "rb", buffering=0)
    except FileNotFoundError:
        metrics.PEER_REQUESTS.labels("unknown").inc()
        return error_response(404, "BLOB_UNKNOWN", f"no file for {digest}")
    try:
        response = _response(size, offset)
        await response.prepare(request)
        position, counter = offset, metrics.PEER_BYTES.labels("out")
        while position < size:
            data = await asyncio.to_thread(os.pread, file.fileno(), 1 << 20, position)
            if not data:
                _abort(request, response)  # shorter than its descriptor: never complete
                return response
            await response.write(data)
            position += len(data)
            counter.inc(len(data))
    except ConnectionError:
        return response
    finally:
        file.close()
    metrics.PEER_REQUESTS.labels("ok").inc()
    await response.write_eof()
    return response


def _abort(request: web.Request, response: web.StreamResponse) -> None:
    response.force_close()
    if request.transport is not None:
        request.transport.abort()
