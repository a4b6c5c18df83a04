"""Fake and bent upstreams, each a :class:`~tests.rig.recording.RecordingServer`.

- :class:`LyingUpstream`: ``/v2/`` is 200, blobs claim the requested digest and size but
  their bytes do not hash to it; manifests are 404.
- :class:`BlobStore`: another origin serving blobs out of a registry's storage, as a CDN
  or S3 behind a registry does.
- :class:`RedirectingUpstream`: a :class:`~tests.rig.recording.PassThrough` that answers
  blob GETs with a 307 to a :class:`BlobStore`.
"""

from __future__ import annotations

import hashlib
import uuid

from aiohttp import web

from .recording import Exchange, PassThrough, RecordingServer, oci_error, stream_body
from .registry import Registry

API_VERSION = {"Docker-Distribution-API-Version": "registry/2.0"}


def wrong_bytes(digest: str, size: int) -> bytes:
    """Deterministic ``size`` bytes that are not the blob ``digest`` names."""
    seed = hashlib.sha256(digest.encode()).digest()
    out = (seed * (size // len(seed) + 1))[:size]
    assert "sha256:" + hashlib.sha256(out).hexdigest() != digest
    return out


class LyingUpstream(RecordingServer):
    """A registry that lies: ``/v2/`` is 200, every blob GET/HEAD claims the requested digest
    and ``size`` bytes, and the GET body is ``size`` bytes that do not hash to it. Manifests
    (and anything else) are 404."""

    def __init__(self, size: int = 1024 * 1024) -> None:
        super().__init__()
        self.size = size

    async def answer(self, request: web.Request, exchange: Exchange) -> web.StreamResponse:
        if request.path == "/v2/" and request.method in ("GET", "HEAD"):
            exchange.status = 200
            return web.json_response({}, headers=API_VERSION)
        name, found, digest = request.path.removeprefix("/v2/").rpartition("/blobs/")
        if request.path.startswith("/v2/") and found and name and digest and "/" not in digest:
            headers = {
                "Content-Type": "application/octet-stream",
                "Docker-Content-Digest": digest,
                "Content-Length": str(self.size),
                **API_VERSION,
            }
            response = web.StreamResponse(status=200, headers=headers)
            body = wrong_bytes(digest, self.size) if request.method == "GET" else b""
            return await stream_body(request, response, exchange, body)
        return oci_error(exchange, 404, "MANIFEST_UNKNOWN", "lying upstream")


class BlobStore(RecordingServer):
    """Another origin serving ``GET /blobs/<digest>`` from a registry's storage. Every
    request is recorded (headers included) so tests can see what reached it."""

    def __init__(self, registry: Registry) -> None:
        super().__init__()
        self.registry = registry

    async def answer(self, request: web.Request, exchange: Exchange) -> web.StreamResponse:
        digest = request.path.removeprefix("/blobs/")
        wanted = request.method in ("GET", "HEAD") and request.path.startswith("/blobs/")
        path = self.registry.blob_path(digest) if wanted and "/" not in digest else None
        if path is None or not path.is_file():
            exchange.status = 404
            return web.Response(status=404)
        data = path.read_bytes()
        response = web.StreamResponse(
            status=200,
            headers={"Content-Type": "application/octet-stream", "Content-Length": str(len(data))},
        )
        return await stream_body(request, response, exchange, data)


class RedirectingUpstream(PassThrough):
    """A pass-through to a registry that answers every blob GET with
    ``307 Location: <blob store>/blobs/<digest>?sig=...``: the registry still checks the
    request's credentials first (a HEAD of the blob with the same headers), as real
    registries do before handing out a signed URL."""

    def __init__(self, upstream_url: str, blob_store: BlobStore) -> None:
        super().__init__(upstream_url)
        self.blob_store = blob_store

    async def answer(self, request: web.Request, exchange: Exchange) -> web.StreamResponse:
        if request.method != "GET" or not exchange.is_blob:
            return await super().answer(request, exchange)
        headers = {k: v for k, v in request.headers.items() if k.lower() in ("authorization",)}
        async with self.session.head(
            self.upstream_url + request.path, headers=headers, allow_redirects=False
        ) as checked:
            if checked.status != 200:
                exchange.status = checked.status
                return web.Response(
                    status=checked.status,
                    headers={
                        k: v
                        for k, v in checked.headers.items()
                        if k.lower() in ("www-authenticate", "content-type")
                    },
                )
        digest = request.path.rpartition("/")[2]
        exchange.status = 307
        return web.Response(
            status=307,
            headers={"Location": f"{self.blob_store.url}/blobs/{digest}?sig={uuid.uuid4().hex}"},
        )
