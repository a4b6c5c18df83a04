"""The access-log line: one per request, with route, cache outcome, upstream and identity."""

from __future__ import annotations

import logging

import pytest
from aiohttp import web
from aiohttp.test_utils import make_mocked_request

from proxy.access.control import IDENTITY_KEY
from proxy.access.identity import Identity
from proxy.api.accesslog import AccessLogger
from proxy.api.middlewares import OUTCOME_KEY, ROUTE_KEY, UPSTREAM_KEY
from proxy.model import Outcome


def logged(
    caplog: pytest.LogCaptureFixture, request: web.Request, status: int
) -> logging.LogRecord:
    logger = logging.getLogger("proxy.access")
    caplog.set_level(logging.INFO, logger="proxy.access")
    AccessLogger(logger, "").log(request, web.Response(status=status), 0.0125)
    (record,) = [r for r in caplog.records if r.name == "proxy.access"]
    return record


def test_a_line_says_who_asked_and_what_the_cache_did(caplog: pytest.LogCaptureFixture) -> None:
    request = make_mocked_request("GET", "/v2/team/app/manifests/v1")
    request[ROUTE_KEY] = "manifest"
    request[UPSTREAM_KEY] = "hub"
    request[OUTCOME_KEY] = Outcome.HIT
    request[IDENTITY_KEY] = Identity("user", "10.0.0.1", "alice")
    record = logged(caplog, request, 200)
    assert record.getMessage() == "GET /v2/team/app/manifests/v1 200"
    fields = record.__dict__
    assert (fields["route"], fields["cache"], fields["upstream"]) == ("manifest", "hit", "hub")
    assert fields["identity"] == "alice"
    assert fields["duration_ms"] == 12.5


def test_a_pass_through_identity_is_logged_by_kind_never_by_credential(
    caplog: pytest.LogCaptureFixture,
) -> None:
    request = make_mocked_request("GET", "/v2/team/app/blobs/sha256:" + "a" * 64)
    request[IDENTITY_KEY] = Identity("passthrough", "10.0.0.2", fingerprint="f" * 32)
    record = logged(caplog, request, 401)
    assert record.__dict__["identity"] == "passthrough"
    assert record.__dict__["cache"] == "denied"
