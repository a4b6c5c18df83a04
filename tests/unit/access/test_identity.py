"""Identity: the ``Authorization`` header (Basic, Bearer, anything else refused) and the
client address behind trusted proxies."""

from __future__ import annotations

import base64
import hashlib
import ipaddress

import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy.access.identity import (
    MAX_AUTHORIZATION,
    MAX_USERNAME,
    Credential,
    Identity,
    Network,
    Presented,
    client_address,
    parse_authorization,
)
from proxy.errors import Unauthorized

TRUSTED: list[Network] = [ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("::1/128")]


def basic(text: str) -> str:
    return "Basic " + base64.b64encode(text.encode()).decode()


# --- parse_authorization ---------------------------------------------------------------


def test_no_header_is_no_credentials() -> None:
    assert parse_authorization(None) is None


def test_basic_gives_username_and_password() -> None:
    presented = parse_authorization(basic("alice:s3cret"))

    assert presented == Presented("basic", credential=Credential("alice", "s3cret"))


def test_basic_password_may_contain_colons_and_be_empty() -> None:
    with_colons = parse_authorization(basic("alice:a:b:c"))
    empty = parse_authorization(basic("alice:"))

    assert with_colons is not None and with_colons.credential == Credential("alice", "a:b:c")
    assert empty is not None and empty.credential == Credential("alice", "")


@pytest.mark.parametrize("scheme", ["basic", "BASIC", "bAsIc"])
def test_scheme_is_case_insensitive(scheme: str) -> None:
    value = base64.b64encode(b"bob:pw").decode()

    presented = parse_authorization(f"{scheme} {value}")

    assert presented is not None and presented.credential == Credential("bob", "pw")


def test_surrounding_whitespace_is_ignored() -> None:
    presented = parse_authorization("  Bearer   abc.def.ghi  ")

    assert presented == Presented("bearer", token="abc.def.ghi")


def test_bearer_gives_the_token() -> None:
    assert parse_authorization("Bearer tok") == Presented("bearer", token="tok")


@pytest.mark.parametrize(
    "header",
    [
        "Basic",
        "Basic ",
        "Bearer",
        "Bearer    ",
        "Basic !!!notbase64!!!",
        "Basic " + base64.b64encode(b"no-colon").decode(),
        "Basic " + base64.b64encode(b":password-without-user").decode(),
        "Basic " + base64.b64encode(b"\xff\xfe:bad-utf8").decode(),
        "Basic " + base64.b64encode(("u" * (MAX_USERNAME + 1) + ":pw").encode()).decode(),
        "Basic " + base64.b64encode(b"alice:pw").decode()[:-1],  # bad padding
        "Basic caf\u00e9",  # not ASCII
    ],
)
def test_malformed_credentials_are_unauthorized(header: str) -> None:
    with pytest.raises(Unauthorized):
        parse_authorization(header)


@pytest.mark.parametrize(
    "header", ["Digest username=alice", "Negotiate abc", "Token abc", "", "   ", "alice:pw"]
)
def test_other_schemes_are_unauthorized(header: str) -> None:
    with pytest.raises(Unauthorized):
        parse_authorization(header)


def test_username_at_the_limit_is_accepted() -> None:
    name = "u" * MAX_USERNAME

    presented = parse_authorization(basic(f"{name}:pw"))

    assert presented is not None and presented.credential is not None
    assert presented.credential.username == name


def test_a_huge_header_is_refused_before_decoding() -> None:
    at_limit = "Bearer " + "a" * (MAX_AUTHORIZATION - len("Bearer "))
    over = at_limit + "a"

    assert parse_authorization(at_limit) is not None
    with pytest.raises(Unauthorized, match="too large"):
        parse_authorization(over)
    with pytest.raises(Unauthorized, match="too large"):
        parse_authorization(basic("alice:" + "p" * MAX_AUTHORIZATION))


@given(st.text(max_size=300))
def test_arbitrary_header_text_is_a_value_or_unauthorized(header: str) -> None:
    try:
        presented = parse_authorization(header)
    except Unauthorized:
        return
    assert presented is not None
    assert (presented.scheme == "bearer") == (presented.token is not None)
    assert (presented.scheme == "basic") == (presented.credential is not None)


@given(st.binary(max_size=200))
def test_arbitrary_basic_payload_is_a_value_or_unauthorized(payload: bytes) -> None:
    header = "Basic " + base64.b64encode(payload).decode()
    try:
        presented = parse_authorization(header)
    except Unauthorized:
        return
    assert presented is not None and presented.credential is not None
    username, password = presented.credential.username, presented.credential.password
    assert f"{username}:{password}".encode() == payload


# --- the credential never shows ----------------------------------------------------------


def test_the_password_is_not_in_repr_nor_the_fingerprint() -> None:
    credential = Credential("alice", "hunter2-secret")
    identity = Identity("passthrough", "192.0.2.1", credential=credential, fingerprint="f" * 32)

    assert "hunter2-secret" not in repr(credential)
    assert "hunter2-secret" not in repr(identity)
    assert "hunter2-secret" not in identity.display
    assert "hunter2-secret" not in credential.fingerprint(b"k")
    assert len(credential.fingerprint(b"k")) == 32


def test_fingerprints_differ_by_user_and_password() -> None:
    prints = {
        Credential("alice", "pw").fingerprint(b"k"),
        Credential("alice", "pw2").fingerprint(b"k"),
        Credential("bob", "pw").fingerprint(b"k"),
        # the separator keeps "a" + "b:c" apart from "a:b" + "c"
        Credential("a", "b:c").fingerprint(b"k"),
        Credential("a:b", "c").fingerprint(b"k"),
    }

    assert len(prints) == 5
    same = Credential("alice", "pw")
    assert same.fingerprint(b"k") == Credential("alice", "pw").fingerprint(b"k")
    # Keyed: without the proxy's secret the hash of a guessed password does not match.
    assert same.fingerprint(b"k") != same.fingerprint(b"other")
    unkeyed = hashlib.sha256(b"alice\0pw").hexdigest()[:32]
    assert same.fingerprint(b"k") != unkeyed


def test_identity_key_and_label() -> None:
    user = Identity("user", "192.0.2.1", name="alice")
    passthrough = Identity("passthrough", "192.0.2.1", fingerprint="0123456789abcdef" * 2)
    anonymous = Identity("anonymous", "192.0.2.1")

    assert (user.key, user.label, user.authenticated) == ("user:alice", "alice", True)
    assert passthrough.key == "ip:192.0.2.1"  # a made-up credential buys no fresh limits
    assert (passthrough.label, passthrough.authenticated) == ("passthrough", True)
    assert (anonymous.key, anonymous.label) == ("ip:192.0.2.1", "anonymous")
    assert not anonymous.authenticated


# --- client_address -------------------------------------------------------------------------


def test_the_peer_without_trusted_proxies() -> None:
    assert client_address("192.0.2.7", "203.0.113.9", []) == "192.0.2.7"


def test_an_untrusted_peer_cannot_claim_an_address() -> None:
    assert client_address("192.0.2.7", "203.0.113.9", TRUSTED) == "192.0.2.7"


def test_a_trusted_peer_without_the_header_is_the_client() -> None:
    assert client_address("10.1.2.3", None, TRUSTED) == "10.1.2.3"
    assert client_address("10.1.2.3", "", TRUSTED) == "10.1.2.3"


def test_a_trusted_proxy_names_the_client() -> None:
    assert client_address("10.1.2.3", "203.0.113.9", TRUSTED) == "203.0.113.9"


def test_a_chain_of_trusted_proxies_is_walked_from_the_right() -> None:
    chain = "203.0.113.9, 10.0.0.2, 10.0.0.1"

    assert client_address("10.1.2.3", chain, TRUSTED) == "203.0.113.9"


def test_a_spoofed_prefix_of_the_chain_is_ignored() -> None:
    # The client sent "X-Forwarded-For: 198.51.100.1"; our proxy appended the real address.
    assert client_address("10.1.2.3", "198.51.100.1, 203.0.113.9", TRUSTED) == "203.0.113.9"


def test_a_spoofed_trusted_looking_address_is_ignored() -> None:
    # The client claims to be one of our proxies: the hop our proxy saw still wins.
    assert client_address("10.1.2.3", "10.9.9.9, 203.0.113.9", TRUSTED) == "203.0.113.9"


def test_an_unreadable_hop_stops_the_walk_at_the_last_trusted_one() -> None:
    assert client_address("10.1.2.3", "203.0.113.9, garbage", TRUSTED) == "10.1.2.3"
    assert client_address("10.1.2.3", "garbage, 10.0.0.2", TRUSTED) == "10.0.0.2"
    assert client_address("10.1.2.3", "203.0.113.9:1234", TRUSTED) == "10.1.2.3"


def test_every_hop_trusted_gives_the_leftmost() -> None:
    assert client_address("10.1.2.3", "10.0.0.5, 10.0.0.6", TRUSTED) == "10.0.0.5"


def test_ipv6_hops() -> None:
    assert client_address("::1", "2001:db8::5", TRUSTED) == "2001:db8::5"
    assert client_address("::1", "2001:db8::5, ::1", TRUSTED) == "2001:db8::5"


def test_no_peer_is_unknown() -> None:
    assert client_address(None, "203.0.113.9", TRUSTED) == "unknown"
    assert client_address(None, None, []) == "unknown"


def trusted(hop: str) -> bool:
    ip = ipaddress.ip_address(hop)
    mapped = ip.ipv4_mapped if isinstance(ip, ipaddress.IPv6Address) else None
    return any(ip in network or (mapped is not None and mapped in network) for network in TRUSTED)


@given(
    st.lists(
        st.one_of(
            st.ip_addresses().map(str),
            st.sampled_from(["", "garbage", "10.0.0.1", "::1", " "]),
        ),
        max_size=6,
    )
)
def test_the_answer_is_the_peer_or_a_hop_with_only_proxies_right_of_it(hops: list[str]) -> None:
    stripped = [h.strip() for h in hops]

    address = client_address("10.1.2.3", ", ".join(hops), TRUSTED)

    if address == "10.1.2.3" and address not in stripped:
        return
    assert address in stripped
    right = stripped[len(stripped) - stripped[::-1].index(address) :]
    assert all(trusted(h) for h in right)


def test_an_ipv4_mapped_peer_is_matched_against_ipv4_networks() -> None:
    # A dual-stack listener ("[::]:5000") sees IPv4 peers as ::ffff:a.b.c.d.
    assert client_address("::ffff:10.1.2.3", "203.0.113.9", TRUSTED) == "203.0.113.9"
    assert client_address("10.1.2.3", "203.0.113.9, ::ffff:10.0.0.2", TRUSTED) == "203.0.113.9"
