"""Value types of the distribution API: Digest, Descriptor, Reference, repository names.

Everything that comes from a client or an upstream is parsed here, with the OCI
distribution spec's grammar, before any other layer sees it. A value of these types is
therefore safe to put in a file path or a cache key.
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
from dataclasses import dataclass
from enum import Enum

from proxy.errors import DigestInvalid, ManifestInvalid, NameInvalid, RegistryError

MEDIA_TYPE_OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MEDIA_TYPE_OCI_INDEX = "application/vnd.oci.image.index.v1+json"
MEDIA_TYPE_DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
MEDIA_TYPE_DOCKER_MANIFEST_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
MEDIA_TYPE_OCTET_STREAM = "application/octet-stream"
MANIFEST_MEDIA_TYPES = (
    MEDIA_TYPE_OCI_MANIFEST,
    MEDIA_TYPE_OCI_INDEX,
    MEDIA_TYPE_DOCKER_MANIFEST,
    MEDIA_TYPE_DOCKER_MANIFEST_LIST,
)
MAX_NAME_LENGTH = 255
ACCEPT_CACHE = 1024
MAX_CACHED_ACCEPT = 1024

_NAME_COMPONENT = r"[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*"
_NAME = re.compile(rf"^{_NAME_COMPONENT}(?:/{_NAME_COMPONENT})*\Z")
_TAG = re.compile(r"^[a-zA-Z0-9_][a-zA-Z0-9._-]{0,127}\Z")
_DIGEST = re.compile(r"^[a-z0-9]+(?:[+._-][a-z0-9]+)*:[a-zA-Z0-9=_-]+$")
_HEX_LENGTHS = {"sha256": 64, "sha512": 128}
_HEX = re.compile(r"^[a-f0-9]+$")


@dataclass(frozen=True, slots=True)
class Digest:
    """A content digest, ``algorithm:hex``; only algorithms we can verify are accepted."""

    algorithm: str
    hex: str

    @classmethod
    def parse(cls, text: str) -> Digest:
        if not _DIGEST.match(text):
            raise DigestInvalid(f"invalid digest {text[:160]!r}")
        algorithm, _, hex_part = text.partition(":")
        expected = _HEX_LENGTHS.get(algorithm)
        if expected is None:
            raise DigestInvalid(f"unsupported digest algorithm {algorithm!r}")
        if len(hex_part) != expected or not _HEX.match(hex_part):
            raise DigestInvalid(f"invalid {algorithm} digest: expected {expected} hex characters")
        return cls(algorithm, hex_part)

    @classmethod
    def of(cls, data: bytes, algorithm: str = "sha256") -> Digest:
        return cls(algorithm, hashlib.new(algorithm, data).hexdigest())

    def hasher(self) -> hashlib._Hash:
        return hashlib.new(self.algorithm)

    def __str__(self) -> str:
        return f"{self.algorithm}:{self.hex}"


def is_digest(reference: str) -> bool:
    return ":" in reference


def parse_name(name: str) -> str:
    """A repository name as the spec allows it (lower-case path components)."""
    if len(name) > MAX_NAME_LENGTH:
        raise NameInvalid(f"repository name longer than {MAX_NAME_LENGTH} characters")
    if not _NAME.match(name):
        raise NameInvalid(f"invalid repository name {name[:160]!r}")
    return name


def parse_tag(tag: str) -> str:
    if not _TAG.match(tag):
        raise ManifestInvalid(f"invalid tag {tag[:160]!r}")
    return tag


@dataclass(frozen=True, slots=True)
class Reference:
    """A manifest reference: either a tag or a digest."""

    tag: str | None = None
    digest: Digest | None = None

    @classmethod
    def parse(cls, text: str) -> Reference:
        if is_digest(text):
            return cls(digest=Digest.parse(text))
        return cls(tag=parse_tag(text))

    def __str__(self) -> str:
        return self.tag if self.tag is not None else str(self.digest)


# A pull asks for the same digests and tags again and again; what parses is remembered
# (values are immutable; what does not parse raises again each time).
parse_digest = functools.lru_cache(maxsize=4096)(Digest.parse)
parse_reference = functools.lru_cache(maxsize=4096)(Reference.parse)


@dataclass(frozen=True, slots=True)
class Descriptor:
    """What is known of a piece of content: its digest, size and media type."""

    digest: Digest
    size: int
    media_type: str = MEDIA_TYPE_OCTET_STREAM


def accepts(accept_header: str | None, media_type: str) -> bool:
    """Whether a client's Accept header admits ``media_type``.

    No Accept header, ``*/*`` and ``type/*`` admit everything of their range; parameters
    such as ``q=`` are ignored except ``q=0``, which excludes.
    """
    if not accept_header:
        return True
    if len(accept_header) > MAX_CACHED_ACCEPT:
        return _accepts.__wrapped__(accept_header, media_type)
    return _accepts(accept_header, media_type)


@functools.lru_cache(maxsize=ACCEPT_CACHE)
def _accepts(accept_header: str, media_type: str) -> bool:
    """``accepts``, remembered: clients send the same few Accept lines on every request
    (bounded, as anyone can send any line)."""
    major = media_type.split("/", 1)[0]
    for item in accept_header.split(","):
        value, *params = (p.strip() for p in item.split(";"))
        if any(p.replace(" ", "") in ("q=0", "q=0.0", "q=0.00", "q=0.000") for p in params):
            continue
        value = value.lower()
        if value in ("*/*", media_type, f"{major}/*"):
            return True
    return False


def sniff_media_type(body: bytes) -> str | None:
    """The media type a manifest declares, or that its shape implies (OCI may omit it)."""
    try:
        data = json.loads(body)
    except (ValueError, RecursionError):
        return None
    if not isinstance(data, dict):
        return None
    declared = data.get("mediaType")
    if isinstance(declared, str) and declared in MANIFEST_MEDIA_TYPES:
        return declared
    if "manifests" in data:
        return MEDIA_TYPE_OCI_INDEX
    if "config" in data and "layers" in data:
        return MEDIA_TYPE_OCI_MANIFEST
    return None


def references(body: bytes) -> list[Digest]:
    """Digests a manifest references: config, layers, and an index's manifests."""
    try:
        data = json.loads(body)
    except (ValueError, RecursionError):
        return []
    if not isinstance(data, dict):
        return []
    found: list[Digest] = []
    items = [data.get("config")]
    for key in ("layers", "manifests", "blobs"):
        value = data.get(key)
        if isinstance(value, list):
            items.extend(value)
    for item in items:
        if isinstance(item, dict) and isinstance(item.get("digest"), str):
            try:
                found.append(Digest.parse(item["digest"]))
            except RegistryError:
                continue
    return found


class Outcome(Enum):
    """What the cache did for one response: decided by the pull-through layer, carried on
    the request, and turned into ``X-Cache``, the access log's ``cache`` field and metric
    labels in one place (``proxy.api.middlewares``)."""

    HIT = "hit"
    """Served from local content with no upstream request."""
    MISS = "miss"
    """Fetched from upstream for this request."""
    COALESCED = "coalesced"
    """Joined a fetch another request had started."""
    REVALIDATED = "revalidated"
    """Local content the upstream confirmed unchanged (a HEAD)."""
    STALE = "stale"
    """Local content served because the upstream could not revalidate it."""
    DENIED = "denied"
    """Refused: not authenticated or not allowed."""
    ERROR = "error"
    """The proxy or the upstream failed (5xx)."""
    NONE = "none"
    """Nothing cacheable was asked (or the request was invalid)."""

    # Derived once per member below: plain attributes, read on every response.
    header: str
    """The ``X-Cache`` value."""
    local: bool
    """Whether the body bytes came from local content."""
    source: str
    """``cache`` or ``upstream``: the served-bytes label."""


_LOCAL_OUTCOMES = frozenset({Outcome.HIT, Outcome.REVALIDATED, Outcome.STALE})
for _outcome in Outcome:
    _outcome.header = _outcome.value.upper()
    _outcome.local = _outcome in _LOCAL_OUTCOMES
    _outcome.source = "cache" if _outcome.local else "upstream"
del _outcome
