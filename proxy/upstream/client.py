"""HTTP client of one upstream registry.

One ``aiohttp.ClientSession`` per upstream. Every request goes through ``_send``, which
adds authentication (retrying once after a 401 challenge), follows a redirect by hand so
that the registry's Authorization header never reaches another origin (blob storage
redirects), counts the request, and turns aiohttp failures into typed errors: an
unreachable or timed-out upstream is ``UpstreamUnavailable``; a 5xx is ``UpstreamError``;
429 is ``TooManyRequests`` with the upstream's Retry-After; 401/403 after authenticating
is ``Denied``. A 404 is left to the caller, which knows what was unknown.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from urllib.parse import urljoin, urlsplit

import aiohttp
from multidict import CIMultiDictProxy

from proxy import metrics
from proxy.errors import (
    BlobUnknown,
    Denied,
    DigestMismatch,
    ManifestInvalid,
    ManifestUnknown,
    NameUnknown,
    RegistryError,
    TooLarge,
    TooManyRequests,
    UpstreamError,
    UpstreamUnavailable,
)
from proxy.interfaces import UpstreamBlob
from proxy.model import MANIFEST_MEDIA_TYPES, Digest, sniff_media_type
from proxy.settings import UpstreamSettings
from proxy.upstream.auth import UpstreamAuth

log = logging.getLogger(__name__)

MAX_MANIFEST_SIZE = 4 << 20
MAX_TAGS_LIST_SIZE = 16 << 20
BLOB_CHUNK = 1 << 20
REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
DEFAULT_MANIFEST_ACCEPT = ", ".join(MANIFEST_MEDIA_TYPES)


@dataclass(frozen=True, slots=True)
class UpstreamManifest:
    """A manifest as the upstream answered it; ``body`` is None for HEAD."""

    digest: Digest
    media_type: str
    size: int
    body: bytes | None


@dataclass(frozen=True, slots=True)
class UpstreamBlobHead:
    size: int | None
    digest: Digest | None


@dataclass(frozen=True, slots=True)
class PassThrough:
    """A response relayed as it is (tags/list): status, selected headers and body."""

    status: int
    headers: Mapping[str, str]
    body: bytes


class AiohttpUpstreamBlob(UpstreamBlob):
    def __init__(self, response: aiohttp.ClientResponse, upstream: str) -> None:
        self._response = response
        self._upstream = upstream

    @property
    def size(self) -> int | None:
        return self._response.content_length

    async def chunks(self) -> AsyncIterator[bytes]:
        counter = metrics.UPSTREAM_BYTES.labels(self._upstream)
        try:
            async for chunk in self._response.content.iter_chunked(BLOB_CHUNK):
                counter.inc(len(chunk))
                yield chunk
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise UpstreamUnavailable(f"upstream blob body cut off: {exc!r}") from exc


class UpstreamClient:
    def __init__(self, settings: UpstreamSettings, session: aiohttp.ClientSession) -> None:
        self.settings = settings
        self.name = settings.name
        self._base = settings.url
        self._origin = _origin(settings.url)
        self._session = session
        self._auth = UpstreamAuth(session, settings.username, settings.password)

    @classmethod
    def create(cls, settings: UpstreamSettings) -> UpstreamClient:
        timeout = aiohttp.ClientTimeout(
            total=None, connect=settings.connect_timeout, sock_read=settings.read_timeout
        )
        connector = aiohttp.TCPConnector(limit=100, limit_per_host=64, ttl_dns_cache=60)
        session = aiohttp.ClientSession(
            timeout=timeout,
            connector=connector,
            auto_decompress=False,
            headers={"User-Agent": "registry-proxy"},
        )
        return cls(settings, session)

    async def close(self) -> None:
        await self._session.close()

    @asynccontextmanager
    async def _send(
        self,
        method: str,
        path: str,
        repo: str | None,
        headers: Mapping[str, str] | None = None,
        params: Mapping[str, str] | None = None,
    ) -> AsyncIterator[aiohttp.ClientResponse]:
        url = self._base + path
        base_headers = dict(headers or {})
        started = time.monotonic()
        status = "error"
        resp: aiohttp.ClientResponse | None = None
        try:
            auth = await self._auth.header(repo)
            resp = await self._request(method, url, base_headers, auth, params)
            if resp.status == 401:
                challenge = resp.headers.get("WWW-Authenticate")
                resp.release()
                retry_auth = await self._auth.on_challenge(challenge, repo)
                if retry_auth is not None:
                    resp = await self._request(method, url, base_headers, retry_auth, params)
                    auth = retry_auth
                else:
                    resp = await self._request(method, url, base_headers, None, params)
            if resp.status in REDIRECT_STATUSES and "Location" in resp.headers:
                target = urljoin(url, resp.headers["Location"])
                resp.release()
                same = _origin(target) == self._origin
                resp = await self._request(method, target, base_headers, auth if same else None)
            status = metrics.status_class(resp.status)
            metrics.UPSTREAM_SECONDS.labels(self.name, method).observe(time.monotonic() - started)
            _raise_for_common(resp)
            yield resp
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise UpstreamUnavailable(
                f"upstream {self.name} unreachable: {type(exc).__name__}"
            ) from exc
        finally:
            metrics.UPSTREAM_REQUESTS.labels(self.name, method, status).inc()
            if resp is not None:
                resp.release()

    async def _request(
        self,
        method: str,
        url: str,
        headers: dict[str, str],
        auth: str | None,
        params: Mapping[str, str] | None = None,
    ) -> aiohttp.ClientResponse:
        if auth is not None:
            headers = {**headers, "Authorization": auth}
        # Redirects are followed by _send itself (one hop, credentials only to our origin);
        # a redirect target may redirect again, without our credentials.
        same = _origin(url) == self._origin
        return await self._session.request(
            method, url, headers=headers, params=params, allow_redirects=not same
        )

    async def ping(self) -> None:
        """GET /v2/ (authenticating if challenged); raises when the upstream is unusable."""
        async with self._send("GET", "/v2/", None) as resp:
            if resp.status != 200:
                raise UpstreamError(f"upstream {self.name} answered {resp.status} on /v2/")

    async def get_manifest(
        self, repo: str, reference: str, accept: str | None, *, head: bool = False
    ) -> UpstreamManifest:
        """GET (or HEAD) a manifest; the body's digest is computed and checked.

        When ``reference`` is a digest, the content must hash to it; with a tag, the
        upstream's Docker-Content-Digest (when sent) must match what we compute.
        """
        method = "HEAD" if head else "GET"
        headers = {"Accept": accept or DEFAULT_MANIFEST_ACCEPT}
        async with self._send(method, f"/v2/{repo}/manifests/{reference}", repo, headers) as r:
            if r.status == 404:
                raise ManifestUnknown(f"manifest {reference} is unknown to {self.name}/{repo}")
            if r.status != 200:
                raise UpstreamError(f"upstream answered {r.status} for manifest {reference}")
            media_type = (r.headers.get("Content-Type") or "").split(";")[0].strip()
            header_digest = _header_digest(r.headers)
            if head:
                if header_digest is None or r.content_length is None:
                    raise UpstreamError("upstream HEAD gave no Docker-Content-Digest or length")
                return UpstreamManifest(header_digest, media_type, r.content_length, None)
            body = await r.content.read(MAX_MANIFEST_SIZE + 1)
            if len(body) > MAX_MANIFEST_SIZE:
                raise TooLarge(f"manifest larger than {MAX_MANIFEST_SIZE} bytes")
            metrics.UPSTREAM_BYTES.labels(self.name).inc(len(body))
        expected = Digest.parse(reference) if ":" in reference else header_digest
        algorithm = expected.algorithm if expected else "sha256"
        actual = Digest.of(body, algorithm)
        if expected is not None and actual != expected:
            metrics.DIGEST_MISMATCHES.inc()
            raise DigestMismatch(f"upstream manifest does not match {expected}")
        if media_type not in MANIFEST_MEDIA_TYPES:
            media_type = sniff_media_type(body) or media_type
        if algorithm != "sha256":
            actual = Digest.of(body)
        return UpstreamManifest(actual, media_type, len(body), body)

    async def head_blob(self, repo: str, digest: Digest) -> UpstreamBlobHead:
        async with self._send("HEAD", f"/v2/{repo}/blobs/{digest}", repo) as resp:
            if resp.status == 404:
                raise BlobUnknown(f"blob {digest} is unknown to {self.name}/{repo}")
            if resp.status != 200:
                raise UpstreamError(f"upstream answered {resp.status} for blob HEAD")
            return UpstreamBlobHead(resp.content_length, _header_digest(resp.headers))

    @asynccontextmanager
    async def open_blob(self, repo: str, digest: Digest) -> AsyncIterator[UpstreamBlob]:
        async with self._send("GET", f"/v2/{repo}/blobs/{digest}", repo) as resp:
            if resp.status == 404:
                raise BlobUnknown(f"blob {digest} is unknown to {self.name}/{repo}")
            if resp.status != 200:
                raise UpstreamError(f"upstream answered {resp.status} for blob GET")
            yield AiohttpUpstreamBlob(resp, self.name)

    async def tags_list(self, repo: str, params: Mapping[str, str]) -> PassThrough:
        async with self._send("GET", f"/v2/{repo}/tags/list", repo, params=params) as resp:
            if resp.status == 404:
                raise NameUnknown(f"repository {repo} is unknown to {self.name}")
            if resp.status != 200:
                raise UpstreamError(f"upstream answered {resp.status} for tags/list")
            body = await resp.content.read(MAX_TAGS_LIST_SIZE + 1)
            if len(body) > MAX_TAGS_LIST_SIZE:
                raise TooLarge("tags list too large")
            headers = {k: resp.headers[k] for k in ("Content-Type", "Link") if k in resp.headers}
            return PassThrough(resp.status, headers, body)


def _raise_for_common(resp: aiohttp.ClientResponse) -> None:
    if resp.status == 429:
        retry = resp.headers.get("Retry-After", "60")
        raise TooManyRequests(
            "the upstream registry is rate limiting pulls", headers={"Retry-After": retry}
        )
    if resp.status in (401, 403):
        raise Denied("the upstream registry denied access")
    if resp.status >= 500:
        raise UpstreamError(f"upstream answered {resp.status}")


def _header_digest(headers: CIMultiDictProxy[str]) -> Digest | None:
    value = headers.get("Docker-Content-Digest")
    if not value:
        return None
    try:
        return Digest.parse(value.strip())
    except RegistryError:
        raise ManifestInvalid("upstream sent an invalid Docker-Content-Digest") from None


def _origin(url: str) -> tuple[str, str]:
    parts = urlsplit(url)
    return parts.scheme, parts.netloc.lower()
