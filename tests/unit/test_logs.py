"""Log formats and the loop-batched handler: the same text as ``logging`` would make,
written once per turn of the event loop, and never held back outside one."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import sys
import threading

import pytest

from proxy.logs import MAX_PENDING, JsonFormatter, LoopStreamHandler, TextFormatter

EXTRAS: dict[str, object] = {
    "route": "manifest",
    "status": 200,
    "cache": "hit",
    "duration_ms": 0.25,
}


def record(
    created: float, *, exc: bool = False, extra: dict[str, object] | None = None
) -> logging.LogRecord:
    exc_info = None
    if exc:
        try:
            raise ValueError("boom")
        except ValueError:
            exc_info = sys.exc_info()
    made = logging.getLogger("proxy.test").makeRecord(
        "proxy.test", logging.INFO, __file__, 10, "%s %s", ("GET", "/v2/"), exc_info, extra=extra
    )
    made.created = created
    made.msecs = (created - int(created)) * 1000
    return made


def reference_text(rec: logging.LogRecord) -> str:
    """What TextFormatter made before it was taken apart for speed."""
    standard = set(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {
        "message",
        "asctime",
    }
    line = logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s").format(rec)
    extras = {k: v for k, v in rec.__dict__.items() if k not in standard}
    if extras:
        line += " " + " ".join(f"{k}={v}" for k, v in extras.items())
    return line


@pytest.mark.parametrize(
    "created", [1_700_000_000.0, 1_700_000_000.999, 1_700_000_001.0005, 1_799_999_999.5]
)
@pytest.mark.parametrize("exc", [False, True])
def test_text_lines_are_what_logging_makes(created: float, exc: bool) -> None:
    formatter = TextFormatter()
    for extra in ({}, EXTRAS):
        # Twice: the second line reuses the remembered second.
        for _ in range(2):
            assert formatter.format(record(created, exc=exc, extra=extra)) == reference_text(
                record(created, exc=exc, extra=extra)
            )


def test_text_time_moves_on_with_the_second() -> None:
    formatter = TextFormatter()
    first = formatter.format(record(1_700_000_000.9))
    second = formatter.format(record(1_700_000_001.1))
    assert first.split(" ")[1] != second.split(" ")[1]
    assert second == reference_text(record(1_700_000_001.1))


def test_json_lines_keep_their_fields_and_time() -> None:
    formatter = JsonFormatter()
    for created, ts in (
        (1_700_000_000.25, "2023-11-14T22:13:20.250Z"),
        (1_700_000_001.5, "2023-11-14T22:13:21.500Z"),
    ):
        data = json.loads(formatter.format(record(created, extra=EXTRAS)))
        assert data == {
            "ts": ts,
            "level": "info",
            "logger": "proxy.test",
            "msg": "GET /v2/",
            **EXTRAS,
        }


def test_extras_of_a_record_made_from_a_dict_are_found() -> None:
    made = logging.makeLogRecord({"msg": "x", "name": "n", "levelname": "INFO", "route": "blob"})
    assert TextFormatter().format(made).endswith(" x route=blob")


def handler() -> tuple[LoopStreamHandler, io.StringIO]:
    stream = io.StringIO()
    made = LoopStreamHandler(stream)
    made.setFormatter(logging.Formatter("%(message)s"))
    return made, stream


def emit(target: LoopStreamHandler, message: str) -> None:
    target.handle(logging.makeLogRecord({"msg": message}))


def test_outside_a_loop_each_line_is_written_at_once() -> None:
    target, stream = handler()
    emit(target, "one")
    assert stream.getvalue() == "one\n"


async def test_lines_of_one_loop_turn_are_written_together_at_its_end() -> None:
    target, stream = handler()
    writes: list[str] = []
    original = stream.write

    def counting(text: str) -> int:
        writes.append(text)
        return original(text)

    stream.write = counting  # type: ignore[method-assign]
    for n in range(3):
        emit(target, f"line {n}")
    assert stream.getvalue() == ""
    await asyncio.sleep(0)
    assert stream.getvalue() == "line 0\nline 1\nline 2\n"
    assert writes == ["line 0\nline 1\nline 2\n"]
    emit(target, "next turn")
    await asyncio.sleep(0)
    assert stream.getvalue().endswith("line 2\nnext turn\n")


async def test_flush_writes_what_is_pending() -> None:
    target, stream = handler()
    emit(target, "pending")
    target.flush()
    assert stream.getvalue() == "pending\n"
    await asyncio.sleep(0)
    assert stream.getvalue() == "pending\n"  # not twice


async def test_a_long_turn_writes_before_its_end() -> None:
    target, stream = handler()
    line = "x" * 1000
    for _ in range(MAX_PENDING // 1000 + 1):
        emit(target, line)
    assert len(stream.getvalue()) > MAX_PENDING


async def test_a_line_from_another_thread_is_written_at_once_and_in_order() -> None:
    target, stream = handler()
    emit(target, "loop")
    thread = threading.Thread(target=emit, args=(target, "thread"))
    thread.start()
    thread.join()
    assert stream.getvalue() == "loop\nthread\n"


def test_lines_of_a_loop_that_ended_before_its_turn_are_not_lost() -> None:
    target, stream = handler()

    async def log_and_leave() -> None:
        emit(target, "from the first loop")

    loop = asyncio.new_event_loop()
    loop.run_until_complete(log_and_leave())
    loop.close()  # the scheduled write never runs

    async def log_again() -> None:
        emit(target, "from the second loop")
        await asyncio.sleep(0)

    asyncio.run(log_again())
    assert stream.getvalue() == "from the first loop\nfrom the second loop\n"
