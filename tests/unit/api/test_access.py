"""Access control through the HTTP API: create_app in front of a fake upstream that
demands Basic credentials (so everything it holds is private), with local users from an
htpasswd file, the proxy's own token service, and credential pass-through."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import logging
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import bcrypt
import jwt
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client import REGISTRY
from pytest_aiohttp import AiohttpClient, AiohttpServer

from proxy.api.handlers import ACCESS_KEY, REGISTRY_KEY
from proxy.app import create_app
from proxy.model import Digest
from proxy.settings import Settings
from tests.unit.fake_registry import AUTH_BASIC, FakeRegistry, manifest_body

REPO = "team/app"
OTHER = "other/app"
BODY = manifest_body("private-v1")
DIGEST = Digest.of(BODY)
BLOB = b"private layer bytes " * 1000
UP_USER, UP_PASSWORD = "robot", "upstream-secret-9f8e7d"
USERS = {"alice": "alice-pw-1a2b", "bob": "bob-pw-3c4d", "ops": "ops-pw-5e6f"}


def basic(user: str, password: str) -> dict[str, str]:
    value = base64.b64encode(f"{user}:{password}".encode()).decode()
    return {"Authorization": f"Basic {value}"}


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@dataclass
class Rig:
    client: TestClient[Any, Any]
    registry: FakeRegistry
    blob: Digest

    async def token(
        self, headers: dict[str, str] | None = None, scope: str = f"repository:{REPO}:pull"
    ) -> str:
        response = await self.client.get(
            "/token", params={"service": "registry-proxy", "scope": scope}, headers=headers
        )
        assert response.status == 200, await response.text()
        token: str = (await response.json())["token"]
        return token


Make = Callable[..., Awaitable[Rig]]


@pytest.fixture
def make(aiohttp_server: AiohttpServer, aiohttp_client: AiohttpClient, tmp_path: Path) -> Make:
    async def make(
        *,
        access: dict[str, Any] | None = None,
        limits: dict[str, Any] | None = None,
        upstream: dict[str, Any] | None = None,
        credentials: bool = True,
        htpasswd: bool = True,
        auth: dict[str, Any] | None = None,
        registry_auth: str = AUTH_BASIC,
    ) -> Rig:
        registry = FakeRegistry(auth=registry_auth, username=UP_USER, password=UP_PASSWORD)
        registry.add_manifest(REPO, "v1", BODY)
        registry.add_manifest(OTHER, "v1", manifest_body("other-v1"))
        blob = registry.add_blob(REPO, BLOB)
        registry.tags[REPO] = ["v1"]
        server = await aiohttp_server(registry.app())
        entry: dict[str, Any] = {
            "name": "fake",
            "url": f"http://{server.host}:{server.port}",
            "retries": 0,
        }
        if credentials:
            entry |= {"username": UP_USER, "password": UP_PASSWORD}
        data: dict[str, Any] = {
            "cache": {"dir": str(tmp_path / "cache")},
            "upstreams": [entry | (upstream or {})],
        }
        if htpasswd:
            path = tmp_path / "htpasswd"
            path.write_text(
                "".join(
                    f"{u}:{bcrypt.hashpw(p.encode(), bcrypt.gensalt(4)).decode()}\n"
                    for u, p in USERS.items()
                )
            )
            data["auth"] = {"htpasswd": str(path)}
        if auth is not None:
            data["auth"] = data.get("auth", {}) | auth
        if access is not None:
            data["access"] = access
        if limits is not None:
            data["limits"] = limits
        settings = Settings.from_mapping(data, environ={})
        return Rig(await aiohttp_client(create_app(settings)), registry, blob)

    return make


async def error_of(response: aiohttp.ClientResponse) -> dict[str, Any]:
    assert response.content_type == "application/json"
    (error,) = json.loads(await response.read())["errors"]
    result: dict[str, Any] = error
    return result


def decisions(decision: str, reason: str) -> float:
    value = REGISTRY.get_sample_value(
        "registry_proxy_access_decisions_total", {"decision": decision, "reason": reason}
    )
    return value or 0.0


def object_requests(rig: Rig) -> list[str]:
    """Upstream requests for the objects themselves (not access probes of tags/list or a
    manifest HEAD)."""
    return [
        f"{r.method} {r.path}"
        for r in rig.registry.v2_requests()
        if r.method == "GET" and "/tags/list" not in r.path
    ]


PRIVATE_PATHS = [
    ("GET", f"/v2/{REPO}/manifests/v1"),
    ("HEAD", f"/v2/{REPO}/manifests/v1"),
    ("GET", f"/v2/{REPO}/manifests/{DIGEST}"),
    ("GET", f"/v2/{REPO}/tags/list"),
    ("GET", f"/v2/{REPO}/referrers/{DIGEST}"),
]


# --- anonymous clients and private content ------------------------------------------------


async def test_anonymous_clients_get_nothing_private_only_a_challenge(make: Make) -> None:
    rig = await make()
    paths = [*PRIVATE_PATHS, ("GET", f"/v2/{REPO}/blobs/{rig.blob}")]
    paths.append(("HEAD", f"/v2/{REPO}/blobs/{rig.blob}"))
    for method, path in paths:
        response = await rig.client.request(method, path)
        assert response.status == 401, (method, path, response.status)
        challenge = response.headers["WWW-Authenticate"]
        assert challenge.startswith('Bearer realm="http://')
        assert '/token",service="registry-proxy"' in challenge
        assert f'scope="repository:{REPO}:pull"' in challenge
        if method == "GET":
            assert (await error_of(response))["code"] == "UNAUTHORIZED"
    assert object_requests(rig) == []  # nothing private was fetched for them
    base = await rig.client.get("/v2/")
    assert base.status == 401
    assert "scope=" not in base.headers["WWW-Authenticate"]


async def test_a_denial_does_not_say_whether_the_content_exists(make: Make) -> None:
    rig = await make()
    # Warm the cache with a client the upstream accepts.
    headers = basic(UP_USER, UP_PASSWORD)
    assert (await rig.client.get(f"/v2/{REPO}/blobs/{rig.blob}", headers=headers)).status == 200
    existing = await rig.client.get(f"/v2/{REPO}/blobs/{rig.blob}")
    missing = await rig.client.get(f"/v2/{REPO}/blobs/{Digest.of(b'no such blob')}")
    assert existing.status == missing.status == 401
    assert await existing.read() == await missing.read()


async def test_anonymous_token_grants_nothing_private(make: Make) -> None:
    rig = await make()
    token = await rig.token()
    claims = jwt.decode(token, options={"verify_signature": False})
    assert claims["access"] == []
    response = await rig.client.get(f"/v2/{REPO}/manifests/v1", headers=bearer(token))
    assert response.status == 401
    assert 'error="insufficient_scope"' in response.headers["WWW-Authenticate"]


async def test_the_refusal_names_the_visibility_key_in_the_log_not_to_the_client(
    make: Make, caplog: pytest.LogCaptureFixture
) -> None:
    rig = await make()
    caplog.set_level(logging.INFO)
    response = await rig.client.get(f"/v2/{REPO}/manifests/v1")
    body = await response.text()
    assert "visibility" not in body
    denial = [r for r in caplog.records if r.name == "proxy.audit"]
    assert denial and "visibility: public" in denial[-1].getMessage()
    assert "anonymous" in denial[-1].getMessage()


async def test_visibility_public_serves_private_content_to_everyone(make: Make) -> None:
    rig = await make(upstream={"visibility": "public"}, htpasswd=False)
    response = await rig.client.get(f"/v2/{REPO}/manifests/v1")
    assert response.status == 200
    assert await response.read() == BODY


async def test_without_credentials_or_users_nothing_is_challenged(make: Make) -> None:
    rig = await make(credentials=False, htpasswd=False, upstream={"visibility": None})
    assert (await rig.client.get("/v2/")).status == 200
    # The fake upstream demands credentials the proxy lacks: the upstream's own refusal.
    response = await rig.client.get(f"/v2/{REPO}/manifests/v1")
    assert response.status in (401, 403)
    assert "WWW-Authenticate" not in response.headers


# --- local users --------------------------------------------------------------------------


RULES = {
    "groups": {"ci": ["bob"]},
    "admins": ["ops"],
    "rules": [
        {"repos": "**", "pull": ["anonymous", "passthrough"]},
        {"repos": "fake/team/**", "pull": ["alice", "passthrough"]},
        {"repos": "fake/other/*", "pull": ["group:ci"]},
    ],
}


async def test_a_local_user_with_a_grant_pulls_by_basic_and_by_token(make: Make) -> None:
    rig = await make(access=RULES)
    headers = basic("alice", USERS["alice"])
    response = await rig.client.get(f"/v2/{REPO}/manifests/v1", headers=headers)
    assert response.status == 200
    assert await response.read() == BODY
    assert (await rig.client.get("/v2/", headers=headers)).status == 200
    token = await rig.token(headers)
    claims = jwt.decode(token, options={"verify_signature": False})
    assert claims["sub"] == "alice"
    assert claims["access"] == [{"type": "repository", "name": REPO, "actions": ["pull"]}]
    response = await rig.client.get(f"/v2/{REPO}/blobs/{rig.blob}", headers=bearer(token))
    assert response.status == 200
    assert await response.read() == BLOB
    assert (await rig.client.get("/v2/", headers=bearer(token))).status == 200


async def test_a_local_user_without_a_grant_is_denied_with_403(make: Make) -> None:
    rig = await make(access=RULES)
    headers = basic("bob", USERS["bob"])
    for path in (f"/v2/{REPO}/manifests/v1", f"/v2/{REPO}/blobs/{rig.blob}"):
        response = await rig.client.get(path, headers=headers)
        assert response.status == 403
        assert (await error_of(response))["code"] == "DENIED"
    token = await rig.token(headers)
    response = await rig.client.get(f"/v2/{REPO}/manifests/v1", headers=bearer(token))
    assert response.status == 403
    # ... while the group grant lets bob pull other/app.
    response = await rig.client.get(f"/v2/{OTHER}/manifests/v1", headers=headers)
    assert response.status == 200


async def test_a_wrong_password_is_401_and_never_logged(
    make: Make, caplog: pytest.LogCaptureFixture
) -> None:
    rig = await make(access=RULES)
    caplog.set_level(logging.DEBUG)
    wrong = "wrong-password-77aa"
    response = await rig.client.get(f"/v2/{REPO}/manifests/v1", headers=basic("alice", wrong))
    assert response.status == 401
    assert (await error_of(response))["code"] == "UNAUTHORIZED"
    assert "WWW-Authenticate" in response.headers
    token = await rig.client.get("/token", headers=basic("alice", wrong))
    assert token.status == 401
    text = "\n".join(r.getMessage() + repr(r.__dict__) for r in caplog.records)
    assert wrong not in text
    assert USERS["alice"] not in text


# --- pass-through -------------------------------------------------------------------------


async def test_upstream_credentials_pass_through_and_the_verdict_is_remembered(
    make: Make,
) -> None:
    rig = await make(access=RULES)
    headers = basic(UP_USER, UP_PASSWORD)
    for _ in range(3):
        response = await rig.client.get(f"/v2/{REPO}/manifests/v1", headers=headers)
        assert response.status == 200
    checks = [r for r in rig.registry.v2_requests() if r.method == "HEAD" and r.authorization]
    assert len(checks) == 1  # one probe with the client's credentials, then remembered
    assert checks[0].authorization == basic(UP_USER, UP_PASSWORD)["Authorization"]


async def test_wrong_upstream_credentials_are_401(make: Make) -> None:
    rig = await make(access=RULES)
    headers = basic("someone", "not-the-upstream-password")
    response = await rig.client.get(f"/v2/{REPO}/manifests/v1", headers=headers)
    assert response.status == 401
    assert (await rig.client.get("/v2/", headers=headers)).status == 401
    token = await rig.client.get(
        "/token", params={"scope": f"repository:{REPO}:pull"}, headers=headers
    )
    assert token.status == 401


async def test_oauth2_password_grant_as_containerd_sends_it(make: Make) -> None:
    rig = await make(access=RULES)
    form = {
        "grant_type": "password",
        "username": UP_USER,
        "password": UP_PASSWORD,
        "scope": f"repository:{REPO}:pull",
        "service": "registry-proxy",
        "client_id": "containerd-client",
    }
    response = await rig.client.post("/token", data=form)
    assert response.status == 200
    answer = await response.json()
    assert answer["expires_in"] > 0
    claims = jwt.decode(answer["access_token"], options={"verify_signature": False})
    assert claims["rp_kind"] == "passthrough"
    assert UP_PASSWORD not in answer["access_token"]
    response = await rig.client.get(
        f"/v2/{REPO}/manifests/v1", headers=bearer(answer["access_token"])
    )
    assert response.status == 200
    bad = await rig.client.post("/token", data=form | {"password": "wrong"})
    assert bad.status == 401
    refresh = await rig.client.post("/token", data={"grant_type": "refresh_token"})
    assert refresh.status in (400, 405)


async def test_passthrough_false_turns_pass_through_off(make: Make) -> None:
    rig = await make(access=RULES, upstream={"passthrough": False})
    response = await rig.client.get(f"/v2/{REPO}/manifests/v1", headers=basic(UP_USER, UP_PASSWORD))
    assert response.status == 401


# --- forged tokens and bad headers --------------------------------------------------------


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _forgeries(rig_token: str, public_pem: bytes) -> list[str]:
    """Tokens an attacker can make from a real (anonymous) one and the public key."""
    header, payload, signature = rig_token.split(".")
    claims = jwt.decode(rig_token, options={"verify_signature": False})
    other_key = ec.generate_private_key(ec.SECP256R1())
    widened = dict(claims, rp_grants=[["fake", REPO]], sub="alice", rp_kind="user")
    widened_payload = _b64(json.dumps(widened).encode())
    # HS256 keyed with the public key's PEM: the classic algorithm-confusion forgery.
    hs_header = _b64(b'{"alg":"HS256","typ":"JWT"}')
    hs_signature = hmac.new(
        public_pem, f"{hs_header}.{widened_payload}".encode(), hashlib.sha256
    ).digest()
    none_header = _b64(b'{"alg":"none","typ":"JWT"}')
    return [
        f"{none_header}.{widened_payload}.",
        jwt.encode(widened, other_key, algorithm="ES256"),
        f"{hs_header}.{widened_payload}.{_b64(hs_signature)}",
        f"{header}.{payload}.AAAA",
        f"{header}.{widened_payload}.{signature}",
        jwt.encode(dict(widened, exp=1), other_key, algorithm="ES256"),
        "not-a-jwt",
    ]


async def test_forged_and_tampered_tokens_are_401(make: Make, tmp_path: Path) -> None:
    rig = await make(access=RULES)
    anonymous = await rig.token()
    key = serialization.load_pem_private_key((tmp_path / "cache" / "token.pem").read_bytes(), None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    public_pem = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    for forged in _forgeries(anonymous, public_pem):
        response = await rig.client.get(f"/v2/{REPO}/manifests/v1", headers=bearer(forged))
        assert response.status == 401, forged
        assert (await error_of(response))["code"] == "UNAUTHORIZED"


async def test_a_token_for_another_repository_does_not_open_this_one(make: Make) -> None:
    rig = await make(access=RULES)
    token = await rig.token(basic("bob", USERS["bob"]), scope=f"repository:{OTHER}:pull")
    ok = await rig.client.get(f"/v2/{OTHER}/manifests/v1", headers=bearer(token))
    assert ok.status == 200
    denied = await rig.client.get(f"/v2/{REPO}/manifests/v1", headers=bearer(token))
    assert denied.status == 403


async def test_a_token_of_another_service_is_refused(make: Make) -> None:
    rig = await make(access=RULES)
    response = await rig.client.get("/token", params={"service": "elsewhere"})
    assert response.status == 401


@pytest.mark.parametrize(
    "header",
    [
        "Basic",
        "Basic !!!",
        "Basic " + base64.b64encode(b"no-colon").decode(),
        "Bearer",
        "Digest abc",
        "Basic " + "A" * 20000,
    ],
)
async def test_malformed_authorization_is_401_never_500(make: Make, header: str) -> None:
    rig = await make(access=RULES)
    response = await rig.client.get(f"/v2/{REPO}/manifests/v1", headers={"Authorization": header})
    assert response.status in (400, 401), response.status
    assert response.status != 500


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(value=st.text(max_size=300))
async def test_any_authorization_header_is_answered_without_a_500(make: Make, value: str) -> None:
    rig = await make(access=RULES, htpasswd=False)
    try:
        response = await rig.client.get(
            f"/v2/{REPO}/manifests/v1", headers={"Authorization": value}
        )
    except (ValueError, aiohttp.ClientError):
        return  # a header aiohttp itself refuses to send
    assert response.status in (200, 400, 401, 403), (value, response.status)


# --- limits ----------------------------------------------------------------------------------


async def test_cold_fetch_quota_refuses_cold_pulls_but_not_hits(make: Make) -> None:
    rig = await make(access=RULES, limits={"cold_fetches": "2/1h"})
    headers = basic("alice", USERS["alice"])
    assert (await rig.client.get(f"/v2/{REPO}/manifests/v1", headers=headers)).status == 200
    response = await rig.client.get(f"/v2/{REPO}/blobs/{rig.blob}", headers=headers)
    assert response.status == 200
    await response.read()
    await rig.client.app[REGISTRY_KEY].inflight.wait_idle()
    refused = await rig.client.get(f"/v2/{REPO}/manifests/{Digest.of(b'x')}", headers=headers)
    assert refused.status == 429
    assert (await error_of(refused))["code"] == "TOOMANYREQUESTS"
    assert int(refused.headers["Retry-After"]) > 0
    assert refused.headers["RateLimit-Limit"] == "2;w=3600"
    assert refused.headers["RateLimit-Remaining"] == "0;w=3600"
    # Hits cost nothing: both cached objects are still served.
    for path in (f"/v2/{REPO}/manifests/v1", f"/v2/{REPO}/blobs/{rig.blob}"):
        assert (await rig.client.get(path, headers=headers)).status == 200
    # Another identity has its own quota.
    other = basic("bob", USERS["bob"])
    assert (await rig.client.get(f"/v2/{OTHER}/manifests/v1", headers=other)).status == 200


async def test_request_rate_per_identity(make: Make) -> None:
    rig = await make(access=RULES, limits={"requests": "3/1h"})
    headers = basic("alice", USERS["alice"])
    statuses = [
        (await rig.client.get(f"/v2/{REPO}/manifests/v1", headers=headers)).status for _ in range(4)
    ]
    assert statuses == [200, 200, 200, 429]
    ops = basic("ops", USERS["ops"])
    assert (await rig.client.get("/v2/", headers=ops)).status == 200


# --- exposure ------------------------------------------------------------------------------


async def test_admin_usage_lists_identities_for_admins_only(make: Make) -> None:
    rig = await make(access=RULES)
    alice = basic("alice", USERS["alice"])
    for _ in range(2):
        response = await rig.client.get(f"/v2/{REPO}/manifests/v1", headers=alice)
        await response.read()
    assert (await rig.client.get("/admin/usage")).status == 401
    assert (await rig.client.get("/admin/usage", headers=alice)).status == 403
    response = await rig.client.get("/admin/usage", headers=basic("ops", USERS["ops"]))
    assert response.status == 200
    top = (await response.json())["identities"]
    entry = next(e for e in top if e["identity"] == "user:alice")
    assert entry["requests"] == 2
    assert entry["cache_bytes"] + entry["upstream_bytes"] == 2 * len(BODY)


async def test_decisions_are_counted_by_reason(make: Make) -> None:
    rig = await make(access=RULES)
    before_private = decisions("deny", "private")
    before_user = decisions("allow", "user")
    await rig.client.get(f"/v2/{REPO}/manifests/v1")
    await rig.client.get(f"/v2/{REPO}/manifests/v1", headers=basic("alice", USERS["alice"]))
    assert decisions("deny", "no_rule") >= 0
    assert decisions("deny", "not_granted") + decisions("deny", "private") > before_private
    assert decisions("allow", "user") == before_user + 1


# --- review findings ---------------------------------------------------------------------


async def test_a_malformed_token_service_answer_leaks_no_credential(
    aiohttp_server: AiohttpServer, aiohttp_client: AiohttpClient, tmp_path: Path
) -> None:
    """aiohttp's ``repr`` of a response error carries the request headers: the proxy's own
    Basic credentials must not reach a client's error body through it."""

    async def broken(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: nope\r\n\r\n{}")
        await writer.drain()
        writer.close()

    token_service = await asyncio.start_server(broken, "127.0.0.1", 0)
    port = token_service.sockets[0].getsockname()[1]

    async def v2(request: web.Request) -> web.Response:
        realm = f'Bearer realm="http://127.0.0.1:{port}/token",service="x"'
        return web.Response(status=401, headers={"WWW-Authenticate": realm})

    upstream = web.Application()
    upstream.router.add_route("*", "/v2/{tail:.*}", v2)
    server = await aiohttp_server(upstream)
    settings = Settings.from_mapping(
        {
            "cache": {"dir": str(tmp_path / "cache")},
            "upstreams": [
                {
                    "name": "up",
                    "url": f"http://{server.host}:{server.port}",
                    "username": UP_USER,
                    "password": UP_PASSWORD,
                    "visibility": "public",
                    "retries": 0,
                }
            ],
        },
        environ={},
    )
    client = await aiohttp_client(create_app(settings))
    try:
        response = await client.get(f"/v2/{REPO}/manifests/v1")
        body = await response.text()
        assert response.status >= 500
        secret = base64.b64encode(f"{UP_USER}:{UP_PASSWORD}".encode()).decode()
        assert secret not in body and UP_PASSWORD not in body
        assert "Authorization" not in body
    finally:
        token_service.close()
        await token_service.wait_closed()


async def test_made_up_credentials_buy_no_fresh_limits(make: Make) -> None:
    """Pass-through identities count by client address until the upstream has said
    anything: a new random credential per request is the same client."""
    rig = await make(access=RULES, limits={"requests": "3/1h"}, upstream={"visibility": "public"})
    statuses = []
    for n in range(5):
        headers = basic(f"made-up-{n}", f"pw-{n}")
        response = await rig.client.get(f"/v2/{OTHER}/manifests/v1", headers=headers)
        statuses.append(response.status)
    assert statuses[3:] == [429, 429]


async def test_upstream_probes_per_address_are_bounded(make: Make) -> None:
    rig = await make(access=RULES, auth={"probe_rate": "3/1h"})
    statuses = []
    for n in range(5):
        headers = basic(f"guess-{n}", "guess")
        response = await rig.client.get(f"/v2/{REPO}/manifests/v1", headers=headers)
        statuses.append(response.status)
    assert statuses[:3] == [401, 401, 401]
    assert statuses[3:] == [429, 429]
    probes = [r for r in rig.registry.v2_requests() if r.authorization]
    assert len(probes) <= 3 * 2  # at most the budget's worth (a challenge and a retry each)


async def test_a_missing_tag_of_a_public_repository_is_404_and_probed_once(make: Make) -> None:
    rig = await make(registry_auth="none", htpasswd=False)  # serves anonymously: public
    ok = await rig.client.get(f"/v2/{REPO}/manifests/v1")
    assert ok.status == 200
    rig.registry.requests.clear()
    for _ in range(3):
        missing = await rig.client.get(f"/v2/{REPO}/manifests/no-such-tag")
        assert missing.status == 404
        assert (await error_of(missing))["code"] == "MANIFEST_UNKNOWN"
    # The repository's visibility was known: no access probe, only the manifest GETs.
    assert all(r.method == "GET" for r in rig.registry.v2_requests())


async def test_a_missing_repository_is_refused_without_the_visibility_hint(
    make: Make, caplog: pytest.LogCaptureFixture
) -> None:
    rig = await make(registry_auth="none", htpasswd=False)
    caplog.set_level(logging.INFO)
    for _ in range(3):
        response = await rig.client.get("/v2/no/such-repo/manifests/v1")
        assert response.status == 401
    probes = [r for r in rig.registry.v2_requests() if "no/such-repo" in r.path]
    assert len(probes) == 2  # the manifest HEAD and the tags/list, once: remembered briefly
    denials = [r.getMessage() for r in caplog.records if r.name == "proxy.audit"]
    assert denials and all("unknown" in d and "visibility" not in d for d in denials)


async def test_made_up_credentials_are_401_even_where_the_rule_has_no_passthrough(
    make: Make,
) -> None:
    rig = await make(access=RULES)
    response = await rig.client.get(f"/v2/{OTHER}/manifests/v1", headers=basic("robot", "x"))
    assert response.status == 401
    assert "WWW-Authenticate" in response.headers


async def test_a_users_token_dies_with_the_user(make: Make, tmp_path: Path) -> None:
    rig = await make(access=RULES)
    token = await rig.token(basic("alice", USERS["alice"]))
    assert (await rig.client.get(f"/v2/{REPO}/manifests/v1", headers=bearer(token))).status == 200
    path = tmp_path / "htpasswd"
    path.write_text(path.read_text().replace("alice:", "alice-gone:"))
    os.utime(path, ns=(2, 2))
    control = rig.client.app[ACCESS_KEY]
    assert control.htpasswd is not None
    control.htpasswd._checked = -1e9  # the once-a-second re-read is due now
    response = await rig.client.get(f"/v2/{REPO}/manifests/v1", headers=bearer(token))
    assert response.status == 401


async def test_the_challenge_realm_is_never_built_from_a_hostile_host(make: Make) -> None:
    rig = await make()
    response = await rig.client.get(
        f"/v2/{REPO}/manifests/v1", headers={"Host": 'evil.example/x" ,scope="repository:o:push'}
    )
    assert response.status == 401
    challenge = response.headers["WWW-Authenticate"]
    assert "evil" not in challenge and "push" not in challenge
    assert challenge.count('"') == 6  # realm, service and scope, each quoted once


async def test_pass_through_tokens_carry_no_credential_hash(make: Make) -> None:
    rig = await make(access=RULES)
    token = await rig.token(basic(UP_USER, UP_PASSWORD))
    claims = jwt.decode(token, options={"verify_signature": False})
    assert claims["rp_kind"] == "passthrough"
    assert "rp_fp" not in claims


def test_upstream_sessions_keep_no_cookies() -> None:
    from proxy.settings import UpstreamSettings
    from proxy.upstream.client import UpstreamClient

    async def check() -> None:
        client = UpstreamClient.create(UpstreamSettings(name="u", url="http://127.0.0.1:1"))
        try:
            assert isinstance(client._session.cookie_jar, aiohttp.DummyCookieJar)
        finally:
            await client.close()

    asyncio.run(check())
