"""The connection guard's arithmetic: the derived bound, the sweep interval, the raw
answers it writes where there is no request to answer through."""

from __future__ import annotations

import json
import resource

import pytest

from proxy.api.connections import (
    BUSY_ANSWER,
    FD_RESERVE,
    HEADER_TIMEOUT_ANSWER,
    MIN_DERIVED_CONNECTIONS,
    ConnectionGuard,
    derived_max_connections,
)


@pytest.mark.parametrize(
    ("soft", "expected"),
    [(1024, (1024 - FD_RESERVE) // 2), (20000, (20000 - FD_RESERVE) // 2), (64, None)],
)
def test_max_connections_is_derived_from_the_open_files_limit(
    monkeypatch: pytest.MonkeyPatch, soft: int, expected: int | None
) -> None:
    monkeypatch.setattr(resource, "getrlimit", lambda _: (soft, soft))
    assert derived_max_connections() == (expected or MIN_DERIVED_CONNECTIONS)


def test_an_explicit_bound_wins_and_the_sweep_follows_the_shortest_timeout() -> None:
    guard = ConnectionGuard(
        header_timeout=2, keepalive_timeout=75, send_timeout=0, max_connections=7
    )
    assert guard.max_connections == 7
    assert guard.sweep_interval == 0.5
    assert (
        ConnectionGuard(header_timeout=30, keepalive_timeout=75, send_timeout=60).sweep_interval
        == 1.0
    )


@pytest.mark.parametrize(
    ("answer", "status", "code"),
    [(HEADER_TIMEOUT_ANSWER, 408, "UNSUPPORTED"), (BUSY_ANSWER, 503, "UNAVAILABLE")],
)
def test_raw_answers_are_complete_http_with_an_oci_body(
    answer: bytes, status: int, code: str
) -> None:
    head, _, body = answer.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    assert lines[0].startswith(f"HTTP/1.1 {status} ")
    headers = dict(line.split(": ", 1) for line in lines[1:])
    assert int(headers["Content-Length"]) == len(body)
    assert headers["Connection"] == "close"
    assert json.loads(body)["errors"][0]["code"] == code
