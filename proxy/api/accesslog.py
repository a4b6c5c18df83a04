"""One access-log line per request: what was asked, the cache outcome, upstream, who asked
(a local user's name, else anonymous or passthrough), bytes, time."""

from __future__ import annotations

import logging

from aiohttp.abc import AbstractAccessLogger
from aiohttp.web import BaseRequest, StreamResponse

from proxy.access.control import IDENTITY_KEY
from proxy.api.middlewares import ROUTE_KEY, UPSTREAM_KEY, outcome

log = logging.getLogger("proxy.access")


class AccessLogger(AbstractAccessLogger):
    def log(self, request: BaseRequest, response: StreamResponse, time: float) -> None:
        identity = request.get(IDENTITY_KEY)
        self.logger.info(
            "%s %s %s",
            request.method,
            request.path_qs[:512],
            response.status,
            extra={
                "remote": request.remote,
                "route": request.get(ROUTE_KEY, "other"),
                "status": response.status,
                "cache": outcome(request, response).value,
                "upstream": request.get(UPSTREAM_KEY, "-"),
                "identity": identity.label if identity is not None else "-",
                "bytes": response.body_length,
                "duration_ms": round(time * 1000, 3),
            },
        )
