"""Access control: who a client is, what it may pull, and how much.

One decision function, ``decide``, serves every route: manifests, tags/list and
referrers ask it through ``authorize`` before their service runs, blobs through
``AccessControlledBlobs``, a layer of the repository's blob chain (Distribution's
``BlobAccessController``), and the token service when it decides what to grant.

The decision, for an identity and ``<upstream>/<repository>``:

1. A token this proxy issued is decided by its grants (made by ``decide`` at issue).
2. Otherwise the longest matching rule (``access.rules``); none: deny (``no_rule``).
3. A local user it names (by name, group or ``authenticated``): allow (``user``).
4. ``anonymous`` in the rule: allow if the content is public (the upstream's
   ``visibility``: ``public``, or ``auto`` and the upstream serves it anonymously).
5. ``passthrough`` in the rule and pass-through credentials: allow if the upstream
   itself accepts them for that repository (``passthrough``), else
   ``passthrough_refused``.
6. Otherwise deny: ``private`` when only the anonymous grant applied, ``not_granted``.

An unauthenticated client that is denied gets 401 ``UNAUTHORIZED`` with the Bearer
challenge (so clients log in and retry); an authenticated one gets 403 ``DENIED``. Both
come before anything is looked up, so a denial says nothing about what exists.

Access control is *engaged* when there may be something to protect: an htpasswd file,
an upstream whose content is not public (one with credentials, by default), or rules
other than the default. Otherwise every client is anonymous, public content is all
there is, and no request is challenged (today's behaviour, at no cost).
"""

from __future__ import annotations

import ipaddress
import logging
import os
import re
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from proxy import metrics
from proxy.access.bounded import Bounded
from proxy.access.htpasswd import Htpasswd
from proxy.access.identity import (
    Credential,
    Identity,
    Presented,
    client_address,
    is_trusted,
    parse_authorization,
)
from proxy.access.limits import Bucket, Limits, Usage
from proxy.access.rules import Rules
from proxy.access.tokens import TokenService
from proxy.access.verdicts import Verdicts
from proxy.cache.redis import RedisLayer
from proxy.errors import Denied, RegistryError, TooManyRequests, Unauthorized
from proxy.interfaces import OpenedBlob, RepositoryBlobs
from proxy.model import Descriptor, Digest
from proxy.routing import Router
from proxy.settings import DEFAULT_RULES, LimitSettings, Settings, UpstreamSettings
from proxy.upstream.client import UpstreamClient

log = logging.getLogger(__name__)
audit = logging.getLogger("proxy.audit")

IDENTITY_KEY = web.RequestKey("identity", Identity)
HEADER_TTL = 60.0
MAX_HEADERS = 10_000


@dataclass(frozen=True, slots=True)
class Decision:
    allowed: bool
    reason: str


ALLOW_TOKEN = Decision(True, "token")
ALLOW_USER = Decision(True, "user")
ALLOW_PUBLIC = Decision(True, "public")
ALLOW_PASSTHROUGH = Decision(True, "passthrough")
DENY_NO_RULE = Decision(False, "no_rule")
DENY_NOT_GRANTED = Decision(False, "not_granted")
DENY_PRIVATE = Decision(False, "private")
DENY_PASSTHROUGH = Decision(False, "passthrough_refused")
DENY_UNKNOWN = Decision(False, "unknown")
"""The upstream's answer proved nothing (a 404 for the repository): refused, and the
refusal says nothing of visibility."""


class AccessControl:
    def __init__(
        self,
        settings: Settings,
        router: Router,
        clients: Callable[[str], UpstreamClient],
        redis: RedisLayer | None,
    ) -> None:
        auth = settings.auth
        self._router = router
        self._clients = clients
        self._upstreams = {up.name: up for up in settings.upstreams}
        self.rules = Rules(settings.access.rules, settings.access.groups)
        self._admins = frozenset(settings.access.admins)
        self._trusted = tuple(ipaddress.ip_network(n) for n in auth.trusted_proxies)
        self.htpasswd = Htpasswd(auth.htpasswd) if auth.htpasswd is not None else None
        self._passthrough = any(up.passthrough_enabled for up in settings.upstreams)
        self.engaged = bool(
            self.htpasswd is not None
            or self._passthrough
            or any(up.effective_visibility != "public" for up in settings.upstreams)
            or settings.access.rules != DEFAULT_RULES
        )
        self.tokens: TokenService | None = None
        self._headers: Bounded[str, tuple[Identity, float, int]] = Bounded(MAX_HEADERS)
        self._anonymous_by_address: Bounded[str, Identity] = Bounded(MAX_HEADERS)
        # Keys the pass-through fingerprints; replaced by one derived from the token key
        # at open, so replicas sharing that key share verdicts through Redis.
        self._secret = os.urandom(32)
        self._probes = Bucket("probes", auth.probe_rate, None)
        self._token_settings = auth.token
        self._cache_dir = settings.cache_dir
        self._realm = auth.token.realm
        self.service = auth.token.service
        self._visibility = Verdicts("visibility", auth.visibility_ttl, redis)
        self._passthrough_verdicts = Verdicts("passthrough", auth.decision_ttl, redis)
        self._logins = Verdicts("login", auth.decision_ttl, redis)
        self.usage = Usage(redis)
        limits = settings.limits
        self.limits = Limits(
            limits.requests, limits.cold_fetches, limits.cold_bytes, redis, self.usage
        )
        _precreate_series(self.engaged, limits)

    def open(self) -> None:
        """Read the htpasswd file and the token key, generating one when none is
        configured; an unreadable file stops start-up."""
        if self.htpasswd is not None:
            self.htpasswd.load()
        if self.engaged:
            token = self._token_settings
            self.tokens = TokenService.from_settings(
                token.key, self._cache_dir, service=token.service, expiry=token.expiry
            )
            self._secret = self.tokens.derived_secret(b"registry-proxy pass-through fingerprints")

    async def close(self) -> None:
        await self.usage.close()

    # --- who ---------------------------------------------------------------------------

    async def identify(self, request: web.Request) -> Identity:
        """The request's identity, remembered on the request. ``Unauthorized`` (with the
        challenge) for credentials that are malformed, wrong, or a bad token."""
        known: Identity | None = request.get(IDENTITY_KEY)
        if known is not None:
            return known
        address = self.address(request)
        if not self.engaged:
            # Nothing to protect: any Authorization header (another scheme, credentials
            # meant for someone else) is ignored, as it was before access control.
            identity = self._anonymous(address)
            request[IDENTITY_KEY] = identity
            return identity
        header = request.headers.get("Authorization")
        try:
            if header is None:
                identity = self._anonymous(address)
            else:
                identity = await self._remembered(header, address)
        except Unauthorized as exc:
            metrics.ACCESS_DECISIONS.labels("deny", "bad_credentials").inc()
            audit.warning(
                "refused credentials from %s: %s",
                address,
                exc.message,
                extra={"reason": "bad_credentials"},
            )
            exc.headers.setdefault(
                "WWW-Authenticate", self.challenge(request, None, "invalid_token")
            )
            raise
        request[IDENTITY_KEY] = identity
        return identity

    def _anonymous(self, address: str) -> Identity:
        """The anonymous identity of ``address``: one value per address (identities are
        immutable), so a busy client costs no new one per request."""
        identity = self._anonymous_by_address.get(address)
        if identity is None:
            identity = self._anonymous_by_address[address] = Identity("anonymous", address)
        return identity

    def address(self, request: web.Request) -> str:
        if not self._trusted:  # X-Forwarded-For is only read from trusted proxies
            return request.remote or "unknown"
        # Every X-Forwarded-For line, in order: a proxy that appends its own line must not
        # leave the client's forged first line to decide.
        forwarded = ", ".join(request.headers.getall("X-Forwarded-For", [])) or None
        return client_address(request.remote, forwarded, self._trusted)

    async def _remembered(self, header: str, address: str) -> Identity:
        """The identity an ``Authorization`` value stands for, remembered for
        ``HEADER_TTL`` (a token: until it expires; a local user: until the htpasswd file
        changes), so a client sending the same header on every request is looked at once.
        Only accepted headers are remembered; a refused one is checked again each time."""
        now = time.monotonic()
        version = self.htpasswd.version() if self.htpasswd is not None else 0
        known = self._headers.get(header)
        if known is not None and known[1] > now and known[2] == version:
            template = known[0]
            return Identity(
                template.kind,
                address,
                template.name,
                template.groups,
                template.credential,
                template.fingerprint,
                template.grants,
            )
        identity, lifetime = await self._identity(parse_authorization(header), address)
        self._headers[header] = (identity, now + min(HEADER_TTL, lifetime), version)
        return identity

    async def _identity(self, presented: Presented | None, address: str) -> tuple[Identity, float]:
        """The identity and how long it may be remembered, in seconds."""
        if presented is None:
            return Identity("anonymous", address), HEADER_TTL
        if presented.scheme == "bearer":
            assert presented.token is not None and self.tokens is not None
            claims = self.tokens.verify(presented.token)
            name = claims.subject if claims.kind == "user" else None
            if name is not None and (self.htpasswd is None or name not in self.htpasswd):
                raise Unauthorized("the token's user is no longer a user here")
            groups = self.rules.groups_of(name) if name else frozenset()
            identity = Identity(
                claims.kind,
                address,
                name,
                groups,
                grants=claims.grants,
            )
            return identity, claims.expires - time.time()
        credential = presented.credential
        assert credential is not None
        return await self.login(credential, address), HEADER_TTL

    async def login(self, credential: Credential, address: str) -> Identity:
        """A local user when the name is one (wrong password: ``Unauthorized``), else a
        pass-through identity when any upstream passes credentials through."""
        if self.htpasswd is not None and credential.username in self.htpasswd:
            try:
                ok = await self.htpasswd.verify(credential.username, credential.password, address)
            except TooManyRequests:
                metrics.LIMIT_REJECTIONS.labels("logins", credential.username).inc()
                raise
            if not ok:
                raise Unauthorized("invalid username or password")
            name = credential.username
            return Identity("user", address, name, self.rules.groups_of(name))
        if self._passthrough:
            fingerprint = credential.fingerprint(self._secret)
            return Identity("passthrough", address, credential=credential, fingerprint=fingerprint)
        raise Unauthorized("invalid username or password")

    def is_admin(self, identity: Identity) -> bool:
        if identity.kind != "user" or identity.name is None:
            return False
        return identity.name in self._admins or any(
            f"group:{g}" in self._admins for g in identity.groups
        )

    # --- what --------------------------------------------------------------------------

    async def decide(
        self, identity: Identity, upstream: UpstreamSettings, repo: str, reference: str | None
    ) -> Decision:
        if identity.grants is not None and (upstream.name, repo) in identity.grants:
            return ALLOW_TOKEN
        if identity.kind == "passthrough" and identity.credential is None:
            return DENY_NOT_GRANTED  # a pass-through token without this scope: ask again
        user = identity.name if identity.kind == "user" else None
        grant = self.rules.match(f"{upstream.name}/{repo}", user)
        if grant is None:
            return DENY_NO_RULE
        if user is not None and grant.names(user, identity.groups):
            return ALLOW_USER
        public: bool | None = False
        if grant.anonymous:
            public = await self._public(identity, upstream, repo, reference)
            if public:
                return ALLOW_PUBLIC
        if grant.passthrough and identity.kind == "passthrough" and upstream.passthrough_enabled:
            if await self._passes(identity, upstream, repo, reference):
                return ALLOW_PASSTHROUGH
            return DENY_PASSTHROUGH
        if not grant.anonymous:
            return DENY_NOT_GRANTED
        return DENY_UNKNOWN if public is None else DENY_PRIVATE

    async def _spend_probe(self, identity: Identity) -> None:
        """An upstream probe this client causes: at most ``auth.probe_rate`` per address
        (remembered answers are free), so no client can make the proxy hammer an upstream
        with made-up credentials or names."""
        verdict = await self._probes.take(f"ip:{identity.address}")
        if not verdict.allowed:
            metrics.LIMIT_REJECTIONS.labels("probes", identity.label).inc()
            raise TooManyRequests(
                "too many access checks from this address", headers=verdict.headers()
            )

    async def _public(
        self, identity: Identity, upstream: UpstreamSettings, repo: str, reference: str | None
    ) -> bool | None:
        visibility = upstream.effective_visibility
        if visibility != "auto":
            return visibility == "public"
        client = self._clients(upstream.name)
        key = f"{upstream.name}:{repo}"
        if not self._visibility.fresh(key):
            await self._spend_probe(identity)
        return await self._visibility.get(
            key, lambda: client.check_access(repo, reference, None, None)
        )

    async def _passes(
        self, identity: Identity, upstream: UpstreamSettings, repo: str, reference: str | None
    ) -> bool:
        credential = identity.credential
        if credential is None:
            return False  # a pass-through token is decided by its grants
        client = self._clients(upstream.name)
        key = f"{identity.fingerprint}:{upstream.name}:{repo}"
        if not self._passthrough_verdicts.fresh(key):
            await self._spend_probe(identity)
        accepted = await self._passthrough_verdicts.get(
            key,
            lambda: client.check_access(repo, reference, credential.username, credential.password),
        )
        return bool(accepted)

    async def login_accepted(self, identity: Identity) -> bool:
        """Whether any pass-through upstream accepts the identity's credential at all (a
        login with no scope, as ``podman login`` does)."""
        credential = identity.credential
        if credential is None:
            return False
        for up in self._upstreams.values():
            if not up.passthrough_enabled:
                continue
            key = f"{identity.fingerprint}:{up.name}"
            if not self._logins.fresh(key):
                await self._spend_probe(identity)
            accepted = await self._logins.get(key, self._login_probe(up.name, credential))
            if accepted:
                return True
        return False

    def _login_probe(
        self, upstream: str, credential: Credential
    ) -> Callable[[], Awaitable[bool | None]]:
        client = self._clients(upstream)
        return lambda: client.check_access(None, None, credential.username, credential.password)

    async def authorize(
        self,
        request: web.Request,
        upstream: UpstreamSettings,
        repo: str,
        client_name: str,
        reference: str | None,
    ) -> Identity:
        """Raise 401/403 unless the request's identity may pull ``<upstream>/<repo>``."""
        identity = await self.identify(request)
        if not self.engaged:
            return identity
        decision = await self.decide(identity, upstream, repo, reference)
        _count(decision)
        if decision.allowed:
            return identity
        self.usage.add(identity.key, identity.label, "denials")
        hint = ""
        if decision is DENY_PRIVATE:
            hint = (
                f" (upstream {upstream.name} does not serve it anonymously; set"
                f" upstreams[].visibility: public to serve it to everyone)"
            )
        audit.warning(
            "access denied: %s to %s/%s: %s%s",
            identity.display,
            upstream.name,
            repo,
            decision.reason,
            hint,
            extra={"upstream": upstream.name, "repo": repo, "reason": decision.reason},
        )
        scope = f"repository:{client_name}:pull"
        # A pass-through credential is only as good as the upstream says: refused, it is
        # not an authenticated client (and saying 403 would tell which rules list
        # pass-through). Only a local user's refusal is 403.
        if identity.kind != "user":
            error = "insufficient_scope" if identity.grants is not None else None
            raise Unauthorized(
                "authentication required",
                detail=[{"Type": "repository", "Name": client_name, "Action": "pull"}],
                headers={"WWW-Authenticate": self.challenge(request, scope, error)},
            )
        raise Denied(
            "requested access to the resource is denied",
            detail=[{"Type": "repository", "Name": client_name, "Action": "pull"}],
        )

    def challenge(self, request: web.Request, scope: str | None, error: str | None) -> str:
        host = request.host if _HOST.fullmatch(request.host) else "localhost"
        realm = self._realm or f"{self._scheme(request)}://{host}/token"
        ns = request.query.get("ns")
        if ns:
            realm += ("&" if "?" in realm else "?") + "ns=" + _quote(ns)
        parts = [f'realm="{realm}"', f'service="{self.service}"']
        if scope:
            parts.append(f'scope="{scope}"')
        if error:
            parts.append(f'error="{error}"')
        return "Bearer " + ",".join(parts)

    def _scheme(self, request: web.Request) -> str:
        proto = request.headers.get("X-Forwarded-Proto")
        if proto in ("http", "https") and is_trusted(request.remote or "", self._trusted):
            return proto
        return request.scheme

    # --- the token service ---------------------------------------------------------------

    async def issue(
        self, request: web.Request, credential: Credential | None, scopes: Iterable[str]
    ) -> dict[str, Any]:
        """Decide every requested scope and sign what was granted (Distribution's token
        service: a subset of what was asked, possibly empty)."""
        if self.tokens is None:
            raise RegistryError("the token service is not enabled") from None
        address = self.address(request)
        identity = (
            Identity("anonymous", address)
            if credential is None
            else await self.login(credential, address)
        )
        access: list[dict[str, Any]] = []
        grants: set[tuple[str, str]] = set()
        asked = [s for s in scopes if s]
        refused_passthrough = 0
        for scope in asked:
            parsed = _parse_scope(scope)
            if parsed is None:
                continue
            name, actions = parsed
            if "pull" not in actions:
                continue
            try:
                route = self._router.route(name, request.query.get("ns"))
            except RegistryError:
                continue
            decision = await self.decide(identity, route.upstream, route.repo, None)
            _count(decision)
            if decision is DENY_PASSTHROUGH:
                refused_passthrough += 1
            if decision.allowed:
                access.append({"type": "repository", "name": name, "actions": ["pull"]})
                grants.add((route.upstream.name, route.repo))
        if identity.kind == "passthrough" and not grants:
            assert credential is not None
            # Pass-through credentials the upstream refuses are wrong credentials here.
            if refused_passthrough or not await self.login_accepted(identity):
                audit.warning(
                    "token refused: %s: the upstream does not accept the credentials",
                    identity.display,
                    extra={"reason": "passthrough_refused"},
                )
                raise Unauthorized("invalid username or password")
        subject = identity.name or ""
        token, lifetime = self.tokens.issue(
            kind=identity.kind,
            subject=subject,
            access=access,
            grants=grants,
        )
        metrics.TOKENS_ISSUED.labels(identity.kind).inc()
        return {"token": token, "access_token": token, "expires_in": lifetime}

    # --- the blob chain ------------------------------------------------------------------

    def blob_layer(
        self, request: web.Request, upstream: UpstreamSettings, repo: str, client_name: str
    ) -> Callable[[RepositoryBlobs], RepositoryBlobs]:
        def wrap(inner: RepositoryBlobs) -> RepositoryBlobs:
            return AccessControlledBlobs(inner, self, request, upstream, repo, client_name)

        return wrap


class AccessControlledBlobs(RepositoryBlobs):
    """Distribution's ``BlobAccessController`` as a layer: decide, then ask the layer
    below. Nothing below is asked for a denied request, so a denial never says whether
    the blob exists."""

    def __init__(
        self,
        inner: RepositoryBlobs,
        control: AccessControl,
        request: web.Request,
        upstream: UpstreamSettings,
        repo: str,
        client_name: str,
    ) -> None:
        self._inner = inner
        self._control = control
        self._request = request
        self._upstream = upstream
        self._repo = repo
        self._client_name = client_name

    async def _authorize(self) -> None:
        await self._control.authorize(
            self._request, self._upstream, self._repo, self._client_name, None
        )

    async def stat(self, digest: Digest) -> Descriptor:
        await self._authorize()
        return await self._inner.stat(digest)

    async def open(self, digest: Digest) -> OpenedBlob:
        await self._authorize()
        return await self._inner.open(digest)


_HOST = re.compile(r"[A-Za-z0-9.-]+(:\d{1,5})?|\[[0-9A-Fa-f:.]+\](:\d{1,5})?")
"""What a Host header may be to be put in the challenge's realm (a quote or comma
would let a client rewrite the challenge)."""

_COUNTERS: dict[Decision, Any] = {}


def _count(decision: Decision) -> None:
    """Count a decision; the labelled child is looked up once per decision."""
    counter = _COUNTERS.get(decision)
    if counter is None:
        label = "allow" if decision.allowed else "deny"
        counter = _COUNTERS[decision] = metrics.ACCESS_DECISIONS.labels(label, decision.reason)
    counter.inc()


def _precreate_series(engaged: bool, limits: LimitSettings) -> None:
    """Series at 0 from the start, so dashboards show 0 rather than "no data"."""
    for counter in ("requests", "cache_bytes", "upstream_bytes", "denials", "limited"):
        metrics.IDENTITY_USAGE.labels("anonymous", counter)
    for name in ("requests", "cold_fetches", "cold_bytes"):
        if getattr(limits, name) is not None:
            metrics.LIMIT_REJECTIONS.labels(name, "anonymous")
    if not engaged:
        return
    for reason in ("public", "user", "token", "passthrough"):
        metrics.ACCESS_DECISIONS.labels("allow", reason)
    for reason in (
        "no_rule",
        "not_granted",
        "private",
        "unknown",
        "passthrough_refused",
        "bad_credentials",
    ):
        metrics.ACCESS_DECISIONS.labels("deny", reason)
    for kind in ("visibility", "passthrough", "login"):
        for result in ("cached", "granted", "refused"):
            metrics.ACCESS_CHECKS.labels(kind, result)


def _parse_scope(scope: str) -> tuple[str, set[str]] | None:
    """``repository:<name>:<action>[,<action>]`` -> (name, actions)."""
    kind, _, rest = scope.partition(":")
    name, _, actions = rest.rpartition(":")
    if kind != "repository" or not name:
        return None
    return name, {a.strip() for a in actions.split(",") if a.strip()}


def _quote(value: str) -> str:
    from urllib.parse import quote

    return quote(value, safe="")
