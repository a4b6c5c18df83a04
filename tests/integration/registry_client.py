"""A minimal distribution-API client for tests: push raw blobs and manifests, fetch manifests.

Used to seed the upstream directly (bypassing skopeo) and to read back what the upstream or
the proxy serves, with the exact bytes and headers.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import aiohttp

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


async def push_blob(session: aiohttp.ClientSession, base_url: str, repo: str, data: bytes) -> str:
    """Monolithic upload: ``POST /v2/<repo>/blobs/uploads/`` then ``PUT <location>?digest=``.
    Returns the digest."""
    digest = sha256_digest(data)
    async with session.post(f"{base_url}/v2/{repo}/blobs/uploads/") as response:
        assert response.status == 202, f"upload start: {response.status} {await response.text()}"
        location = response.headers["Location"]
    if location.startswith("/"):
        location = base_url + location
    separator = "&" if "?" in location else "?"

    async def body() -> AsyncIterator[bytes]:
        for start in range(0, len(data), UPLOAD_CHUNK):
            yield data[start : start + UPLOAD_CHUNK]

    async with session.put(
        f"{location}{separator}digest={digest}",
        data=body(),
        headers={"Content-Type": "application/octet-stream", "Content-Length": str(len(data))},
    ) as response:
        assert response.status == 201, f"upload put: {response.status} {await response.text()}"
        assert response.headers.get("Docker-Content-Digest") == digest
    return digest


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
