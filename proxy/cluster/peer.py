"""Requests between replicas: signing, and a blob streamed from another replica.

The peer endpoint is ``GET /_cluster/blobs/<digest>?offset=N`` on each replica's own
listener. It answers only requests signed with the shared secret::

    X-Registry-Proxy-Time:       <unix seconds>
    X-Registry-Proxy-Signature:  hex(HMAC-SHA256(secret, "<METHOD>\\n<path?query>\\n<time>"))

valid for ``MAX_SKEW`` seconds either way; anything else gets 403 ``DENIED``. It serves a
digest's bytes from ``offset``: a fetch in progress (its growing temp file, the last byte
only after the digest is verified, as local followers get it) or a committed file;
``X-Blob-Size`` carries the whole size when known. A failing fetch aborts the connection,
so a cut stream is never mistaken for a complete one. Nothing else is served: no
manifests, no tags, no listing.

``PeerBlob`` is the other side: an ``UpstreamBlob`` whose chunks come from a peer. It is
the one way to follow a fetch owned elsewhere (another replica's, or another worker
process's on the same node); its reader verifies the digest itself like any upstream's.
"""

from __future__ import annotations

import hashlib
import hmac
import time
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager

import aiohttp

from proxy import metrics
from proxy.errors import BlobUnknown, UpstreamUnavailable
from proxy.interfaces import UpstreamBlob
from proxy.model import Digest

PEER_PREFIX = "/_cluster/blobs/"
TIME_HEADER = "X-Registry-Proxy-Time"
SIGNATURE_HEADER = "X-Registry-Proxy-Signature"
SIZE_HEADER = "X-Blob-Size"
MAX_SKEW = 30.0


class PeerUnavailable(UpstreamUnavailable):
    """A peer could not be reached, refused, or its stream was cut."""


class PeerSigner:
    """Signs and checks peer requests with the shared secret."""

    def __init__(self, secret: bytes, *, clock: Callable[[], float] = time.time) -> None:
        if not secret:
            raise ValueError("the cluster secret is empty")
        self._secret = secret
        self._clock = clock

    def _mac(self, method: str, path_qs: str, stamp: str) -> str:
        message = f"{method.upper()}\n{path_qs}\n{stamp}".encode()
        return hmac.new(self._secret, message, hashlib.sha256).hexdigest()

    def headers(self, method: str, path_qs: str) -> dict[str, str]:
        stamp = str(int(self._clock()))
        return {TIME_HEADER: stamp, SIGNATURE_HEADER: self._mac(method, path_qs, stamp)}

    def verify(self, method: str, path_qs: str, headers: Mapping[str, str]) -> bool:
        """Whether the request carries a valid signature made within ``MAX_SKEW``."""
        stamp = headers.get(TIME_HEADER, "")
        signature = headers.get(SIGNATURE_HEADER, "")
        if not stamp.isdigit() or not signature:
            return False
        if abs(self._clock() - int(stamp)) > MAX_SKEW:
            return False
        return hmac.compare_digest(signature, self._mac(method, path_qs, stamp))


def peer_path(digest: Digest, offset: int) -> str:
    return f"{PEER_PREFIX}{digest}?offset={offset}"


class PeerBlob(UpstreamBlob):
    """A blob's bytes from ``offset``, streamed from a peer's endpoint.

    ``size`` is the whole blob's size (not the rest), when the peer knows it.
    A cut stream raises ``PeerUnavailable``: the caller decides where to continue.
    """

    def __init__(self, response: aiohttp.ClientResponse, offset: int) -> None:
        self._response = response
        self.offset = offset
        announced = response.headers.get(SIZE_HEADER, "")
        self._size = int(announced) if announced.isdigit() else None
        self.received = 0
        self._cut: str | None = None

    def cut(self, why: str) -> None:
        """Give up on this stream (its owner is gone): the reader raises
        ``PeerUnavailable`` instead of waiting for bytes that will not come."""
        self._cut = why
        self._response.close()

    @property
    def size(self) -> int | None:
        return self._size

    async def chunks(self) -> AsyncIterator[bytes]:
        counter = metrics.PEER_BYTES.labels("in")
        expected = self._size - self.offset if self._size is not None else None
        try:
            async for chunk in self._response.content.iter_any():
                self.received += len(chunk)
                counter.inc(len(chunk))
                yield chunk
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise PeerUnavailable(
                f"peer stream cut after {self.received} bytes: {self._cut or type(exc).__name__}"
            ) from exc
        if self._cut is not None:
            raise PeerUnavailable(f"peer stream given up after {self.received} bytes: {self._cut}")
        if expected is not None and self.received != expected:
            raise PeerUnavailable(f"peer stream ended after {self.received} of {expected} bytes")


@asynccontextmanager
async def open_peer_blob(
    session: aiohttp.ClientSession, signer: PeerSigner, address: str, digest: Digest, offset: int
) -> AsyncIterator[PeerBlob]:
    """GET the digest from the peer at ``address`` from ``offset``. Raises
    ``BlobUnknown`` when the peer has neither a fetch nor a file for it, and
    ``PeerUnavailable`` when it cannot be reached or refuses."""
    path = peer_path(digest, offset)
    try:
        response = await session.get(address + path, headers=signer.headers("GET", path))
    except (aiohttp.ClientError, TimeoutError) as exc:
        raise PeerUnavailable(f"peer {address} unreachable: {type(exc).__name__}") from exc
    try:
        if response.status == 404:
            raise BlobUnknown(f"peer {address} does not have {digest}")
        if response.status != 200:
            raise PeerUnavailable(f"peer {address} answered {response.status}")
        yield PeerBlob(response, offset)
    finally:
        if response.content.at_eof():
            response.release()
        else:
            response.close()  # a connection with unread body is never reused
