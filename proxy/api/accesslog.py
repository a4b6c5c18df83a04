"""One access-log line per request: what was asked, the cache outcome, upstream, who asked
(a local user's name, else anonymous or passthrough), bytes, time.

The line is a ``logging`` record like any other (so levels, handlers and formatters
apply), made directly rather than through ``Logger.info``: that looks for its caller's
frame on every call, which is a noticeable part of a cached response's cost. The record
names this module's ``log`` as where it was made, as ``Logger.info`` would have.
"""

from __future__ import annotations

import logging

from aiohttp.abc import AbstractAccessLogger
from aiohttp.web import BaseRequest, StreamResponse

from proxy.access.control import IDENTITY_KEY
from proxy.api.middlewares import ROUTE_KEY, UPSTREAM_KEY, outcome

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
        record = logging.getLogRecordFactory()(
            logger.name,
            INFO,
            __file__,
            _LINE,
            MESSAGE,
            (request.method, request.path_qs[:512], status),
            None,
            "log",
        )
        # FIELDS: none of them is a LogRecord attribute (what makeRecord would check).
        record.__dict__.update(
            {
                "remote": request.remote,
                "route": request.get(ROUTE_KEY, "other"),
                "status": status,
                "cache": outcome(request, response).value,
                "upstream": request.get(UPSTREAM_KEY, "-"),
                "identity": identity.label if identity is not None else "-",
                "bytes": response.body_length,
                "duration_ms": round(time * 1000, 3),
            }
        )
        logger.handle(record)


_LINE = AccessLogger.log.__code__.co_firstlineno
