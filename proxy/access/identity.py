"""Who a request comes from: the ``Authorization`` header and the client address.

An ``Identity`` is one of three kinds:

* ``anonymous``: no credentials (or a token issued to nobody);
* ``user``: a local user (htpasswd), by Basic or by a token the proxy issued;
* ``passthrough``: credentials that are no local user's, kept (in memory, for this
  request only) so the upstream can be asked whether it accepts them.

A token the proxy issued carries its grants (the ``(upstream, repository)`` pairs the
token service allowed); such an identity is decided by those, not by the rules again.

The credential itself is never logged, stored or put in a metric: ``Credential`` hides
the password from ``repr`` and ``key`` is a hash.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

from proxy.errors import Unauthorized

IdentityKind = Literal["anonymous", "user", "passthrough"]
Network = ipaddress.IPv4Network | ipaddress.IPv6Network
MAX_AUTHORIZATION = 8192
MAX_USERNAME = 256


@dataclass(frozen=True, slots=True)
class Credential:
    username: str
    password: str = field(repr=False)

    def fingerprint(self, secret: bytes) -> str:
        """A stable, non-reversible name for the credential (verdict cache keys), keyed
        with the proxy's secret so a Redis dump or a log holds nothing crackable."""
        data = f"{self.username}\0{self.password}".encode()
        return hmac.new(secret, data, hashlib.sha256).hexdigest()[:32]


@dataclass(frozen=True, slots=True)
class Identity:
    kind: IdentityKind
    address: str
    name: str | None = None
    groups: frozenset[str] = frozenset()
    credential: Credential | None = None
    fingerprint: str | None = None
    """A pass-through credential's keyed hash (verdict cache keys)."""
    grants: frozenset[tuple[str, str]] | None = None
    """From a token: the (upstream, repository) pairs it may pull; None without one."""

    @property
    def key(self) -> str:
        """What limits and usage are counted by: a local user, else the client address.

        Pass-through credentials count by address too: anyone can make up a credential,
        so one per request must not buy a fresh rate or quota each time."""
        if self.kind == "user":
            return f"user:{self.name}"
        return f"ip:{self.address}"

    @property
    def label(self) -> str:
        """A bounded metric label: a local user's name, else the kind."""
        return self.name if self.kind == "user" and self.name else self.kind

    @property
    def display(self) -> str:
        """For the audit log: the user, or the kind with the address; never a secret."""
        if self.kind == "user":
            return f"user {self.name}"
        if self.kind == "passthrough" and self.credential is not None:
            return f"passthrough {self.credential.username[:64]!r} from {self.address}"
        if self.kind == "passthrough":
            return f"passthrough (token) from {self.address}"
        return f"{self.kind} from {self.address}"

    @property
    def authenticated(self) -> bool:
        return self.kind != "anonymous"


@dataclass(frozen=True, slots=True)
class Presented:
    """What the ``Authorization`` header offers."""

    scheme: Literal["basic", "bearer"]
    credential: Credential | None = None
    token: str | None = None


def parse_authorization(header: str | None) -> Presented | None:
    """``Basic`` or ``Bearer`` credentials; None for no header; ``Unauthorized`` for one
    that is malformed or of another scheme."""
    if header is None:
        return None
    if len(header) > MAX_AUTHORIZATION:
        raise Unauthorized("authorization header too large")
    scheme, _, value = header.strip().partition(" ")
    value = value.strip()
    scheme = scheme.lower()
    if scheme == "bearer" and value:
        return Presented("bearer", token=value)
    if scheme == "basic" and value:
        try:
            decoded = base64.b64decode(value, validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError, ValueError):
            raise Unauthorized("malformed basic credentials") from None
        username, colon, password = decoded.partition(":")
        if not colon or not username or len(username) > MAX_USERNAME:
            raise Unauthorized("malformed basic credentials")
        return Presented("basic", credential=Credential(username, password))
    raise Unauthorized("unsupported authorization scheme")


def client_address(peer: str | None, forwarded_for: str | None, trusted: Sequence[Network]) -> str:
    """The client's IP: the peer's, or, when the peer is a trusted proxy, the last
    address in ``X-Forwarded-For`` that is not itself a trusted proxy."""
    address = peer or "unknown"
    if not forwarded_for or not trusted or not _trusted(address, trusted):
        return address
    for hop in reversed([h.strip() for h in forwarded_for.split(",")]):
        try:
            ipaddress.ip_address(hop)
        except ValueError:
            return address  # a hop we cannot read: stop trusting the chain there
        if not _trusted(hop, trusted):
            return hop
        address = hop
    return address


def is_trusted(address: str, trusted: Sequence[Network]) -> bool:
    """Whether ``address`` (IPv4-mapped IPv6 included) is in one of ``trusted``."""
    return _trusted(address, trusted)


def _trusted(address: str, trusted: Sequence[Network]) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    # A dual-stack listener sees an IPv4 peer as ::ffff:a.b.c.d; match either form.
    mapped = ip.ipv4_mapped if isinstance(ip, ipaddress.IPv6Address) else None
    return any(ip in network or (mapped is not None and mapped in network) for network in trusted)
