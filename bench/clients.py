"""The load generators: ``skopeo copy`` pulls, ``wrk`` runs and single ``curl`` GETs."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

SKOPEO_BINARY = "/usr/bin/skopeo"
WRK_BINARY = "/usr/bin/wrk"
CURL_BINARY = "/usr/bin/curl"
WRK_SCRIPT = Path(__file__).with_name("report.lua")
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
PULL_TIMEOUT = 600.0


class ClientError(RuntimeError):
    pass


async def _run(argv: list[str], *, env: dict[str, str] | None = None, limit: float) -> str:
    process = await asyncio.create_subprocess_exec(
        *argv,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env,
    )
    try:
        async with asyncio.timeout(limit):
            stdout, stderr = await process.communicate()
    except BaseException:
        if process.returncode is None:
            process.kill()
            await process.wait()
        raise
    if process.returncode != 0:
        raise ClientError(
            f"{' '.join(argv)} exited {process.returncode}:\n{stderr.decode(errors='replace')}"
        )
    return stdout.decode(errors="replace")


class Skopeo:
    """``skopeo copy docker://HOST/REF oci:DIR`` with a hermetic environment."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        conf = workdir / "registries.conf"
        conf.write_text("unqualified-search-registries = []\n")
        (workdir / "tmp").mkdir(exist_ok=True)
        keep = {"PATH", "LANG", "LC_ALL", "TZ"}
        self.env = {k: v for k, v in os.environ.items() if k in keep}
        self.env.update(
            HOME=str(workdir),
            XDG_RUNTIME_DIR=str(workdir),
            XDG_CONFIG_HOME=str(workdir / "config"),
            TMPDIR=str(workdir / "tmp"),
            CONTAINERS_REGISTRIES_CONF=str(conf),
            REGISTRY_AUTH_FILE=str(workdir / "auth.json"),
        )
        self._n = 0

    async def pull(self, host: str, reference: str) -> float:
        """Pull into a fresh OCI layout (removed afterwards); returns wall seconds."""
        self._n += 1
        dest = self.workdir / f"pull-{self._n}"
        argv = [
            SKOPEO_BINARY,
            "--insecure-policy",
            "copy",
            "--retry-times",
            "0",
            "--src-tls-verify=false",
            f"docker://{host}/{reference}",
            f"oci:{dest}:pulled",
        ]
        started = time.perf_counter()
        try:
            await _run(argv, env=self.env, limit=PULL_TIMEOUT)
            return time.perf_counter() - started
        finally:
            shutil.rmtree(dest, ignore_errors=True)

    async def pull_many(self, host: str, reference: str, n: int) -> tuple[float, list[str]]:
        """``n`` pulls at once; returns wall seconds until the last one ended, and the
        errors of the pulls that failed (the others still count)."""
        started = time.perf_counter()
        outcomes = await asyncio.gather(
            *(self.pull(host, reference) for _ in range(n)), return_exceptions=True
        )
        wall = time.perf_counter() - started
        errors = []
        for outcome in outcomes:
            if isinstance(outcome, ClientError):
                errors.append(last_line(str(outcome)))
            elif isinstance(outcome, BaseException):
                raise outcome
        return wall, errors


def last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1][:300] if lines else ""


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
    out = await _run(argv, limit=seconds + 60)
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
    out = await _run(argv, limit=600)
    elapsed = time.perf_counter() - started
    status, size = out.split()
    if status != "200" or (expect_size is not None and int(size) != expect_size):
        raise ClientError(f"GET {url}: {status}, {size} bytes (expected {expect_size})")
    return elapsed
