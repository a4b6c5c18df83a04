"""One access-log line per request: what was asked, the cache outcome, upstream, bytes, time."""

from __future__ import annotations

import logging

from aiohttp.abc import AbstractAccessLogger
from aiohttp.web import BaseRequest, StreamResponse

from proxy.api.middlewares import ROUTE_KEY, UPSTREAM_KEY, outcome

log = logging.getLogger("proxy.access")


class AccessLogger(AbstractAccessLogger):
    def log(self, request: BaseRequest, response: StreamResponse, time: float) -> None:
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
                "bytes": response.body_length,
                "duration_ms": round(time * 1000, 3),
            },
        )
