"""Upstream credentials for docker-registry, for the tests: htpasswd and token auth.

- :func:`htpasswd_auth`: an htpasswd file (bcrypt) and the ``auth:`` section pointing a
  :class:`~tests.rig.registry.Registry` at it (pass it as ``extra``).
- :class:`TokenServer`: the registry token service (the Docker "token" flow), an aiohttp
  app in the caller's loop. It checks Basic credentials (or containerd's OAuth2 password
  form), signs ES256 JWTs with an ``x5c`` header carrying its self-signed certificate, and
  records every request and every token it issued. docker-registry verifies those tokens
  against the certificate, which :meth:`TokenServer.registry_auth` writes as
  ``rootcertbundle``.

Needs the ``test`` extra (bcrypt, cryptography); bench does not import this module.
"""

from __future__ import annotations

import base64
import datetime
import json
import os
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import bcrypt
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.x509.oid import NameOID

from .recording import Exchange, RecordingServer

TOKEN_SERVICE = "registry-proxy-tests"
TOKEN_ISSUER = "registry-proxy-tests-issuer"
TOKEN_LIFETIME = 300
# Go's bcrypt accepts cost 4 and up; the lowest keeps the tests quick.
BCRYPT_ROUNDS = 4


@dataclass(frozen=True)
class Credentials:
    username: str
    password: str = field(repr=False)

    @classmethod
    def random(cls, username: str) -> Credentials:
        """A user with a fresh, unguessable password (so finding it anywhere means it leaked
        from where we put it)."""
        return cls(username, "pw-" + os.urandom(12).hex())

    @property
    def colon(self) -> str:
        """``user:password``, as skopeo's ``--creds`` takes it."""
        return f"{self.username}:{self.password}"

    @property
    def basic(self) -> str:
        """The base64 part of a Basic Authorization header."""
        return base64.b64encode(self.colon.encode()).decode()

    def secrets(self) -> tuple[str, ...]:
        """Every form in which these credentials could leak."""
        return (self.password, self.basic)


# --------------------------------------------------------------------------- htpasswd


def htpasswd_auth(workdir: Path, users: Mapping[str, str], realm: str = "rp-tests") -> str:
    """Write an htpasswd file (bcrypt, as docker-registry requires) and return the
    ``auth:`` section that points docker-registry at it."""
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / "htpasswd"
    lines = []
    for user, password in users.items():
        hashed = bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds=BCRYPT_ROUNDS))
        lines.append(f"{user}:{hashed.decode()}\n")
    path.write_text("".join(lines))
    return f"auth:\n  htpasswd:\n    realm: {realm}\n    path: {path}\n"


# --------------------------------------------------------------------------- token server


@dataclass
class TokenRequest:
    """One request the token server answered."""

    method: str
    service: str | None
    scopes: list[str]
    username: str | None
    granted: bool
    authorization: str | None
    token: str | None = None


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


class TokenServer(RecordingServer):
    """A registry token service with its own signing key and self-signed certificate.
    Besides ``log`` (every HTTP request), ``requests`` holds what each token request
    asked for and whether it was granted."""

    def __init__(
        self,
        workdir: Path,
        users: Mapping[str, str],
        *,
        service: str = TOKEN_SERVICE,
        issuer: str = TOKEN_ISSUER,
        lifetime: int = TOKEN_LIFETIME,
    ) -> None:
        super().__init__()
        self.users = dict(users)
        self.service = service
        self.issuer = issuer
        self.lifetime = lifetime
        self.requests: list[TokenRequest] = []
        self._key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "registry-proxy test tokens")])
        now = datetime.datetime.now(datetime.UTC)
        self._cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(self._key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(self._key, hashes.SHA256())
        )
        workdir.mkdir(parents=True, exist_ok=True)
        self.cert_path = workdir / "token-signer.pem"
        self.cert_path.write_bytes(self._cert.public_bytes(serialization.Encoding.PEM))

    @property
    def realm(self) -> str:
        return self.url + "/token"

    @property
    def issued(self) -> list[str]:
        return [r.token for r in self.requests if r.token is not None]

    def registry_auth(self) -> str:
        """The ``auth:`` section of a docker-registry that trusts this server's tokens.
        The realm is only known once the server listens: start it first."""
        assert self.port, "start the token server before configuring a registry"
        return (
            "auth:\n  token:\n"
            f"    realm: {self.realm}\n"
            f"    service: {self.service}\n"
            f"    issuer: {self.issuer}\n"
            f"    rootcertbundle: {self.cert_path}\n"
        )

    def sign(self, subject: str, access: list[dict[str, object]]) -> str:
        """An ES256 JWT docker-registry accepts: x5c header, iss/sub/aud/exp/nbf/iat/jti."""
        now = int(time.time())
        header = {
            "typ": "JWT",
            "alg": "ES256",
            "x5c": [base64.b64encode(self._cert.public_bytes(serialization.Encoding.DER)).decode()],
        }
        claims = {
            "iss": self.issuer,
            "sub": subject,
            "aud": self.service,
            "exp": now + self.lifetime,
            "nbf": now - 10,
            "iat": now,
            "jti": uuid.uuid4().hex,
            "access": access,
        }
        signing_input = (
            _b64url(json.dumps(header, separators=(",", ":")).encode())
            + "."
            + _b64url(json.dumps(claims, separators=(",", ":")).encode())
        )
        der = self._key.sign(signing_input.encode(), ec.ECDSA(hashes.SHA256()))
        r, s = decode_dss_signature(der)
        return signing_input + "." + _b64url(r.to_bytes(32, "big") + s.to_bytes(32, "big"))

    def for_scope(self, scope: str) -> list[TokenRequest]:
        return [r for r in self.requests if scope in r.scopes]

    async def answer(self, request: web.Request, exchange: Exchange) -> web.StreamResponse:
        if request.path != "/token":
            exchange.status = 404
            return web.Response(status=404)
        response = await self._token(request)
        exchange.status = response.status
        return response

    async def _token(self, request: web.Request) -> web.Response:
        authorization = request.headers.get("Authorization")
        username, password = _basic_credentials(authorization)
        if request.method == "POST":
            # containerd (and others) with credentials: an OAuth2 password grant form.
            form = await request.post()
            service = _str_or_none(form.get("service"))
            scopes = [s for value in form.getall("scope", []) for s in str(value).split(" ")]
            if form.get("grant_type") == "password":
                username = _str_or_none(form.get("username"))
                password = _str_or_none(form.get("password"))
        else:
            service = request.query.get("service")
            scopes = [s for value in request.query.getall("scope", []) for s in value.split(" ")]
        granted = (
            username is not None
            and password is not None
            and self.users.get(username) == password
            and service == self.service
        )
        record = TokenRequest(request.method, service, scopes, username, granted, authorization)
        self.requests.append(record)
        if not granted:
            return web.json_response(
                {"errors": [{"code": "UNAUTHORIZED", "message": "bad credentials"}]},
                status=401,
                headers={"WWW-Authenticate": 'Basic realm="rp-token-tests"'},
            )
        assert username is not None
        record.token = self.sign(username, [_access(scope) for scope in scopes if scope])
        return web.json_response(
            {
                "token": record.token,
                "access_token": record.token,
                "expires_in": self.lifetime,
                "issued_at": datetime.datetime.now(datetime.UTC).isoformat(),
            }
        )


def _str_or_none(value: object) -> str | None:
    return value if isinstance(value, str) else None


def _basic_credentials(header: str | None) -> tuple[str | None, str | None]:
    if not header or not header.lower().startswith("basic "):
        return None, None
    try:
        decoded = base64.b64decode(header[6:].strip(), validate=True).decode()
    except ValueError:
        return None, None
    user, found, password = decoded.partition(":")
    return (user, password) if found else (None, None)


def _access(scope: str) -> dict[str, object]:
    """``repository:team/app:pull,push`` -> the JWT ``access`` entry granting those actions."""
    kind, _, rest = scope.partition(":")
    name, _, actions = rest.rpartition(":")
    return {"type": kind, "name": name, "actions": [a for a in actions.split(",") if a]}
