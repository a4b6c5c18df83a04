"""TokenService: JWTs the proxy signs and verifies (ES256 or RS256), and forgeries of
every kind refused; the signing key loaded or generated into the cache directory."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import stat
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.access import tokens
from proxy.access.tokens import (
    GENERATED_KEY_NAME,
    LEEWAY,
    TokenClaims,
    TokenService,
    load_or_generate_key,
)
from proxy.errors import Unauthorized
from tests.unit.clock import Clock

SERVICE = "registry-proxy"
EC_KEY = ec.generate_private_key(ec.SECP256R1())
OTHER_EC_KEY = ec.generate_private_key(ec.SECP256R1())
RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture
def service() -> TokenService:
    return TokenService(EC_KEY, service=SERVICE, expiry=300)


def issue_user(service: TokenService) -> str:
    token, _ = service.issue(
        kind="user",
        subject="alice",
        access=[{"type": "repository", "name": "library/alpine", "actions": ["pull"]}],
        grants=[("dockerhub", "library/alpine")],
    )
    return token


def claims(**changes: Any) -> dict[str, Any]:
    """Valid claims for SERVICE now, with ``changes`` (None deletes a claim)."""
    now = int(time.time())
    data: dict[str, Any] = {
        "iss": SERVICE,
        "sub": "alice",
        "aud": SERVICE,
        "exp": now + 300,
        "nbf": now - 1,
        "iat": now,
        "jti": "abc",
        "access": [],
        "rp_kind": "user",
        "rp_grants": [["dockerhub", "library/alpine"]],
    }
    for name, value in changes.items():
        if value is None:
            data.pop(name, None)
        else:
            data[name] = value
    return data


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def unsigned(header: dict[str, Any], payload: dict[str, Any]) -> str:
    return b64(json.dumps(header).encode()) + "." + b64(json.dumps(payload).encode())


# --- what the service issues -----------------------------------------------------------


def test_an_issued_token_verifies_to_its_claims(service: TokenService) -> None:
    token, lifetime = service.issue(
        kind="passthrough",
        subject="",
        access=[],
        grants=[("ghcr", "org/app"), ("dockerhub", "library/alpine")],
        fingerprint="f" * 32,
    )

    verified = service.verify(token)

    assert lifetime == 300
    assert verified == TokenClaims(
        kind="passthrough",
        subject="",
        grants=frozenset({("ghcr", "org/app"), ("dockerhub", "library/alpine")}),
        fingerprint="f" * 32,
        expires=verified.expires,
    )
    assert time.time() + 290 < verified.expires <= time.time() + 301


def test_an_anonymous_token_has_an_empty_subject(service: TokenService) -> None:
    token, _ = service.issue(
        kind="anonymous", subject="", access=[], grants=[("dockerhub", "library/alpine")]
    )

    verified = service.verify(token)

    assert (verified.kind, verified.subject, verified.fingerprint) == ("anonymous", "", None)
    assert verified.grants == frozenset({("dockerhub", "library/alpine")})


def test_the_token_carries_the_spec_claims(service: TokenService) -> None:
    token = issue_user(service)

    header = jwt.get_unverified_header(token)
    payload = jwt.decode(token, options={"verify_signature": False})

    assert header["alg"] == "ES256"
    assert payload["iss"] == payload["aud"] == SERVICE
    assert payload["sub"] == "alice"
    assert payload["access"] == [
        {"type": "repository", "name": "library/alpine", "actions": ["pull"]}
    ]
    assert payload["rp_kind"] == "user"
    assert payload["rp_grants"] == [["dockerhub", "library/alpine"]]
    assert "rp_fp" not in payload
    assert payload["nbf"] <= payload["iat"] < payload["exp"]
    assert len({issue_user(service) for _ in range(3)}) == 3  # a fresh jti each time


def test_an_rsa_2048_key_signs_rs256(tmp_path: Path) -> None:
    service = TokenService(RSA_KEY, service=SERVICE, expiry=60)

    token = issue_user(service)

    assert jwt.get_unverified_header(token)["alg"] == "RS256"
    assert service.verify(token).subject == "alice"
    # An ES256 service does not take it, nor the RS256 one an ES256 token.
    with pytest.raises(Unauthorized):
        TokenService(EC_KEY, service=SERVICE, expiry=60).verify(token)
    with pytest.raises(Unauthorized):
        service.verify(issue_user(TokenService(EC_KEY, service=SERVICE, expiry=60)))


def test_a_verified_token_is_remembered(
    service: TokenService, monkeypatch: pytest.MonkeyPatch
) -> None:
    token = issue_user(service)
    service.verify(token)
    decodes: list[str] = []
    real = jwt.decode

    def counting(*args: Any, **kwargs: Any) -> Any:
        decodes.append("decode")
        return real(*args, **kwargs)

    monkeypatch.setattr(jwt, "decode", counting)

    assert service.verify(token).subject == "alice"
    assert decodes == []


# --- expiry ------------------------------------------------------------------------------


def test_an_expired_token_is_unauthorized() -> None:
    then = Clock(time.time() - 3600)
    issuer = TokenService(EC_KEY, service=SERVICE, expiry=60, clock=then)
    token = issue_user(issuer)

    with pytest.raises(Unauthorized, match="expired"):
        TokenService(EC_KEY, service=SERVICE, expiry=60).verify(token)


def test_a_remembered_token_expires_too() -> None:
    clock = Clock(time.time())
    service = TokenService(EC_KEY, service=SERVICE, expiry=60, clock=clock)
    token = issue_user(service)
    assert service.verify(token).subject == "alice"

    clock.advance(61)

    with pytest.raises(Unauthorized, match="expired"):
        service.verify(token)


def test_expiry_within_the_leeway_is_accepted(service: TokenService) -> None:
    now = int(time.time())
    token = jwt.encode(claims(exp=now - int(LEEWAY) + 2), EC_KEY, algorithm="ES256")

    assert service.verify(token).subject == "alice"


def test_a_token_not_yet_valid_is_unauthorized(service: TokenService) -> None:
    now = int(time.time())
    token = jwt.encode(claims(nbf=now + 600), EC_KEY, algorithm="ES256")

    with pytest.raises(Unauthorized):
        service.verify(token)


# --- forgeries -------------------------------------------------------------------------------


def test_alg_none_is_unauthorized(service: TokenService) -> None:
    forged = jwt.encode(claims(), "", algorithm="none")
    by_hand = unsigned({"alg": "none", "typ": "JWT"}, claims()) + "."

    for token in (forged, by_hand):
        with pytest.raises(Unauthorized, match="invalid"):
            service.verify(token)


def test_a_token_signed_by_another_key_is_unauthorized(service: TokenService) -> None:
    other = TokenService(OTHER_EC_KEY, service=SERVICE, expiry=300)

    with pytest.raises(Unauthorized, match="invalid"):
        service.verify(issue_user(other))


@pytest.mark.parametrize("key", [EC_KEY, RSA_KEY], ids=["ec", "rsa"])
def test_hs256_signed_with_the_public_key_pem_is_unauthorized(
    key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey,
) -> None:
    service = TokenService(key, service=SERVICE, expiry=300)
    pem = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    signing_input = unsigned({"alg": "HS256", "typ": "JWT"}, claims())
    signature = hmac.new(pem, signing_input.encode(), hashlib.sha256).digest()
    forged = signing_input + "." + b64(signature)

    with pytest.raises(Unauthorized, match="invalid"):
        service.verify(forged)


def test_a_tampered_payload_is_unauthorized(service: TokenService) -> None:
    header, _, signature = issue_user(service).split(".")
    payload = claims(rp_grants=[["dockerhub", "private/secret"]])
    tampered = header + "." + b64(json.dumps(payload).encode()) + "." + signature

    with pytest.raises(Unauthorized, match="invalid"):
        service.verify(tampered)


def test_a_tampered_signature_is_unauthorized(service: TokenService) -> None:
    token = issue_user(service)
    head, _, signature = token.rpartition(".")
    flipped = ("A" if signature[0] != "A" else "B") + signature[1:]

    with pytest.raises(Unauthorized):
        service.verify(head + "." + flipped)


@pytest.mark.parametrize(
    "changes",
    [
        {"aud": "another-service"},
        {"iss": "another-service"},
        {"aud": ["another-service"]},
    ],
    ids=["audience", "issuer", "audience-list"],
)
def test_another_services_token_is_unauthorized(
    service: TokenService, changes: dict[str, Any]
) -> None:
    token = jwt.encode(claims(**changes), EC_KEY, algorithm="ES256")

    with pytest.raises(Unauthorized, match="invalid"):
        service.verify(token)


@pytest.mark.parametrize("missing", ["exp", "iat", "nbf", "aud", "iss", "sub", "rp_kind"])
def test_a_token_missing_a_required_claim_is_unauthorized(
    service: TokenService, missing: str
) -> None:
    token = jwt.encode(claims(**{missing: None}), EC_KEY, algorithm="ES256")

    with pytest.raises(Unauthorized, match="invalid"):
        service.verify(token)


@pytest.mark.parametrize(
    "changes",
    [
        {"rp_kind": "admin"},
        {"rp_grants": 7},
        {"rp_grants": [["only-one"]]},
        {"rp_grants": [[1, 2, 3]]},
        {"exp": "tomorrow"},
        {"sub": 42},
    ],
)
def test_a_signed_token_with_bad_claims_is_unauthorized(
    service: TokenService, changes: dict[str, Any]
) -> None:
    token = jwt.encode(claims(**changes), EC_KEY, algorithm="ES256")

    with pytest.raises(Unauthorized):
        service.verify(token)


def test_a_token_without_grants_has_none(service: TokenService) -> None:
    token = jwt.encode(claims(rp_grants=None), EC_KEY, algorithm="ES256")

    assert service.verify(token).grants == frozenset()


@settings(max_examples=200)
@given(st.text(max_size=400))
def test_any_string_as_a_token_is_unauthorized(token: str) -> None:
    service = TokenService(EC_KEY, service=SERVICE, expiry=300)
    with pytest.raises(Unauthorized):
        service.verify(token)


@given(
    st.lists(
        st.text(alphabet="ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_="),
        min_size=3,
        max_size=3,
    )
)
def test_any_three_base64url_segments_are_unauthorized(parts: list[str]) -> None:
    service = TokenService(EC_KEY, service=SERVICE, expiry=300)
    with pytest.raises(Unauthorized):
        service.verify(".".join(parts))


# --- the signing key -------------------------------------------------------------------------


def public_numbers(key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey) -> object:
    return key.public_key().public_numbers()


def test_a_key_is_generated_with_mode_0600_and_reused(tmp_path: Path) -> None:
    cache = tmp_path / "cache"

    first = load_or_generate_key(None, cache)
    second = load_or_generate_key(None, cache)

    path = cache / GENERATED_KEY_NAME
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert isinstance(first, ec.EllipticCurvePrivateKey)
    assert isinstance(first.curve, ec.SECP256R1)
    assert public_numbers(first) == public_numbers(second)
    assert sorted(p.name for p in cache.iterdir()) == [GENERATED_KEY_NAME]  # no temp left


def test_tokens_survive_a_restart(tmp_path: Path) -> None:
    before = TokenService.from_settings(None, tmp_path, service=SERVICE, expiry=60)
    token = issue_user(before)

    after = TokenService.from_settings(None, tmp_path, service=SERVICE, expiry=60)

    assert after.verify(token).subject == "alice"


def test_concurrent_generations_leave_one_key(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    start = threading.Barrier(4)

    def generate() -> object:
        start.wait(timeout=30)
        return public_numbers(load_or_generate_key(None, cache))

    with ThreadPoolExecutor(4) as pool:
        keys = list(pool.map(lambda _: generate(), range(4)))

    assert len({repr(k) for k in keys}) == 1
    assert keys[0] == public_numbers(load_or_generate_key(None, cache))
    assert sorted(p.name for p in cache.iterdir()) == [GENERATED_KEY_NAME]


def test_a_temp_file_left_by_a_crash_does_not_stop_the_next_start(tmp_path: Path) -> None:
    # In a container the proxy is often PID 1 on every start, so a temp file named by
    # the PID is the very one the next start would create.
    (tmp_path / f".{GENERATED_KEY_NAME}.{os.getpid()}.tmp").write_bytes(b"half a key")

    key = load_or_generate_key(None, tmp_path)

    assert isinstance(key, ec.EllipticCurvePrivateKey)
    assert (tmp_path / GENERATED_KEY_NAME).exists()


def write_pem(path: Path, key: Any) -> Path:
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return path


def test_a_configured_key_is_used_and_nothing_generated(tmp_path: Path) -> None:
    configured = write_pem(tmp_path / "rsa.pem", RSA_KEY)
    cache = tmp_path / "cache"

    key = load_or_generate_key(configured, cache)

    assert public_numbers(key) == public_numbers(RSA_KEY)
    assert not cache.exists()


def test_a_missing_configured_key_is_an_error_not_a_new_key(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        load_or_generate_key(tmp_path / "absent.pem", tmp_path)
    assert not (tmp_path / "absent.pem").exists()


@pytest.mark.parametrize(
    "make",
    [
        lambda: rsa.generate_private_key(public_exponent=65537, key_size=1024),
        lambda: ec.generate_private_key(ec.SECP384R1()),
    ],
    ids=["rsa-1024", "ec-p384"],
)
def test_weak_or_unsupported_keys_are_refused(tmp_path: Path, make: Callable[[], Any]) -> None:
    configured = write_pem(tmp_path / "key.pem", make())

    with pytest.raises(ValueError, match="token key"):
        load_or_generate_key(configured, tmp_path)


def test_the_key_is_generated_into_a_cache_dir_not_made_yet(tmp_path: Path) -> None:
    key = load_or_generate_key(None, tmp_path / "a" / "b")

    written = tmp_path / "a" / "b" / tokens.GENERATED_KEY_NAME
    assert written.is_file()
    assert public_numbers(key) == public_numbers(load_or_generate_key(written, tmp_path))
