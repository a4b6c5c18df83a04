"""The load generators beside skopeo (``tests.rig.skopeo``): ``wrk`` runs and single
``curl`` GETs, run to completion by ``tests.rig.process.run_command``."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

from tests.rig.process import run_command

WRK_BINARY = "/usr/bin/wrk"
CURL_BINARY = "/usr/bin/curl"
WRK_SCRIPT = Path(__file__).with_name("report.lua")
CURL_TIMEOUT = 600.0
# wrk gets this long beyond its own duration before it is killed.
WRK_GRACE = 60.0


class ClientError(RuntimeError):
    pass


async def _run(argv: list[str], *, limit: float) -> str:
    """stdout of ``argv``; ClientError unless it exits 0 within ``limit`` seconds."""
    result = await run_command(argv, time_limit=limit)
    if result.returncode is None:
        raise TimeoutError(f"{result.command} did not finish in {limit}s")
    if result.returncode != 0:
        raise ClientError(f"{result.command} exited {result.returncode}:\n{result.stderr}")
    return result.stdout


@dataclass(frozen=True, slots=True)
class WrkResult:
    requests: int
    bytes: int
    seconds: float
    errors: int
    p50_ms: float
    p99_ms: float

    @property
    def rps(self) -> float:
        return self.requests / self.seconds

    @property
    def mib_per_s(self) -> float:
        return self.bytes / self.seconds / (1 << 20)

    def __str__(self) -> str:
        return (
            f"wrk: {self.rps:.0f} req/s, p50 {self.p50_ms:.2f} ms, p99 {self.p99_ms:.2f} ms, "
            f"{self.errors} errors"
        )


async def wrk(
    url: str,
    *,
    connections: int,
    seconds: float,
    threads: int = 2,
    headers: dict[str, str] | None = None,
) -> WrkResult:
    argv = [
        WRK_BINARY,
        f"-t{min(threads, connections)}",
        f"-c{connections}",
        f"-d{max(1, round(seconds))}s",
        "--timeout",
        "30s",
        "-s",
        str(WRK_SCRIPT),
    ]
    for name, value in (headers or {}).items():
        argv += ["-H", f"{name}: {value}"]
    argv.append(url)
    out = await _run(argv, limit=seconds + WRK_GRACE)
    for line in out.splitlines():
        if line.startswith("WRKJSON "):
            data = json.loads(line.removeprefix("WRKJSON "))
            break
    else:
        raise ClientError(f"wrk printed no summary:\n{out}")
    errors = sum(data[k] for k in ("connect", "read", "write", "status", "timeout"))
    return WrkResult(
        requests=data["requests"],
        bytes=data["bytes"],
        seconds=data["duration_us"] / 1e6,
        errors=errors,
        p50_ms=data["p50_us"] / 1000,
        p99_ms=data["p99_us"] / 1000,
    )


async def curl_get(
    url: str, *, expect_size: int | None = None, headers: dict[str, str] | None = None
) -> float:
    """One GET to /dev/null; returns wall seconds; raises unless 200 (with ``expect_size``
    bytes, when given)."""
    argv = [CURL_BINARY, "-sS", "-o", "/dev/null", "-w", "%{http_code} %{size_download}"]
    for name, value in (headers or {}).items():
        argv += ["-H", f"{name}: {value}"]
    argv.append(url)
    started = time.perf_counter()
    out = await _run(argv, limit=CURL_TIMEOUT)
    elapsed = time.perf_counter() - started
    status, size = out.split()
    if status != "200" or (expect_size is not None and int(size) != expect_size):
        raise ClientError(f"GET {url}: {status}, {size} bytes (expected {expect_size})")
    return elapsed
