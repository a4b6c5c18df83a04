"""Logging set-up: ``text`` for people, ``json`` (one object a line) for log pipelines.

Fields passed with ``extra=`` (digest, repo, upstream, ...) are kept: in JSON as keys,
in text appended as ``key=value``. Nothing here sees credentials: they are never put
in a log call in the first place.

The access log writes a line per request, so the per-line cost matters: timestamps are
formatted once per second (the same text ``logging.Formatter`` makes), and lines logged
on the event loop's thread are written together once per turn of the loop
(:class:`LoopStreamHandler`): one ``write`` for all the requests the loop answered in
that turn instead of one per line, and the lines are out before the loop next waits
for work. Lines from any other thread, and everything when no loop runs, are written at
once.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import time
from collections.abc import Callable
from itertools import islice
from typing import TextIO

_STANDARD_ORDER = tuple(logging.LogRecord("", 0, "", 0, "", (), None).__dict__)
_STANDARD = set(_STANDARD_ORDER) | {"message", "asctime"}
LOG_FORMATS = ("text", "json")
MSEC_FORMAT = logging.Formatter.default_msec_format or "%s,%03d"
MAX_PENDING = 64 << 10
"""Characters of buffered lines past which they are written without waiting for the
end of the loop's turn."""


def _extras(record: logging.LogRecord) -> dict[str, object]:
    """The ``extra=`` fields, in the order given. ``LogRecord.__init__`` sets the standard
    attributes first, always the same ones in the same order: only what follows them
    (the extras, then what formatting adds) is looked at."""
    items = iter(record.__dict__.items())
    first = next(islice(items, len(_STANDARD_ORDER) - 1, None), None)
    if first is None:
        return {}
    if first[0] != _STANDARD_ORDER[-1]:  # not made by LogRecord.__init__: look at all
        return {k: v for k, v in record.__dict__.items() if k not in _STANDARD}
    return {k: v for k, v in items if k not in _STANDARD}


class _SecondsCache:
    """``convert(seconds)`` formatted with ``pattern``, remembered for the last second."""

    __slots__ = ("_convert", "_pattern", "_second", "_text")

    def __init__(self, pattern: str, convert: Callable[[float | None], time.struct_time]) -> None:
        self._pattern = pattern
        self._convert = convert
        self._second = -1
        self._text = ""

    def format(self, created: float) -> str:
        second = int(created)
        if second != self._second:
            self._text = time.strftime(self._pattern, self._convert(created))
            self._second = second
        return self._text


def _msecs(created: float) -> float:
    """A record's ``msecs`` for ``created``, as ``LogRecord.__init__`` sets it."""
    return int((created - int(created)) * 1000) + 0.0


class JsonFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__()
        self._seconds = _SecondsCache("%Y-%m-%dT%H:%M:%S", time.gmtime)

    def format(self, record: logging.LogRecord) -> str:
        out = self._object(record.created, record.msecs, record.levelname, record.name)
        out["msg"] = record.getMessage()
        out.update(_extras(record))
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)

    def format_fields(
        self, created: float, levelname: str, name: str, message: str, extras: dict[str, object]
    ) -> str:
        """What ``format`` makes of a record with these attributes and ``extra=``
        fields, with no exception or stack attached."""
        out = self._object(created, _msecs(created), levelname, name)
        out["msg"] = message
        out.update(extras)
        return json.dumps(out, default=str)

    def _object(self, created: float, msecs: float, levelname: str, name: str) -> dict[str, object]:
        return {
            "ts": f"{self._seconds.format(created)}.{int(msecs):03d}Z",
            "level": levelname.lower(),
            "logger": name,
        }


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s %(message)s")
        self._seconds = _SecondsCache(self.default_time_format, self.converter)

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        if datefmt:
            return super().formatTime(record, datefmt)
        return MSEC_FORMAT % (self._seconds.format(record.created), record.msecs)

    def format(self, record: logging.LogRecord) -> str:
        # logging.Formatter.format with this fixed format, without its generic steps.
        record.message = record.getMessage()
        record.asctime = self.formatTime(record)
        line = f"{record.asctime} {record.levelname} {record.name} {record.message}"
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            line += record.exc_text if line[-1:] == "\n" else "\n" + record.exc_text
        if record.stack_info:
            stack = self.formatStack(record.stack_info)
            line += stack if line[-1:] == "\n" else "\n" + stack
        return line + _text_extras(_extras(record))

    def format_fields(
        self, created: float, levelname: str, name: str, message: str, extras: dict[str, object]
    ) -> str:
        """What ``format`` makes of a record with these attributes and ``extra=``
        fields, with no exception or stack attached."""
        asctime = MSEC_FORMAT % (self._seconds.format(created), _msecs(created))
        return f"{asctime} {levelname} {name} {message}" + _text_extras(extras)


def _text_extras(extras: dict[str, object]) -> str:
    if not extras:
        return ""
    return " " + " ".join([f"{k}={v}" for k, v in extras.items()])


class LoopStreamHandler(logging.StreamHandler[TextIO]):
    """A ``StreamHandler`` that writes the lines of one turn of the running event loop
    together, at the end of that turn (see the module docstring). ``flush()`` writes
    what is pending; so does ``logging.shutdown`` at exit. A process killed outright
    loses at most the lines of the turn it was killed in."""

    def __init__(self, stream: TextIO | None = None) -> None:
        super().__init__(stream)
        self._pending: list[str] = []
        self._pending_size = 0
        self._scheduled: asyncio.AbstractEventLoop | None = None

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record) + self.terminator
        except RecursionError:
            raise
        except Exception:
            self.handleError(record)
            return
        self._queue(line)

    def emit_fields(self, name: str, levelno: int, message: str, extras: dict[str, object]) -> bool:
        """Write the line a record of logger ``name`` (``message`` and ``extra=`` fields,
        made now) would give, without making the record: for lines made so often that
        the record is a noticeable part of their cost (the access log). Done only when
        the outcome is the same: the formatter is this module's and the only filter is
        the worker's, and the formatter did not raise (else False, and nothing is
        written)."""
        formatter = self.formatter
        if type(formatter) not in _FORMATTERS or levelno < self.level:
            return False
        filters = self.filters
        if filters:
            if len(filters) > 1 or type(filters[0]) is not _Worker:
                return False
            extras = {**extras, "worker": filters[0].index}
        assert isinstance(formatter, (TextFormatter, JsonFormatter))
        levelname = logging.getLevelName(levelno)
        # Formatted under the lock as Handler.handle formats under it: the formatter's
        # one-second caches are not safe to update from two threads at once.
        with self.lock:  # type: ignore[union-attr]
            try:
                line = formatter.format_fields(time.time(), levelname, name, message, extras)
            except Exception:
                return False  # the record's way then, where logging reports what failed
            self._queue(line + self.terminator)
        return True

    def _queue(self, line: str) -> None:
        try:
            loop: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        if self._scheduled is not None and self._scheduled is not loop:
            self.flush()  # the turn of another loop never came: write its lines now
        self._pending.append(line)
        self._pending_size += len(line)
        if loop is None or self._pending_size > MAX_PENDING:
            self.flush()
        elif self._scheduled is None:
            self._scheduled = loop
            loop.call_soon(self.flush)

    def flush(self) -> None:
        with self.lock:  # type: ignore[union-attr]
            self._scheduled = None
            if self._pending:
                lines, self._pending, self._pending_size = self._pending, [], 0
                try:
                    self.stream.write("".join(lines))
                except RecursionError:
                    raise
                except Exception:
                    # As StreamHandler does for a line it cannot write: report, go on.
                    self.handleError(logging.makeLogRecord({"msg": "log write failed"}))
            super().flush()


class _Worker(logging.Filter):
    """Workers (``workers`` > 1): every line says which worker wrote it."""

    def __init__(self, index: int) -> None:
        super().__init__()
        self.index = index

    def filter(self, record: logging.LogRecord) -> bool:
        record.worker = self.index
        return True


_FORMATTERS = (TextFormatter, JsonFormatter)


def direct_handler(logger: logging.Logger) -> LoopStreamHandler | None:
    """The handler that alone would get a record ``logger`` passes on, when that is a
    :class:`LoopStreamHandler` (see ``LoopStreamHandler.emit_fields``); None when the
    record would meet anything else on its way: a filter of the logger, a second
    handler, no handler at all (``logging.lastResort``), a record factory of its own."""
    if logger.filters or logging.getLogRecordFactory() is not logging.LogRecord:
        return None
    found: logging.Handler | None = None
    current: logging.Logger | None = logger
    while current is not None:
        for handler in current.handlers:
            if found is not None:
                return None
            found = handler
        if not current.propagate:
            break
        current = current.parent
    return found if type(found) is LoopStreamHandler else None


def configure(level: str, fmt: str, *, worker: int | None = None) -> None:
    handler = LoopStreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    if worker is not None:
        handler.addFilter(_Worker(worker))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
