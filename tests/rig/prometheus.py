"""Debian's ``prometheus`` as a child process on a free loopback port, and its query API.

The server scrapes the given targets' ``/metrics`` every second into a TSDB in a temp dir.
Tests that serve the scraped application in their own event loop must not block that
loop while Prometheus scrapes it, so readiness and queries go through aiohttp.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import aiohttp
import yaml

from .process import START_TIMEOUT, ChildProcess, NotReady, free_port

PROMETHEUS_BINARY = "/usr/bin/prometheus"
PROMTOOL_BINARY = "/usr/bin/promtool"
JOB = "registry-proxy"
SCRAPE_INTERVAL = "1s"


class Prometheus(ChildProcess):
    """``prometheus`` scraping ``targets`` (``host:port``) as job :data:`JOB`.

    :meth:`start` returns once the process runs; :meth:`wait_ready` then waits, without
    blocking the loop, for it to serve."""

    name = "prometheus"

    def __init__(
        self,
        workdir: Path,
        targets: Sequence[str],
        *,
        binary: str = PROMETHEUS_BINARY,
        scrape_interval: str = SCRAPE_INTERVAL,
    ) -> None:
        super().__init__(workdir)
        self.binary = binary
        self.port = free_port()
        self.config_path = workdir / "prometheus.yml"
        self.storage = workdir / "data"
        self.storage.mkdir(parents=True, exist_ok=True)
        config = {
            "global": {
                "scrape_interval": scrape_interval,
                "scrape_timeout": scrape_interval,
                "evaluation_interval": scrape_interval,
            },
            "scrape_configs": [
                {
                    "job_name": JOB,
                    "metrics_path": "/metrics",
                    "static_configs": [{"targets": list(targets)}],
                }
            ],
        }
        self.config_path.write_text(yaml.safe_dump(config, sort_keys=False))

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def argv(self) -> list[str]:
        return [
            self.binary,
            f"--config.file={self.config_path}",
            f"--storage.tsdb.path={self.storage}",
            f"--web.listen-address=127.0.0.1:{self.port}",
            "--storage.tsdb.retention.time=1h",
            "--log.level=warn",
        ]

    def start(self, timeout: float | None = None) -> None:
        """Start the process; :meth:`wait_ready` then waits for it to serve."""
        self.spawn()

    async def wait_ready(
        self, session: aiohttp.ClientSession, within: float = START_TIMEOUT
    ) -> None:
        """Poll ``/-/ready`` without blocking the loop (which may serve the scraped
        targets); stop the process and fail with its log after ``within`` seconds."""
        deadline = asyncio.get_running_loop().time() + within
        while not await self._ready(session):
            if asyncio.get_running_loop().time() > deadline:
                self.stop()
                raise NotReady(
                    f"prometheus not ready on {self.url} after {within}s\n{self._log_section()}"
                )
            await asyncio.sleep(0.05)

    async def _ready(self, session: aiohttp.ClientSession) -> bool:
        if not self.running:
            raise NotReady(
                f"prometheus exited with {self.process and self.process.returncode}"
                f"\n{self._log_section()}"
            )
        try:
            async with session.get(
                self.url + "/-/ready", timeout=aiohttp.ClientTimeout(total=1)
            ) as response:
                return response.status == 200
        except (aiohttp.ClientError, TimeoutError):
            return False

    async def query(self, session: aiohttp.ClientSession, expr: str) -> dict[str, Any]:
        """``/api/v1/query`` at the current time; the decoded body whatever the status
        (a parse error is HTTP 400 with ``{"status": "error", "error": ...}``)."""
        async with session.get(self.url + "/api/v1/query", params={"query": expr}) as response:
            body: dict[str, Any] = await response.json(content_type=None)
            return body

    async def latest_scrape(self, session: aiohttp.ClientSession) -> tuple[float, float] | None:
        """(time, ``up``) of the newest scrape of :data:`JOB`, or None before the first.

        An instant query answers with the evaluation time, so the scrape time comes from
        ``timestamp()``, the value of the sample."""
        scraped = await self.scalar(session, f'timestamp(up{{job="{JOB}"}})')
        up = await self.scalar(session, f'up{{job="{JOB}"}}')
        return None if scraped is None or up is None else (scraped, up)

    async def scalar(self, session: aiohttp.ClientSession, expr: str) -> float | None:
        """The value of the first series ``expr`` returns, or None when it returns none."""
        body = await self.query(session, expr)
        result = body.get("data", {}).get("result", []) if body.get("status") == "success" else []
        return float(result[0]["value"][1]) if result else None
