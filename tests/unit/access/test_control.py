"""AccessControl: only what the brief of the access unit tests covers of it, the bugs
found on the way (control.py is being reworked elsewhere; they are reported, not fixed)."""

from __future__ import annotations

from typing import Any

import pytest
from aiohttp.test_utils import make_mocked_request

from proxy.access.control import AccessControl
from proxy.routing import Router
from proxy.settings import Settings
from proxy.upstream.client import UpstreamClient


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


@pytest.mark.xfail(
    strict=True,
    reason=(
        "control.py: identify() parses Authorization before looking at `engaged`, so a proxy"
        " with nothing to protect answers 401 to a header of another scheme or a malformed"
        " Basic one, which it ignored before access control (reported, not fixed here)"
    ),
)
@pytest.mark.parametrize(
    "header", ["Negotiate YIIabc", "AWS4-HMAC-SHA256 Credential=x", "Basic not-base64!"]
)
async def test_without_access_control_any_header_is_anonymous(header: str) -> None:
    access = control(PUBLIC_ONLY)
    request = make_mocked_request("GET", "/v2/", headers={"Authorization": header})

    identity = await access.identify(request)

    assert identity.kind == "anonymous"
