"""Typed registry errors: each carries its OCI error code and HTTP status.

Lower layers raise these; only the API layer renders them as the spec's JSON body
``{"errors": [{"code", "message", "detail"}]}``. Nobody matches on message text.
"""

from __future__ import annotations

from typing import Any, ClassVar


class RegistryError(Exception):
    code: ClassVar[str] = "UNKNOWN"
    status: ClassVar[int] = 500

    def __init__(
        self,
        message: str,
        *,
        detail: Any = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.detail = detail
        self.headers: dict[str, str] = dict(headers or {})


class BlobUnknown(RegistryError):
    code = "BLOB_UNKNOWN"
    status = 404


class ManifestUnknown(RegistryError):
    code = "MANIFEST_UNKNOWN"
    status = 404


class NameUnknown(RegistryError):
    code = "NAME_UNKNOWN"
    status = 404


class NameInvalid(RegistryError):
    code = "NAME_INVALID"
    status = 400


class DigestInvalid(RegistryError):
    code = "DIGEST_INVALID"
    status = 400


class ManifestInvalid(RegistryError):
    code = "MANIFEST_INVALID"
    status = 400


class Unsupported(RegistryError):
    code = "UNSUPPORTED"
    status = 405


class RouteUnknown(RegistryError):
    """A path under /v2/ that is no endpoint we serve (such as referrers, for now)."""

    code = "UNSUPPORTED"
    status = 404


class Unauthorized(RegistryError):
    code = "UNAUTHORIZED"
    status = 401


class Denied(RegistryError):
    code = "DENIED"
    status = 403


class TooManyRequests(RegistryError):
    code = "TOOMANYREQUESTS"
    status = 429


class NotAcceptable(RegistryError):
    """The cached and upstream manifests are of a type the client's Accept refuses."""

    code = "MANIFEST_UNKNOWN"
    status = 404


class UpstreamError(RegistryError):
    """The upstream answered something we cannot pass on (5xx, bad auth, nonsense)."""

    code = "UNAVAILABLE"
    status = 502


class UpstreamUnavailable(UpstreamError):
    """The upstream could not be reached or timed out."""

    status = 503


class DigestMismatch(UpstreamError):
    """The upstream sent content whose digest or size differs from the one asked for."""

    code = "DIGEST_INVALID"
    status = 502


class TooLarge(RegistryError):
    code = "SIZE_INVALID"
    status = 502


class CacheWriteFailed(Exception):
    """The local cache cannot take a write: it failed (ENOSPC, EIO, EDQUOT...) or free
    space is under ``cache.min_free``. Never rendered to a client: what was being written
    is served without being cached (pass-through)."""

    def __init__(self, message: str, *, reason: str, errno: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.reason = reason
        """``write_error`` or ``low_space``: the label of the pass-through metric."""
        self.errno = errno
