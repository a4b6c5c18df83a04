"""Peer request signatures and the lease value, without a network."""

from __future__ import annotations

import pytest

from proxy.cluster.leases import LeaseHolder
from proxy.cluster.peer import MAX_SKEW, SIGNATURE_HEADER, TIME_HEADER, PeerSigner, peer_path
from proxy.model import Digest
from proxy.settings import ConfigError, Settings

DIGEST = Digest("sha256", "a" * 64)
PATH = peer_path(DIGEST, 0)


class Clock:
    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_a_signature_verifies_for_its_method_path_and_time_only() -> None:
    clock = Clock()
    signer = PeerSigner(b"secret", clock=clock)
    headers = signer.headers("GET", PATH)
    assert signer.verify("GET", PATH, headers)
    assert not signer.verify("HEAD", PATH, headers)
    assert not signer.verify("GET", peer_path(DIGEST, 1), headers)
    assert not PeerSigner(b"other", clock=clock).verify("GET", PATH, headers)
    assert not signer.verify("GET", PATH, {**headers, TIME_HEADER: str(int(clock.now) + 1)})
    assert not signer.verify("GET", PATH, {TIME_HEADER: headers[TIME_HEADER]})
    assert not signer.verify("GET", PATH, {SIGNATURE_HEADER: headers[SIGNATURE_HEADER]})
    assert not signer.verify("GET", PATH, {**headers, TIME_HEADER: "soon"})


def test_a_signature_expires_after_the_skew_window() -> None:
    clock = Clock()
    signer = PeerSigner(b"secret", clock=clock)
    headers = signer.headers("GET", PATH)
    clock.now += MAX_SKEW
    assert signer.verify("GET", PATH, headers)
    clock.now += 1
    assert not signer.verify("GET", PATH, headers)
    clock.now -= 2 * MAX_SKEW + 2  # from the future, as seen by a slow clock
    assert not signer.verify("GET", PATH, headers)


def test_an_empty_secret_is_refused() -> None:
    with pytest.raises(ValueError):
        PeerSigner(b"")


def test_a_lease_value_round_trips_and_garbage_is_no_holder() -> None:
    holder = LeaseHolder("n1", "http://10.0.0.1:5000", "dockerhub", "library/nginx")
    assert LeaseHolder.parse(holder.encode().encode()) == holder
    assert holder.origin == ("dockerhub", "library/nginx")
    assert LeaseHolder.parse(b"n1 http://x") is None
    assert LeaseHolder.parse("a b c d e") is None


def test_the_cluster_is_on_only_with_an_address_and_a_secret() -> None:
    assert not Settings.from_mapping({}, environ={}).cluster.enabled
    half = Settings.from_mapping({"cluster": {"advertise": "10.0.0.1:5000"}}, environ={})
    assert not half.cluster.enabled
    both = Settings.from_mapping(
        {"cluster": {"secret_file": "/run/s"}},
        environ={"REGISTRY_PROXY_CLUSTER_ADVERTISE": "10.0.0.2:5000"},
    )
    assert both.cluster.enabled
    assert both.cluster.advertise == "http://10.0.0.2:5000"


@pytest.mark.parametrize("value", ["10.0.0.1", "http://10.0.0.1:5000/path", "ftp://h:1", ""])
def test_a_bad_advertise_address_names_the_key(value: str) -> None:
    with pytest.raises(ConfigError, match=r"cluster\.advertise"):
        Settings.from_mapping({"cluster": {"advertise": value}}, environ={})
