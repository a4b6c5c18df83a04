"""One access-log line per request: what was asked, the cache outcome, upstream, who asked
(a local user's name, else anonymous or passthrough), bytes, time.

The line is a ``logging`` record like any other (so levels, handlers and formatters
apply), made directly rather than through ``Logger.info``: that looks for its caller's
frame on every call, which is a noticeable part of a cached response's cost. The record
names this module's ``log`` as where it was made, as ``Logger.info`` would have.

Making a ``LogRecord`` is itself a few microseconds (file name splitting, thread and
process names), and all of it but the time is the same for every line a process's loop
thread logs: so the attributes of one record made by ``LogRecord`` are kept per (logger,
process, thread) and copied into each new record, which then gets its own time (and,
from Python 3.12, task name) the way ``LogRecord.__init__`` sets them. With a record
factory other than ``LogRecord`` installed, that factory makes every record.

As set up by ``serve`` (one handler, this project's, on the root logger), no record is
made at all: the handler writes the line it would have made of one
(``proxy.logs.direct_handler``). Anything else on the record's way (a filter, another
handler, a record factory, pytest's log capture) and the record is made and handled
as above.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import threading
import time

from aiohttp.abc import AbstractAccessLogger
from aiohttp.web import BaseRequest, StreamResponse

from proxy.access.control import IDENTITY_KEY
from proxy.api.middlewares import ROUTE_KEY, UPSTREAM_KEY, outcome, sent_bytes
from proxy.logs import direct_handler

log = logging.getLogger("proxy.access")
INFO = logging.INFO
MESSAGE = "%s %s %s"
FIELDS = ("remote", "route", "status", "cache", "upstream", "identity", "bytes", "duration_ms")


class AccessLogger(AbstractAccessLogger):
    @property
    def enabled(self) -> bool:
        """Whether lines are wanted at all (asked once per connection by aiohttp)."""
        return self.logger.isEnabledFor(INFO)

    def log(self, request: BaseRequest, response: StreamResponse, time: float) -> None:
        logger = self.logger
        if not logger.isEnabledFor(INFO):
            return
        identity = request.get(IDENTITY_KEY)
        status = response.status
        args = (request.method, request.path_qs[:512], status)
        # FIELDS: none of them is a LogRecord attribute (what makeRecord would check).
        fields: dict[str, object] = {
            "remote": request.remote,
            "route": request.get(ROUTE_KEY, "other"),
            "status": status,
            "cache": outcome(request, response).value,
            "upstream": request.get(UPSTREAM_KEY, "-"),
            "identity": identity.label if identity is not None else "-",
            "bytes": sent_bytes(request, response),
            "duration_ms": round(time * 1000, 3),
        }
        handler = direct_handler(logger)
        if handler is not None and handler.emit_fields(logger.name, INFO, MESSAGE % args, fields):
            return
        record = make_record(logger.name, args)
        record.__dict__.update(fields)
        logger.handle(record)


_LINE = AccessLogger.log.__code__.co_firstlineno


def make_record(name: str, args: tuple[object, ...]) -> logging.LogRecord:
    """An INFO record of ``MESSAGE % args`` from ``AccessLogger.log``, as
    ``LogRecord(...)`` would make it (see the module docstring)."""
    factory = logging.getLogRecordFactory()
    if factory is not logging.LogRecord:
        return factory(name, INFO, __file__, _LINE, MESSAGE, args, None, "log")
    template, created, relative = _template(name, os.getpid(), threading.get_ident())
    record = logging.LogRecord.__new__(logging.LogRecord)
    fields = record.__dict__
    fields.update(template)
    now = time.time()
    fields["args"] = args
    fields["created"] = now
    fields["msecs"] = int((now - int(now)) * 1000) + 0.0
    fields["relativeCreated"] = relative + (now - created) * 1000
    if "taskName" in fields:  # Python 3.12+: the running task's name, if any
        task = asyncio.current_task() if logging.logAsyncioTasks else None  # type: ignore[attr-defined,unused-ignore]
        fields["taskName"] = task.get_name() if task is not None else None
    return record


@functools.lru_cache(maxsize=64)
def _template(name: str, pid: int, thread: int) -> tuple[dict[str, object], float, float]:
    """What a record made now by this thread of this process holds (read only), and
    its ``created`` and ``relativeCreated``."""
    made = logging.LogRecord(name, INFO, __file__, _LINE, MESSAGE, (), None, "log")
    return dict(made.__dict__), made.created, made.relativeCreated
