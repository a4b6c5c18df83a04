"""The proxy's own bearer tokens (Distribution's token auth, ``jwt.md``).

Tokens are JWTs signed with the configured key (EC P-256 -> ES256, RSA -> RS256) or one
generated into the cache directory on first start. Claims: ``iss`` and ``aud`` are the
service name, ``sub`` the user (empty for anonymous), ``exp``/``nbf``/``iat``/``jti``,
and ``access`` as in the spec (``[{type, name, actions}]``, what the client asked for
and was granted). Two private claims say what the resource side needs without deciding
again: ``rp_kind`` (anonymous, user, passthrough) and ``rp_grants``, the granted
``[upstream, repository]`` pairs (a client-side name is routed once, at issue time).

Verification pins the algorithm to the key's (so ``alg: none`` and HS256-with-the-
public-key forgeries fail), requires every registered claim, and checks audience,
issuer and expiry. Verified tokens are remembered until they expire, so a request with
a known token costs a dictionary look-up.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import tempfile
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from proxy.access.bounded import Bounded
from proxy.access.identity import IdentityKind
from proxy.errors import Unauthorized

log = logging.getLogger(__name__)

GENERATED_KEY_NAME = "token.pem"
MAX_REMEMBERED = 10_000
LEEWAY = 5.0


@dataclass(frozen=True, slots=True)
class TokenClaims:
    kind: IdentityKind
    subject: str
    grants: frozenset[tuple[str, str]]
    fingerprint: str | None
    expires: float


class TokenService:
    def __init__(
        self,
        key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey,
        *,
        service: str,
        expiry: float,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.service = service
        self.expiry = expiry
        self._key = key
        self._public = key.public_key()
        self._algorithm = "ES256" if isinstance(key, ec.EllipticCurvePrivateKey) else "RS256"
        self._clock = clock
        self._verified: Bounded[str, TokenClaims] = Bounded(MAX_REMEMBERED)

    @classmethod
    def from_settings(
        cls, key_path: Path | None, cache_dir: Path, *, service: str, expiry: float
    ) -> TokenService:
        return cls(load_or_generate_key(key_path, cache_dir), service=service, expiry=expiry)

    def derived_secret(self, purpose: bytes) -> bytes:
        """A secret derived from the signing key (so replicas sharing the key share it),
        for ``purpose``; never the key itself."""
        der = self._key.private_bytes(
            serialization.Encoding.DER,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        return hmac.new(der, purpose, hashlib.sha256).digest()

    def issue(
        self,
        *,
        kind: IdentityKind,
        subject: str,
        access: Iterable[dict[str, Any]],
        grants: Iterable[tuple[str, str]],
        fingerprint: str | None = None,
    ) -> tuple[str, int]:
        """A signed token and its lifetime in seconds."""
        now = int(self._clock())
        lifetime = max(1, int(self.expiry))
        claims: dict[str, Any] = {
            "iss": self.service,
            "sub": subject,
            "aud": self.service,
            "exp": now + lifetime,
            "nbf": now - 1,
            "iat": now,
            "jti": uuid.uuid4().hex,
            "access": list(access),
            "rp_kind": kind,
            "rp_grants": sorted([list(g) for g in grants]),
        }
        if fingerprint is not None:
            claims["rp_fp"] = fingerprint
        return jwt.encode(claims, self._key, algorithm=self._algorithm), lifetime

    def verify(self, token: str) -> TokenClaims:
        """The claims of a token this proxy issued; ``Unauthorized`` for any other."""
        now = self._clock()
        known = self._verified.get(token)
        if known is not None:
            if known.expires > now:
                return known
            del self._verified[token]
            raise Unauthorized("token expired")
        try:
            data = jwt.decode(
                token,
                self._public,
                algorithms=[self._algorithm],
                audience=self.service,
                issuer=self.service,
                leeway=LEEWAY,
                options={"require": ["exp", "iat", "nbf", "aud", "iss", "sub"]},
            )
            claims = TokenClaims(
                kind=_kind(data.get("rp_kind")),
                subject=str(data["sub"]),
                grants=frozenset((str(u), str(r)) for u, r in data.get("rp_grants", [])),
                fingerprint=_optional_str(data.get("rp_fp")),
                expires=float(data["exp"]),
            )
        except jwt.ExpiredSignatureError:
            raise Unauthorized("token expired") from None
        except (jwt.InvalidTokenError, KeyError, TypeError, ValueError):
            raise Unauthorized("invalid token") from None
        self._verified[token] = claims
        return claims


def _kind(value: object) -> IdentityKind:
    if value == "user":
        return "user"
    if value == "passthrough":
        return "passthrough"
    if value == "anonymous":
        return "anonymous"
    raise ValueError("unknown identity kind")


def _optional_str(value: object) -> str | None:
    return value if isinstance(value, str) else None


def load_or_generate_key(
    path: Path | None, cache_dir: Path
) -> ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey:
    """The configured PEM key, else ``<cache_dir>/token.pem``, generated (EC P-256,
    mode 0600, written to a temp file and renamed) when absent."""
    target = path if path is not None else cache_dir / GENERATED_KEY_NAME
    if path is None and not target.exists():
        key = ec.generate_private_key(ec.SECP256R1())
        pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        target.parent.mkdir(parents=True, exist_ok=True)
        # A unique temp name (mode 0600): a PID-named one collides with a concurrent
        # start in this process and with one a crash left (PID 1 in every container).
        fd, name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
        temp = Path(name)
        with os.fdopen(fd, "wb") as out:
            out.write(pem)
            out.flush()
            os.fsync(out.fileno())
        try:
            os.link(temp, target)  # never replaces a key another process wrote first
        except FileExistsError:
            pass
        finally:
            temp.unlink()
        log.info("generated a token signing key in %s", target)
    loaded = serialization.load_pem_private_key(target.read_bytes(), password=None)
    if isinstance(loaded, ec.EllipticCurvePrivateKey):
        if not isinstance(loaded.curve, ec.SECP256R1):
            raise ValueError(f"{target}: an EC token key must be on P-256")
        return loaded
    if isinstance(loaded, rsa.RSAPrivateKey):
        if loaded.key_size < 2048:
            raise ValueError(f"{target}: an RSA token key must have at least 2048 bits")
        return loaded
    raise ValueError(f"{target}: the token key must be an EC P-256 or RSA private key")
