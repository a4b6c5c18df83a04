"""A minimal distribution-API client: push blobs and manifests, fetch them back.

Used to seed an upstream directly (bypassing skopeo: faster when an image only needs to
exist upstream; bench streams gigabyte layers this way) and to read back what the
upstream or the proxy serves, with the exact bytes and headers. Failures are
AssertionErrors carrying the status and body.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
from collections.abc import AsyncIterable, AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urljoin

import aiohttp

from . import oci
from .oci import ACCEPT_ALL_MANIFESTS, sha256_digest

UPLOAD_CHUNK = 1024 * 1024


@dataclass(frozen=True)
class FetchedManifest:
    status: int
    content_type: str
    header_digest: str | None
    body: bytes

    @property
    def body_digest(self) -> str:
        return sha256_digest(self.body)

    def json(self) -> Any:
        return json.loads(self.body)


def random_blob(size: int) -> tuple[bytes, str]:
    data = os.urandom(size)
    return data, sha256_digest(data)


async def start_upload(session: aiohttp.ClientSession, base_url: str, repo: str) -> str:
    """``POST /v2/<repo>/blobs/uploads/``; returns the absolute upload location."""
    async with session.post(f"{base_url}/v2/{repo}/blobs/uploads/") as response:
        assert response.status == 202, f"upload start: {response.status} {await response.text()}"
        return urljoin(base_url + "/", response.headers["Location"])


def _with_digest(location: str, digest: str) -> str:
    separator = "&" if "?" in location else "?"
    return f"{location}{separator}digest={digest}"


async def push_blob(session: aiohttp.ClientSession, base_url: str, repo: str, data: bytes) -> str:
    """Monolithic upload: ``POST /v2/<repo>/blobs/uploads/`` then ``PUT <location>?digest=``.
    Returns the digest."""
    digest = sha256_digest(data)
    location = await start_upload(session, base_url, repo)

    async def body() -> AsyncIterator[bytes]:
        for start in range(0, len(data), UPLOAD_CHUNK):
            yield data[start : start + UPLOAD_CHUNK]

    async with session.put(
        _with_digest(location, digest),
        data=body(),
        headers={"Content-Type": "application/octet-stream", "Content-Length": str(len(data))},
    ) as response:
        assert response.status == 201, f"upload put: {response.status} {await response.text()}"
        assert response.headers.get("Docker-Content-Digest") == digest
    return digest


async def push_stream(
    session: aiohttp.ClientSession, base_url: str, repo: str, body: AsyncIterable[bytes]
) -> tuple[str, int]:
    """Chunked upload of a body of unknown digest: ``POST``, one streamed ``PATCH`` (hashed
    on the way, never held in memory), then ``PUT <location>?digest=`` with no body.
    Returns (digest, size)."""
    hasher = hashlib.sha256()
    size = 0

    async def hashed() -> AsyncIterator[bytes]:
        nonlocal size
        async for chunk in body:
            hasher.update(chunk)
            size += len(chunk)
            yield chunk

    location = await start_upload(session, base_url, repo)
    async with session.patch(
        location, data=hashed(), headers={"Content-Type": "application/octet-stream"}
    ) as response:
        assert response.status == 202, f"upload patch: {response.status} {await response.text()}"
        location = urljoin(base_url + "/", response.headers["Location"])
    digest = "sha256:" + hasher.hexdigest()
    async with session.put(
        _with_digest(location, digest), headers={"Content-Length": "0"}
    ) as response:
        assert response.status == 201, f"upload finish: {response.status} {await response.text()}"
    return digest, size


async def put_manifest(
    session: aiohttp.ClientSession,
    base_url: str,
    repo: str,
    reference: str,
    body: bytes,
    media_type: str,
) -> str:
    """``PUT /v2/<repo>/manifests/<reference>``; returns the digest the registry reports."""
    async with session.put(
        f"{base_url}/v2/{repo}/manifests/{reference}",
        data=body,
        headers={"Content-Type": media_type},
    ) as response:
        text = await response.text()
        assert response.status == 201, f"manifest put: {response.status} {text}"
        digest = response.headers["Docker-Content-Digest"]
    assert digest == sha256_digest(body), (digest, sha256_digest(body))
    return digest


async def get_manifest(
    session: aiohttp.ClientSession,
    base_url: str,
    repo: str,
    reference: str,
    *,
    accept: str = ACCEPT_ALL_MANIFESTS,
    method: str = "GET",
) -> FetchedManifest:
    """GET (or HEAD) a manifest with ``accept``; any status is returned, not raised."""
    async with session.request(
        method, f"{base_url}/v2/{repo}/manifests/{reference}", headers={"Accept": accept}
    ) as response:
        body = await response.read()
        return FetchedManifest(
            status=response.status,
            content_type=response.headers.get("Content-Type", ""),
            header_digest=response.headers.get("Docker-Content-Digest"),
            body=body,
        )


async def manifest_digest(
    session: aiohttp.ClientSession, base_url: str, repo: str, reference: str
) -> FetchedManifest:
    """Fetch a manifest accepting all four manifest types and check that the
    ``Docker-Content-Digest`` header is the sha256 of the body."""
    fetched = await get_manifest(session, base_url, repo, reference)
    assert fetched.status == 200, f"{base_url} {repo}:{reference}: {fetched.status}"
    assert fetched.header_digest == fetched.body_digest, (
        f"Docker-Content-Digest {fetched.header_digest} != sha256(body) {fetched.body_digest}"
    )
    return fetched


async def fetch_blob(
    session: aiohttp.ClientSession, base_url: str, repo: str, digest: str
) -> tuple[int, bytes]:
    async with session.get(f"{base_url}/v2/{repo}/blobs/{digest}") as response:
        return response.status, await response.read()


async def blob_sha256(
    session: aiohttp.ClientSession, base_url: str, repo: str, digest: str
) -> tuple[int, str, int]:
    """Stream a blob and hash it: (status, "sha256:<hex>", length); never buffers it."""
    hasher = hashlib.sha256()
    length = 0
    async with session.get(f"{base_url}/v2/{repo}/blobs/{digest}") as response:
        async for chunk in response.content.iter_chunked(256 * 1024):
            hasher.update(chunk)
            length += len(chunk)
        return response.status, "sha256:" + hasher.hexdigest(), length


@dataclass(frozen=True)
class RawResponse:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


async def raw_request(
    host: str,
    method: str,
    target: str,
    *,
    headers: dict[str, str] | None = None,
    body: bytes = b"",
    time_limit: float = 30.0,
) -> RawResponse:
    """Send one HTTP/1.1 request with the request target exactly as given (no client-side
    normalisation of ``..`` or percent-escapes) and read the response until the server
    closes the connection. ``host`` is ``HOST:PORT``."""
    address, _, port = host.rpartition(":")
    lines = [f"{method} {target} HTTP/1.1", f"Host: {host}", "Connection: close"]
    for name, value in (headers or {}).items():
        lines.append(f"{name}: {value}")
    if body or method in ("POST", "PUT", "PATCH"):
        lines.append(f"Content-Length: {len(body)}")
    request = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body
    async with asyncio.timeout(time_limit):
        reader, writer = await asyncio.open_connection(address, int(port))
        try:
            writer.write(request)
            await writer.drain()
            data = await reader.read()
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()
    head, _, rest = data.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    parsed: dict[str, str] = {}
    for line in header_lines:
        name, _, value = line.partition(":")
        parsed[name.strip().lower()] = value.strip()
    if parsed.get("transfer-encoding", "").lower() == "chunked":
        rest = _dechunk(rest)
    elif "content-length" in parsed:
        rest = rest[: int(parsed["content-length"])]
    return RawResponse(status=int(status_line.split()[1]), headers=parsed, body=rest)


def _dechunk(data: bytes) -> bytes:
    out = bytearray()
    while data:
        size_line, _, data = data.partition(b"\r\n")
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            break
        out += data[:size]
        data = data[size + 2 :]
    return bytes(out)


# --------------------------------------------------------------------------- seeding


async def push_image(
    http: aiohttp.ClientSession,
    registry_url: str,
    workdir: Path,
    repo: str,
    tag: str,
    *,
    layers: int = 1,
    layer_size: int = oci.DEFAULT_LAYER_SIZE,
) -> oci.OciImage:
    """Generate a fresh OCI image in ``workdir`` and push its blobs and manifest (tagged
    ``tag``) into ``repo``; returns the image (digests, sizes, manifest bytes)."""
    image = oci.make_image(workdir, tag=tag, layers=layers, layer_size=layer_size)
    await push_existing(http, registry_url, image, repo, tag)
    return image


async def push_existing(
    http: aiohttp.ClientSession, registry_url: str, image: oci.OciImage, repo: str, tag: str
) -> None:
    """Push an already generated image (the same bytes, so the same digests) to ``repo``."""
    blobs = image.layout / "blobs" / "sha256"
    for blob in (image.config, *image.layers):
        data = (blobs / blob.digest.removeprefix("sha256:")).read_bytes()
        await push_blob(http, registry_url, repo, data)
    digest = await put_manifest(
        http, registry_url, repo, tag, image.manifest_bytes, oci.OCI_MANIFEST
    )
    assert digest == image.manifest.digest
