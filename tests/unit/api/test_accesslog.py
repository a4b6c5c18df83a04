"""The access-log line: one per request, with route, cache outcome, upstream and identity."""

from __future__ import annotations

import io
import json
import logging
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import make_mocked_request

from proxy import logs
from proxy.access.control import IDENTITY_KEY
from proxy.access.identity import Identity
from proxy.api.accesslog import FIELDS, MESSAGE, AccessLogger, make_record
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


def test_the_fields_never_overwrite_a_record_attribute() -> None:
    standard = set(logging.LogRecord("", 0, "", 0, "", (), None).__dict__)
    assert not standard & set(FIELDS)
    assert not {"message", "asctime"} & set(FIELDS)


def test_every_field_is_on_the_record_and_the_record_says_where_it_was_made(
    caplog: pytest.LogCaptureFixture,
) -> None:
    request = make_mocked_request("HEAD", "/v2/team/app/manifests/v1?ns=docker.io")
    record = logged(caplog, request, 200)
    assert record.getMessage() == "HEAD /v2/team/app/manifests/v1?ns=docker.io 200"
    assert set(FIELDS) <= set(record.__dict__)
    assert (record.route, record.upstream, record.identity) == ("other", "-", "-")  # type: ignore[attr-defined]
    assert (record.levelno, record.funcName, record.module) == (logging.INFO, "log", "accesslog")


def test_nothing_is_made_when_the_level_is_above_info(caplog: pytest.LogCaptureFixture) -> None:
    logger = logging.getLogger("proxy.access")
    caplog.set_level(logging.WARNING, logger="proxy.access")
    access = AccessLogger(logger, "")
    assert not access.enabled
    access.log(make_mocked_request("GET", "/v2/"), web.Response(), 0.001)
    assert not [r for r in caplog.records if r.name == "proxy.access"]


def test_a_made_record_is_what_logrecord_makes_but_for_its_time() -> None:
    args = ("GET", "/v2/", 200)
    made = make_record("aiohttp.access", args)
    reference = logging.LogRecord(
        "aiohttp.access", logging.INFO, made.pathname, made.lineno, MESSAGE, args, None, "log"
    )
    timed = {"created", "msecs", "relativeCreated"}
    assert list(made.__dict__) == list(reference.__dict__)  # same attributes, same order
    assert {k: v for k, v in made.__dict__.items() if k not in timed} == {
        k: v for k, v in reference.__dict__.items() if k not in timed
    }
    assert abs(made.created - reference.created) < 1
    assert made.msecs == int((made.created - int(made.created)) * 1000)
    assert (
        abs(
            (made.relativeCreated - reference.relativeCreated) / 1000
            - (made.created - reference.created)
        )
        < 0.001
    )
    assert made.getMessage() == "GET /v2/ 200"
    assert made.args is args


def test_an_installed_record_factory_makes_the_records() -> None:
    made: list[logging.LogRecord] = []
    original = logging.getLogRecordFactory()

    def factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = original(*args, **kwargs)
        made.append(record)
        return record

    logging.setLogRecordFactory(factory)
    try:
        record = make_record("aiohttp.access", ("GET", "/v2/", 200))
    finally:
        logging.setLogRecordFactory(original)
    assert made == [record]


@pytest.fixture
def root_handler() -> Iterator[Callable[..., io.StringIO]]:
    """Install the root logger's one handler as ``serve`` does (``logs.configure``), with
    its lines going to a StringIO; what the root had before is put back after."""
    root = logging.getLogger()
    saved, level = root.handlers[:], root.level

    def install(fmt: str, worker: int | None = None) -> io.StringIO:
        logs.configure("info", fmt, worker=worker)
        stream = io.StringIO()
        handler = root.handlers[0]
        assert isinstance(handler, logs.LoopStreamHandler)
        handler.setStream(stream)
        return stream

    yield install
    root.handlers[:] = saved
    root.setLevel(level)


def a_request() -> web.Request:
    request = make_mocked_request("GET", "/v2/team/app/manifests/v1?ns=docker.io")
    request[ROUTE_KEY] = "manifest"
    request[UPSTREAM_KEY] = "hub"
    request[OUTCOME_KEY] = Outcome.HIT
    request[IDENTITY_KEY] = Identity("user", "10.0.0.1", "alice")
    return request


class PassAll(logging.Filter):
    """A filter that lets everything through: its presence alone sends lines the long
    way (a record made and handled)."""


@pytest.mark.parametrize(
    ("fmt", "worker"), [("text", None), ("json", None), ("text", 1), ("json", 1)]
)
def test_a_line_made_without_a_record_is_the_line_the_record_makes(
    root_handler: Callable[..., io.StringIO],
    monkeypatch: pytest.MonkeyPatch,
    fmt: str,
    worker: int | None,
) -> None:
    stream = root_handler(fmt, worker)
    logger = logging.getLogger("proxy.access")
    monkeypatch.setattr(time, "time", lambda: 1_700_000_000.625)
    request, response = a_request(), web.Response(status=200, body=b"x" * 400)
    assert logs.direct_handler(logger) is logging.getLogger().handlers[0]
    AccessLogger(logger, "").log(request, response, 0.0125)  # no record
    logger.addFilter(PassAll())
    try:
        assert logs.direct_handler(logger) is None
        AccessLogger(logger, "").log(request, response, 0.0125)  # a record
    finally:
        logger.filters.clear()
    logging.getLogger().handlers[0].flush()
    direct, recorded = stream.getvalue().splitlines()
    assert direct == recorded
    assert "GET /v2/team/app/manifests/v1?ns=docker.io 200" in direct
    if fmt == "json":
        assert json.loads(direct)["ts"] == "2023-11-14T22:13:20.625Z"
        assert json.loads(direct)["identity"] == "alice"
        assert json.loads(direct).get("worker") == worker
    else:
        assert direct.endswith("duration_ms=12.5" + (" worker=1" if worker else ""))


def test_lines_take_the_long_way_when_anything_else_would_see_the_record(
    root_handler: Callable[..., io.StringIO],
) -> None:
    stream = root_handler("text")
    logger = logging.getLogger("proxy.access")
    root = logging.getLogger()
    handler = root.handlers[0]
    assert isinstance(handler, logs.LoopStreamHandler)
    assert logs.direct_handler(logger) is handler
    # A second handler on the way (pytest's log capture is one): both get the record.
    other = io.StringIO()
    logger.addHandler(logging.StreamHandler(other))
    assert logs.direct_handler(logger) is None
    AccessLogger(logger, "").log(a_request(), web.Response(), 0.001)
    handler.flush()
    assert other.getvalue() == "GET /v2/team/app/manifests/v1?ns=docker.io 200\n"
    assert stream.getvalue().count("GET /v2/team/app/manifests/v1?ns=docker.io 200") == 1
    logger.handlers.clear()
    root.handlers[:] = [handler]
    # Another record factory; no handler at all (logging.lastResort).
    original = logging.getLogRecordFactory()
    logging.setLogRecordFactory(lambda *a, **k: original(*a, **k))
    try:
        assert logs.direct_handler(logger) is None
    finally:
        logging.setLogRecordFactory(original)
    root.handlers[:] = []
    assert logs.direct_handler(logger) is None
    root.handlers[:] = [handler]
    # A handler of another class, another formatter, a filter that is not the worker's.
    assert logs.direct_handler(logger) is handler
    handler.setFormatter(logging.Formatter("%(message)s"))
    assert not handler.emit_fields("proxy.access", logging.INFO, "m", {})
    handler.setFormatter(logs.TextFormatter())
    handler.addFilter(PassAll())
    assert not handler.emit_fields("proxy.access", logging.INFO, "m", {})
    handler.filters.clear()
    handler.setLevel(logging.WARNING)
    assert not handler.emit_fields("proxy.access", logging.INFO, "m", {})
    handler.setLevel(logging.NOTSET)
    assert handler.emit_fields("proxy.access", logging.INFO, "m", {})
    # A formatter that raises: nothing is written, and the record's way reports it.
    handler.flush()
    written = stream.getvalue()

    def fail(*args: object) -> str:
        raise ValueError("cannot format")

    handler.formatter.format_fields = fail  # type: ignore[union-attr]
    assert not handler.emit_fields("proxy.access", logging.INFO, "m", {})
    handler.flush()
    assert stream.getvalue() == written
    handler.setFormatter(logs.TextFormatter())
    root.handlers[:] = [logging.StreamHandler(io.StringIO())]
    assert logs.direct_handler(logger) is None
