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

import asyncio
import logging
import os
import random
import select
import socket
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
from proxy.interfaces import (
    BlobSource,
    BlockingBody,
    DetachableBlob,
    ManifestSource,
    UpstreamBlob,
    UpstreamBlobHead,
    UpstreamManifest,
)
from proxy.model import MANIFEST_MEDIA_TYPES, Digest, sniff_media_type
from proxy.settings import UpstreamSettings
from proxy.upstream.auth import UpstreamAuth
from proxy.upstream.health import UpstreamHealth

log = logging.getLogger(__name__)

MAX_MANIFEST_SIZE = 4 << 20
MAX_TAGS_LIST_SIZE = 16 << 20
BLOB_CHUNK = 1 << 20
REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
UNWELL_STATUSES = frozenset({502, 503, 504})
"""Answers that say the upstream (or what fronts it) is unwell: they count towards its
breaker, as connection errors and timeouts do."""
RETRY_BASE_DELAY = 0.05
READ_BUFSIZE = 1 << 20
MAX_EXTRA_RESUMES = 3
DETACH_MIN = 4 << 20
"""A body with less than this left is read on the event loop: a thread is not worth it."""
DEFAULT_MANIFEST_ACCEPT = ", ".join(MANIFEST_MEDIA_TYPES)


@dataclass(frozen=True, slots=True)
class PassThrough:
    """A response relayed as it is (tags/list): status, selected headers and body."""

    status: int
    headers: Mapping[str, str]
    body: bytes


class SocketBody(BlockingBody):
    """The rest of a plain-HTTP identity body of known length, read from a duplicate of
    the connection's socket by one worker thread (``recv_into`` into the caller's buffer:
    no bytes objects, no event loop). What had arrived with the headers comes first.

    The descriptor stays non-blocking (the duplicate shares the flag with the event
    loop's): ``wait`` polls. ``sock_read`` is the caller's to enforce with ``wait``.
    """

    def __init__(
        self,
        fd: int,
        head: bytes,
        received: int,
        remaining: int,
        upstream: str,
        read_timeout: float | None,
    ) -> None:
        self.read_timeout = read_timeout
        self._sock = socket.socket(fileno=fd)
        self._sock.setblocking(False)
        self._head = memoryview(head)
        self.received = received
        self._remaining = remaining
        self._counter = metrics.UPSTREAM_BYTES.labels(upstream)
        self._poll = select.poll()
        self._poll.register(self._sock, select.POLLIN)

    @property
    def done(self) -> bool:
        return self._remaining == 0

    def readinto(self, view: memoryview) -> int:
        view = view[: self._remaining]
        if not view:
            return 0
        if self._head:
            n = min(len(view), len(self._head))
            view[:n] = self._head[:n]
            self._head = self._head[n:]
        else:
            try:
                n = self._sock.recv_into(view)
            except (BlockingIOError, InterruptedError):
                return 0
            if n == 0:
                raise ConnectionResetError(f"upstream closed with {self._remaining} bytes to go")
        self._counter.inc(n)
        self.received += n
        self._remaining -= n
        return n

    def wait(self, timeout: float) -> bool:
        if self._head:
            return True
        return bool(self._poll.poll(timeout * 1000))

    def close(self) -> None:
        self._sock.close()


class AiohttpUpstreamBlob(UpstreamBlob, DetachableBlob):
    """An upstream blob body that resumes itself when the connection is cut.

    On a cut-off the remaining bytes are asked for with ``Range: bytes=<received>-``; an
    upstream that answers 206 continues where it stopped, one that answers 200 sends the
    whole blob again and the bytes already received are skipped. The caller sees one
    uninterrupted stream and hashes it whole.

    ``detach`` hands a plain-HTTP body to a worker thread instead (``SocketBody``); when
    that reader stops early (cut, timed out), ``chunks`` resumes from where it stopped.
    """

    def __init__(
        self,
        client: UpstreamClient,
        repo: str,
        digest: Digest,
        response: aiohttp.ClientResponse,
        *,
        offset: int = 0,
    ) -> None:
        self._client = client
        self._repo = repo
        self._digest = digest
        self._response = response
        self._offset = offset
        self._started = False
        self._detached: SocketBody | None = None

    @property
    def size(self) -> int | None:
        """The whole blob's size; None for a body resumed at an offset (the caller had
        it from the source it continues)."""
        return self._response.content_length if self._offset == 0 else None

    def detach(self) -> SocketBody | None:
        if self._offset != 0 or self._started or self._detached is not None:
            return None
        response = self._response
        length = response.content_length
        connection = response.connection
        content = response.content
        if (
            length is None
            or "Transfer-Encoding" in response.headers
            or connection is None
            or connection.transport is None
            or connection.protocol is None
            or content.exception() is not None
            or length - content.total_bytes < DETACH_MIN
        ):
            return None
        transport = connection.transport
        sock = transport.get_extra_info("socket")
        if transport.get_extra_info("ssl_object") is not None or sock is None:
            return None
        # Drain what arrived with the headers, then stop the loop reading the socket
        # (in this order: draining may resume a paused transport). The connection is
        # never reused: its parser never sees the rest of the body.
        head = content.read_nowait()
        connection.protocol.pause_reading()
        connection.protocol.force_close()
        body = SocketBody(
            os.dup(sock.fileno()),
            head,
            0,
            length - content.total_bytes + len(head),
            self._client.name,
            self._client.settings.read_timeout,
        )
        self._detached = body
        return body

    async def chunks(self) -> AsyncIterator[bytes]:
        counter = metrics.UPSTREAM_BYTES.labels(self._client.name)
        self._started = True
        received = self._offset
        resumes = 0
        response: aiohttp.ClientResponse | None = self._response
        cut: BaseException | None = None
        if self._detached is not None:
            # A worker thread read the body up to here and stopped: go on with a Range.
            received = self._detached.received
            response = None
            cut = ConnectionResetError("the detached reader stopped early")
        extra: list[aiohttp.ClientResponse] = []
        try:
            while True:
                if response is not None:
                    try:
                        # Whatever has arrived, without re-joining it into fixed sizes
                        # (the fetch batches its disk writes itself).
                        async for chunk in response.content.iter_any():
                            received += len(chunk)
                            counter.inc(len(chunk))
                            yield chunk
                        return
                    except (aiohttp.ClientError, TimeoutError) as exc:
                        cut = exc
                if resumes >= self._client.settings.retries + MAX_EXTRA_RESUMES:
                    self._client.health.failure(f"body cut off: {type(cut).__name__}")
                    raise UpstreamUnavailable(
                        f"upstream blob body cut off after {received} bytes"
                    ) from cut
                resumes += 1
                metrics.UPSTREAM_RETRIES.labels(self._client.name, "resume").inc()
                log.info(
                    "blob body cut off after %d bytes; resuming",
                    received,
                    extra={"digest": str(self._digest), "upstream": self._client.name},
                )
                response = await self._client.resume_blob(self._repo, self._digest, received)
                extra.append(response)
        finally:
            for r in extra:
                r.release()


class UpstreamClient(BlobSource, ManifestSource):
    def __init__(
        self,
        settings: UpstreamSettings,
        session: aiohttp.ClientSession,
        *,
        health: UpstreamHealth | None = None,
    ) -> None:
        self.settings = settings
        self.name = settings.name
        self._base = settings.url
        self._origin = _origin(settings.url)
        self._session = session
        self._auth = UpstreamAuth(session, settings.username, settings.password)
        self.health: UpstreamHealth = health or UpstreamHealth(
            settings.name,
            failures=settings.failure_threshold,
            cooldown=settings.cooldown,
            budget_floor=settings.ratelimit_floor,
        )

    @classmethod
    def create(cls, settings: UpstreamSettings) -> UpstreamClient:
        timeout = aiohttp.ClientTimeout(
            total=None, connect=settings.connect_timeout, sock_read=settings.read_timeout
        )
        connector = aiohttp.TCPConnector(limit=100, limit_per_host=64, ttl_dns_cache=60)
        session = aiohttp.ClientSession(
            timeout=timeout,
            connector=connector,
            # No cookies: an upstream's session cookie must never make an anonymous access
            # check (or one client's request) count as the proxy's authenticated one.
            cookie_jar=aiohttp.DummyCookieJar(),
            auto_decompress=False,
            headers={"User-Agent": "registry-proxy"},
            # Larger socket reads: fewer, bigger chunks per blob (the default is 64 KiB).
            read_bufsize=READ_BUFSIZE,
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
        resp = await self._exchange(method, path, repo, headers, params)
        try:
            yield resp
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise UpstreamUnavailable(
                f"upstream {self.name} failed mid-response: {type(exc).__name__}"
            ) from exc
        finally:
            resp.release()

    async def _exchange(
        self,
        method: str,
        path: str,
        repo: str | None,
        headers: Mapping[str, str] | None,
        params: Mapping[str, str] | None,
    ) -> aiohttp.ClientResponse:
        """Response headers for one request: breaker check, auth, retries, typed errors.

        GET and HEAD are idempotent: connection errors, timeouts and 5xx are retried with
        jittered exponential backoff, ``settings.retries`` times. A request that still
        fails counts once against the upstream's health when the failure says the
        upstream is unwell (connection error, timeout, 502/503/504), not when it is one
        this request provoked (another 5xx), so no client can open the breaker for all.
        """
        self.health.check()
        url = self._base + path
        base_headers = dict(headers or {})
        attempt = 0
        while True:
            started = time.monotonic()
            try:
                resp = await self._attempt(method, url, base_headers, repo, params)
            except (aiohttp.ClientError, TimeoutError) as exc:
                metrics.UPSTREAM_REQUESTS.labels(self.name, method, "error").inc()
                reason = type(exc).__name__
                if attempt < self.settings.retries:
                    attempt += 1
                    await self._backoff(attempt)
                    continue
                self.health.failure(reason)
                raise UpstreamUnavailable(
                    f"upstream {self.name} unreachable: {reason}",
                    headers={"Retry-After": "1"},
                ) from exc
            metrics.UPSTREAM_REQUESTS.labels(
                self.name, method, metrics.status_class(resp.status)
            ).inc()
            metrics.UPSTREAM_SECONDS.labels(self.name, method).observe(time.monotonic() - started)
            self.health.observe(resp.headers)
            if resp.status >= 500:
                resp.release()
                if attempt < self.settings.retries:
                    attempt += 1
                    await self._backoff(attempt)
                    continue
                if resp.status in UNWELL_STATUSES:
                    self.health.failure(f"HTTP {resp.status}")
                # Any other 5xx is this request's trouble (a 500 for a name the upstream
                # chokes on): it says nothing of the upstream's health, so it neither
                # counts towards the breaker nor resets it.
                raise UpstreamError(f"upstream {self.name} answered {resp.status}")
            self.health.success()
            try:
                _raise_for_common(resp)
            except RegistryError:
                resp.release()
                raise
            return resp

    async def _backoff(self, attempt: int) -> None:
        metrics.UPSTREAM_RETRIES.labels(self.name, "request").inc()
        await asyncio.sleep(RETRY_BASE_DELAY * 2 ** (attempt - 1) * random.uniform(0.5, 1.5))

    async def _attempt(
        self,
        method: str,
        url: str,
        headers: dict[str, str],
        repo: str | None,
        params: Mapping[str, str] | None,
    ) -> aiohttp.ClientResponse:
        """One exchange: authenticate (once more after a 401 challenge), follow one redirect
        hop by hand so the registry's credentials never reach another origin."""
        auth = await self._auth.header(repo)
        resp = await self._request(method, url, headers, auth, params)
        if resp.status == 401:
            challenge = resp.headers.get("WWW-Authenticate")
            resp.release()
            auth = await self._auth.on_challenge(challenge, repo)
            resp = await self._request(method, url, headers, auth, params)
        if resp.status in REDIRECT_STATUSES and "Location" in resp.headers:
            target = urljoin(url, resp.headers["Location"])
            resp.release()
            same = _origin(target) == self._origin
            resp = await self._request(method, target, headers, auth if same else None)
        return resp

    async def _request(
        self,
        method: str,
        url: str,
        headers: dict[str, str],
        auth: str | None,
        params: Mapping[str, str] | None = None,
        *,
        redirects: bool = True,
    ) -> aiohttp.ClientResponse:
        if auth is not None:
            headers = {**headers, "Authorization": auth}
        # Same-origin redirects are followed by _attempt (credentials kept); a redirect
        # target elsewhere may redirect again, and gets no credentials of ours.
        same = _origin(url) == self._origin
        return await self._session.request(
            method, url, headers=headers, params=params, allow_redirects=redirects and not same
        )

    async def ping(self) -> None:
        """GET /v2/ (authenticating if challenged); raises when the upstream is unusable."""
        async with self._send("GET", "/v2/", None) as resp:
            if resp.status != 200:
                raise UpstreamError(f"upstream {self.name} answered {resp.status} on /v2/")

    async def check_access(
        self,
        repo: str | None,
        reference: str | None,
        username: str | None,
        password: str | None,
    ) -> bool | None:
        """Whether the upstream serves ``repo`` to these credentials (None: anonymously).

        The probe is a HEAD of the manifest ``reference`` when there is one (Docker Hub
        does not count a HEAD as a pull), else ``GET tags/list?n=1``; with no ``repo``,
        ``GET /v2/`` (a login: are these credentials good at all); a 404 for the manifest
        is asked again of the repository (``tags/list``). A token for the
        repository's pull scope is asked for first when the upstream challenges. True on
        2xx, False on 401/403 (or refused credentials at the token service), None when
        the answer proves nothing either way (a redirect, 404 for the repository, 429).
        ``UpstreamUnavailable`` when the upstream cannot be asked.
        """
        self.health.check()
        auth = UpstreamAuth(self._session, username, password)
        params: dict[str, str] | None = None
        headers: dict[str, str] = {}
        if repo is None:
            method, path = "GET", "/v2/"
        elif reference is not None:
            method, path = "HEAD", f"/v2/{repo}/manifests/{reference}"
            headers = {"Accept": DEFAULT_MANIFEST_ACCEPT}
        else:
            method, path, params = "GET", f"/v2/{repo}/tags/list", {"n": "1"}
        url = self._base + path
        try:
            resp = await self._request(method, url, headers, None, params, redirects=False)
            status = resp.status
            challenge = resp.headers.get("WWW-Authenticate")
            resp.release()
            if status == 401:
                try:
                    header = await auth.on_challenge(challenge, repo)
                except Denied:
                    return False
                if header is None:
                    return False
                resp = await self._request(method, url, headers, header, params, redirects=False)
                status = resp.status
                resp.release()
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise UpstreamUnavailable(
                f"upstream {self.name} unreachable: {failure_text(exc)}"
            ) from exc
        if 200 <= status < 300:
            return True
        if status in (401, 403):
            return False
        if status >= 500:
            raise UpstreamError(f"upstream {self.name} answered {status} to an access check")
        if status == 404 and reference is not None and repo is not None:
            # A missing tag says nothing of the repository: ask about the repository.
            return await self.check_access(repo, None, username, password)
        return None  # a redirect, 404 for the repository, 429: proves nothing either way

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
            yield AiohttpUpstreamBlob(self, repo, digest, resp)

    @asynccontextmanager
    async def open_blob_from(
        self, repo: str, digest: Digest, offset: int
    ) -> AsyncIterator[UpstreamBlob]:
        """The blob's bytes from ``offset`` (``Range``; a 200 is skipped up to it), for a
        fetch that continues what another source delivered (``size`` is then None)."""
        if offset == 0:
            async with self.open_blob(repo, digest) as blob:
                yield blob
            return
        response = await self.resume_blob(repo, digest, offset)
        try:
            yield AiohttpUpstreamBlob(self, repo, digest, response, offset=offset)
        finally:
            response.release()

    async def resume_blob(self, repo: str, digest: Digest, offset: int) -> aiohttp.ClientResponse:
        """A response whose body continues the blob at ``offset`` (206, or 200 skipped)."""
        headers = {"Range": f"bytes={offset}-"}
        resp = await self._exchange("GET", f"/v2/{repo}/blobs/{digest}", repo, headers, None)
        try:
            if resp.status == 206 and _range_start(resp.headers) == offset:
                return resp
            if resp.status == 200:
                # No Range support: skip what we have, in bounded chunks (never buffered).
                remaining = offset
                while remaining:
                    chunk = await resp.content.read(min(BLOB_CHUNK, remaining))
                    if not chunk:
                        raise asyncio.IncompleteReadError(b"", remaining)
                    remaining -= len(chunk)
                return resp
            raise UpstreamError(f"upstream answered {resp.status} to a resumed blob fetch")
        except (aiohttp.ClientError, TimeoutError, asyncio.IncompleteReadError) as exc:
            resp.release()
            raise UpstreamUnavailable("resumed blob fetch failed") from exc
        except BaseException:
            resp.release()
            raise

    async def tags_list(self, repo: str, params: Mapping[str, str]) -> PassThrough:
        async with self._send("GET", f"/v2/{repo}/tags/list", repo, params=params) as resp:
            if resp.status == 404:
                raise NameUnknown(f"repository {repo} is unknown to {self.name}")
            if resp.status != 200:
                raise UpstreamError(f"upstream answered {resp.status} for tags/list")
            body = await _read_capped(resp, MAX_TAGS_LIST_SIZE)
            return PassThrough(resp.status, _relayed_headers(resp), body)

    async def referrers(self, repo: str, digest: Digest, params: Mapping[str, str]) -> PassThrough:
        """The referrers index; a 404 (no referrers API upstream) is relayed, not raised."""
        path = f"/v2/{repo}/referrers/{digest}"
        async with self._send("GET", path, repo, params=params) as resp:
            if resp.status not in (200, 404):
                raise UpstreamError(f"upstream answered {resp.status} for referrers")
            body = await _read_capped(resp, MAX_MANIFEST_SIZE)
            return PassThrough(resp.status, _relayed_headers(resp), body)


def failure_text(exc: BaseException) -> str:
    """What went wrong, for messages and logs, without anything of the request: an
    aiohttp error's ``repr`` carries the request's headers (Authorization included)."""
    if isinstance(exc, aiohttp.ClientResponseError):
        return f"{type(exc).__name__} (HTTP {exc.status})"
    return type(exc).__name__


def _relayed_headers(resp: aiohttp.ClientResponse) -> dict[str, str]:
    names = ("Content-Type", "Link", "OCI-Filters-Applied")
    return {k: resp.headers[k] for k in names if k in resp.headers}


async def _read_capped(resp: aiohttp.ClientResponse, limit: int) -> bytes:
    body = await resp.content.read(limit + 1)
    if len(body) > limit:
        raise TooLarge(f"upstream answer larger than {limit} bytes")
    return body


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


def _range_start(headers: CIMultiDictProxy[str]) -> int | None:
    value = headers.get("Content-Range", "")
    if not value.startswith("bytes "):
        return None
    start, _, _ = value[6:].partition("-")
    return int(start) if start.isdigit() else None


def _origin(url: str) -> tuple[str, str]:
    parts = urlsplit(url)
    return parts.scheme, parts.netloc.lower()
