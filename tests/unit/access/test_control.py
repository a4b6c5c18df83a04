"""AccessControl: headers a proxy with nothing to protect ignores, and the client address
behind trusted proxies."""

from __future__ import annotations

import base64
import os
from pathlib import Path
from typing import Any
from unittest import mock

import bcrypt
import pytest
from aiohttp import web
from aiohttp.test_utils import make_mocked_request
from multidict import CIMultiDict

from proxy.access.control import AccessControl
from proxy.access.htpasswd import RELOAD_INTERVAL, Htpasswd
from proxy.errors import Unauthorized
from proxy.routing import Router
from proxy.settings import Settings
from proxy.upstream.client import UpstreamClient
from tests.unit.clock import Clock


def no_client(name: str) -> UpstreamClient:
    raise AssertionError(f"no upstream should be asked, asked {name}")


def control(data: dict[str, Any]) -> AccessControl:
    loaded = Settings.from_mapping(data, environ={})
    return AccessControl(loaded, Router(loaded.upstreams), no_client, None)


PUBLIC_ONLY: dict[str, Any] = {"upstreams": [{"name": "hub", "url": "http://127.0.0.1:5001"}]}


def test_with_nothing_to_protect_access_control_is_not_engaged() -> None:
    assert not control(PUBLIC_ONLY).engaged


async def test_without_access_control_a_well_formed_header_is_anonymous() -> None:
    access = control(PUBLIC_ONLY)
    request = make_mocked_request("GET", "/v2/", headers={"Authorization": "Bearer not-ours"})

    identity = await access.identify(request)

    assert identity.kind == "anonymous"


@pytest.mark.parametrize(
    "header", ["Negotiate YIIabc", "AWS4-HMAC-SHA256 Credential=x", "Basic not-base64!"]
)
async def test_without_access_control_any_header_is_anonymous(header: str) -> None:
    access = control(PUBLIC_ONLY)
    request = make_mocked_request("GET", "/v2/", headers={"Authorization": header})

    identity = await access.identify(request)

    assert identity.kind == "anonymous"


BEHIND_A_PROXY: dict[str, Any] = {**PUBLIC_ONLY, "auth": {"trusted_proxies": ["10.0.0.0/8"]}}


def from_proxy(headers: list[tuple[str, str]]) -> web.Request:
    """A request whose peer is the trusted proxy 10.0.0.1."""
    transport = mock.Mock()
    transport.get_extra_info.side_effect = lambda name, default=None: (
        ("10.0.0.1", 40000) if name == "peername" else default
    )
    return make_mocked_request("GET", "/v2/", headers=CIMultiDict(headers), transport=transport)


def test_the_client_address_comes_from_the_trusted_proxys_header() -> None:
    access = control(BEHIND_A_PROXY)
    request = from_proxy([("X-Forwarded-For", "198.51.100.1, 203.0.113.9")])

    assert access.address(request) == "203.0.113.9"


def test_a_second_forwarded_for_header_line_is_part_of_the_chain() -> None:
    access = control(BEHIND_A_PROXY)
    request = from_proxy([("X-Forwarded-For", "198.51.100.1"), ("X-Forwarded-For", "203.0.113.9")])

    assert access.address(request) == "203.0.113.9"


# --- remembered Authorization headers -------------------------------------------------


def _hash(password: str) -> str:
    return bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds=4)).decode()


async def test_a_remembered_header_is_forgotten_when_the_htpasswd_file_changes(
    tmp_path: Path,
) -> None:
    path = tmp_path / "htpasswd"
    path.write_text(f"alice:{_hash('pw')}\n")
    access = control({**PUBLIC_ONLY, "auth": {"htpasswd": str(path)}})
    clock = Clock()
    access.htpasswd = Htpasswd(path, clock=clock)
    access.htpasswd.load()
    header = "Basic " + base64.b64encode(b"alice:pw").decode()

    def request() -> web.Request:
        return make_mocked_request("GET", "/v2/", headers={"Authorization": header})

    assert (await access.identify(request())).name == "alice"
    assert (await access.identify(request())).name == "alice"  # remembered
    path.write_text(f"bob:{_hash('pw')}\n")
    os.utime(path, ns=(1, 1))
    clock.advance(RELOAD_INTERVAL)
    # alice is gone: her header is decided again and refused (no upstream passes through).
    with pytest.raises(Unauthorized):
        await access.identify(request())


async def test_a_refused_header_is_not_remembered(tmp_path: Path) -> None:
    path = tmp_path / "htpasswd"
    path.write_text(f"alice:{_hash('right')}\n")
    access = control({**PUBLIC_ONLY, "auth": {"htpasswd": str(path)}})
    access.htpasswd = Htpasswd(path)
    access.htpasswd.load()
    header = "Basic " + base64.b64encode(b"alice:wrong").decode()
    for _ in range(2):
        request = make_mocked_request("GET", "/v2/", headers={"Authorization": header})
        with pytest.raises(Unauthorized):
            await access.identify(request)
    assert header not in access._headers
