"""Reliability trials against real parts, shared by ``tests/reliability`` (few runs, in
the normal test run) and ``python -m bench reliability`` (many runs, a table).

Each trial returns a :class:`TrialResult`: how many runs, how many went otherwise than
they must (``failures``), how many delivered or committed a corrupt body (``corrupt``:
a complete-looking answer whose bytes do not hash to the digest, or a committed file whose
content is not its name; must always be 0), and a note. Nothing sleeps to synchronise:
the waits are deadlines on conditions.

- :func:`fault_trials`: a fault-injecting pass-through before docker-registry, each fault
  mode ``runs`` times, plus a lying upstream.
- :func:`sigkill_trials`: the proxy (a child) SIGKILLed mid-write at several offsets, then
  restarted on the same directory.
- :func:`tmpfs_trials`: pulls bigger than a small tmpfs the cache is on.
- :func:`fuzz_trial`: hypothesis over names, references, digests, Range, Accept, query
  strings and raw request lines, sent on raw sockets.
- :func:`slow_client_trial`: slowloris connections and stalled readers against probes.
- :func:`soak_trial`: many concurrent clients mixing warm and cold pulls.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import random
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from . import oci
from .distribution import push_blob, push_image, random_blob, raw_request
from .faults import FaultProxy, blobs
from .process import async_wait_until
from .proxy_process import ProxyProcess
from .skopeo import Skopeo

MiB = 1 << 20


@dataclass
class TrialResult:
    name: str
    runs: int = 0
    failures: int = 0
    corrupt: int = 0
    notes: list[str] = field(default_factory=list)

    def row(self) -> str:
        notes = "; ".join(self.notes)
        return f"| {self.name} | {self.runs} | {self.failures} | {self.corrupt} | {notes} |"


TABLE_HEADER = (
    "| trial | runs | failures | corrupt bodies | notes |\n| --- | --- | --- | --- | --- |"
)


def table(results: list[TrialResult]) -> str:
    return "\n".join([TABLE_HEADER, *(r.row() for r in results)])


def corrupt_commits(cache_dir: Path) -> int:
    """Committed blobs whose content does not hash to their name."""
    bad = 0
    root = cache_dir / "blobs" / "sha256"
    for path in root.rglob("*") if root.exists() else []:
        if path.is_file():
            with path.open("rb") as f:
                if hashlib.file_digest(f, "sha256").hexdigest() != path.name:
                    bad += 1
    return bad


@dataclass
class Fetched:
    status: int  # 0: no answer
    complete: bool  # the body ended cleanly at its Content-Length
    digest: str
    size: int


async def fetch_blob(url: str, repo: str, digest: str, *, time_limit: float = 60) -> Fetched:
    """GET a blob in a session of its own, hashing the body; never raises for the
    network (a cut connection is ``complete=False``)."""
    hasher = hashlib.sha256()
    size = status = 0
    try:
        async with (
            asyncio.timeout(time_limit),
            aiohttp.ClientSession() as session,
            session.get(f"{url}/v2/{repo}/blobs/{digest}") as response,
        ):
            status = response.status
            async for chunk in response.content.iter_chunked(MiB):
                hasher.update(chunk)
                size += len(chunk)
            complete = response.content_length is None or size == response.content_length
            return Fetched(status, complete, "sha256:" + hasher.hexdigest(), size)
    except (aiohttp.ClientError, TimeoutError, ConnectionError):
        return Fetched(status, False, "sha256:" + hasher.hexdigest(), size)


# --- upstream faults ------------------------------------------------------------------

Setup = Callable[[FaultProxy, int], Any]


def _cut(
    share: float = 1 / 3, *, abort: bool = False, times: int = 1, strip: bool = False
) -> Setup:
    """Cut blob bodies after ``share`` of the size, ``times`` times (resumptions too)."""

    def setup(fp: FaultProxy, size: int) -> None:
        fp.strip_range = strip
        fp.cut_blob(int(size * share), abort=abort, times=times, ranged=times > 1)

    return setup


def _fail(status: int, times: int | None = None) -> Setup:
    def setup(fp: FaultProxy, size: int) -> None:
        fp.fail(status, match=blobs("GET"), times=times, retry_after="1")

    return setup


def _reset(fp: FaultProxy, size: int) -> None:
    fp.reset = True


# mode -> (setup, whether the pull must succeed)
FAULT_MODES: dict[str, tuple[Setup, bool]] = {
    "cut once (close)": (_cut(), True),
    "cut once (abort)": (_cut(abort=True), True),
    "cut once, no Range support": (_cut(strip=True), True),
    "cut every response, each a third further": (_cut(times=1000), True),
    "cut every response at byte 0": (_cut(0, times=1000), False),
    "503 once": (_fail(503, 1), True),
    "500 storm": (_fail(500), False),
    "503 storm": (_fail(503), False),
    "429 storm": (_fail(429), False),
    "connection reset": (_reset, False),
}


async def fault_trials(
    registry_url: str,
    fault_proxy: FaultProxy,
    proxy_url: str,
    cache_dir: Path,
    runs: int,
    *,
    blob_size: int = 2 * MiB,
) -> list[TrialResult]:
    """Each mode ``runs`` times on a fresh blob: a mode that must succeed has to deliver
    the right bytes; one that cannot must end in an error status or a cut connection;
    neither may deliver a complete wrong body or commit one."""
    results = []
    async with aiohttp.ClientSession() as http:
        for mode, (setup, must_succeed) in FAULT_MODES.items():
            result = TrialResult(f"upstream fault: {mode}")
            statuses: set[str] = set()
            for run in range(runs):
                data, digest = random_blob(blob_size + run)
                repo = f"faults/r{run}"
                await push_blob(http, registry_url, repo, data)
                fault_proxy.clear_faults()
                setup(fault_proxy, len(data))
                got = await fetch_blob(proxy_url, repo, digest)
                fault_proxy.clear_faults()
                result.runs += 1
                cut = got.status == 200 and not got.complete
                statuses.add(f"{got.status or 'no answer'}{' cut' if cut else ''}")
                right = got.status == 200 and got.complete and got.digest == digest
                if got.status == 200 and got.complete and got.digest != digest:
                    result.corrupt += 1
                if right != must_succeed:
                    result.failures += 1
            result.corrupt += corrupt_commits(cache_dir)
            expected = "the right bytes" if must_succeed else "an error, never a clean 200"
            result.notes.append(f"must give {expected}; got {', '.join(sorted(statuses))}")
            results.append(result)
    return results


async def lying_upstream_trial(proxy_url: str, cache_dir: Path, runs: int) -> TrialResult:
    """An upstream whose blob bytes do not hash to the digest asked for."""
    result = TrialResult("upstream fault: wrong bytes")
    for run in range(runs):
        digest = "sha256:" + hashlib.sha256(f"blob {run} {random.random()}".encode()).hexdigest()
        got = await fetch_blob(proxy_url, "liar/repo", digest)
        result.runs += 1
        if got.status == 200 and got.complete:
            result.corrupt += 1
    result.corrupt += corrupt_commits(cache_dir)
    result.notes.append("never a clean 200, never committed")
    return result


# --- SIGKILL mid-write ------------------------------------------------------------------


async def sigkill_trials(
    workdir: Path,
    registry_url: str,
    fault_proxy: FaultProxy,
    offsets: list[int],
    runs: int,
    *,
    blob_size: int = 32 * MiB,
) -> TrialResult:
    """For each offset: pause the upstream body there, wait until the proxy's temp file
    holds it, SIGKILL the proxy, restart it on the same directory, pull again."""
    result = TrialResult("SIGKILL mid-write, restart")
    mapping = {
        "log_level": "warning",
        "cache": {"dir": str(workdir / "cache")},
        "upstreams": [{"name": "up", "url": fault_proxy.url, "default": True}],
    }
    proxy = ProxyProcess(workdir / "proxy", mapping)
    leftovers = 0
    async with aiohttp.ClientSession() as http:
        try:
            for run in range(runs):
                for offset in offsets:
                    data, digest = random_blob(blob_size + run)
                    repo = f"kill/o{offset}r{run}"
                    await push_blob(http, registry_url, repo, data)
                    proxy.start()
                    pause = fault_proxy.pause_blob(offset)
                    pulling = asyncio.create_task(fetch_blob(proxy.url, repo, digest))
                    await asyncio.wait_for(pause.reached.wait(), 30)
                    await async_wait_until(
                        lambda at=offset: _temp_bytes(proxy.cache_dir) >= at,
                        within=30,
                        what=f"{offset} bytes in the temp file",
                    )
                    proxy.kill()
                    interrupted = await pulling
                    fault_proxy.clear_faults()
                    if interrupted.status == 200 and interrupted.complete:
                        result.corrupt += interrupted.digest != digest
                    proxy.start()
                    leftovers += _temp_count(proxy.cache_dir)
                    again = await fetch_blob(proxy.url, repo, digest)
                    result.runs += 1
                    if not (again.status == 200 and again.complete and again.digest == digest):
                        result.failures += 1
                    result.corrupt += corrupt_commits(proxy.cache_dir)
        finally:
            fault_proxy.clear_faults()
            proxy.stop()
    result.failures += leftovers
    mib = ", ".join(f"{o / MiB:g}" for o in offsets)
    result.notes.append(
        f"offsets {mib} MiB of {blob_size / MiB:g} MiB; temp files left: {leftovers}"
    )
    return result


def _temp_bytes(cache_dir: Path) -> int:
    tmp = cache_dir / "tmp"
    return sum(p.stat().st_size for p in tmp.iterdir() if p.is_file()) if tmp.exists() else 0


def _temp_count(cache_dir: Path) -> int:
    tmp = cache_dir / "tmp"
    return sum(1 for p in tmp.iterdir() if p.is_file()) if tmp.exists() else 0


# --- a small disk ------------------------------------------------------------------------


async def tmpfs_trials(
    workdir: Path,
    registry_url: str,
    proxy_url: str,
    cache_dir: Path,
    skopeo: Skopeo,
    runs: int,
    *,
    layer_size: int = 40 * MiB,
) -> TrialResult:
    """Two concurrent skopeo pulls of a fresh 3-layer image bigger than the disk."""
    result = TrialResult("cache on a 64 MiB tmpfs")
    async with aiohttp.ClientSession() as http:
        for run in range(runs):
            image = await push_image(
                http,
                registry_url,
                workdir / f"image{run}",
                f"disk/r{run}",
                "v1",
                layers=3,
                layer_size=layer_size,
            )
            pulls = [workdir / f"pull{run}-{i}" for i in range(2)]
            outcomes = await asyncio.gather(
                *(skopeo.pull(_host(proxy_url), f"disk/r{run}:v1", d) for d in pulls),
                return_exceptions=True,
            )
            for dest, outcome in zip(pulls, outcomes, strict=True):
                result.runs += 1
                if isinstance(outcome, BaseException):
                    result.failures += 1
                    continue
                if oci.layout_layer_digests(dest, "pulled") != image.layer_digests:
                    result.corrupt += 1
    result.corrupt += corrupt_commits(cache_dir)
    result.notes.append(f"pulls of 3 x {layer_size / MiB:g} MiB, two at a time")
    return result


def _host(url: str) -> str:
    return url.removeprefix("http://")


# --- fuzzing -------------------------------------------------------------------------------


def raw_exchange(host: str, data: bytes, *, time_limit: float = 10.0) -> bytes:
    """Send ``data`` on a fresh socket and read until the server closes (or
    ``time_limit``). No half-close: aiohttp, like many servers, drops a connection whose
    client shut its side before the answer."""
    address, _, port = host.rpartition(":")
    with socket.create_connection((address, int(port)), timeout=time_limit) as sock:
        with contextlib.suppress(OSError):
            sock.sendall(data)
        chunks = []
        deadline = time.monotonic() + time_limit
        while time.monotonic() < deadline:
            try:
                chunk = sock.recv(65536)
            except (TimeoutError, OSError):
                break
            if not chunk:
                break
            chunks.append(chunk)
    return b"".join(chunks)


def status_of(answer: bytes) -> int | None:
    line = answer.split(b"\r\n", 1)[0].split()
    if len(line) >= 2 and line[0].startswith(b"HTTP/") and line[1].isdigit():
        return int(line[1])
    return None


def fuzz_trial(
    host: str, watched: Path, allowed: list[Path], examples: int, seed: int = 0
) -> TrialResult:
    """Hypothesis-generated requests on raw sockets. Counted as failures: an answer >= 500
    from the proxy (505 for a version it refuses aside), or a file that appeared under
    ``watched`` outside the ``allowed`` directories (the cache, logs)."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import seed as with_seed
    from hypothesis import strategies as st

    result = TrialResult("fuzzed requests (raw sockets)")
    before = set(watched.rglob("*"))
    statuses: dict[int, int] = {}
    component = st.text(
        alphabet=st.sampled_from("abcz09._-/%.:@~!$&'()*+,;=ÄäÿUPPER\x00 "), max_size=60
    )
    digest = st.one_of(
        st.just("sha256:" + "a" * 64),
        st.builds(lambda h: "sha256:" + h, st.text("0123456789abcdefABCDEF", max_size=70)),
        st.builds(
            lambda a, h: f"{a}:{h}",
            st.sampled_from(["sha512", "md5", "", "SHA256"]),
            st.text("0123456789abcdef", max_size=130),
        ),
    )
    reference = st.one_of(st.text(max_size=140), digest)
    target = st.one_of(
        st.builds(lambda n, r: f"/v2/{n}/manifests/{r}", component, reference),
        st.builds(lambda n, d: f"/v2/{n}/blobs/{d}", component, digest),
        st.builds(lambda n: f"/v2/{n}/tags/list", component),
        st.builds(lambda n, d: f"/v2/{n}/referrers/{d}", component, digest),
        st.builds(lambda p: "/" + p, component),
    )
    query = st.one_of(
        st.just(""),
        st.builds(
            lambda k, v: f"?{k}={v}",
            st.sampled_from(["ns", "n", "last", "x", "artifactType"]),
            st.text(max_size=40),
        ),
    )
    header_value = st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126), max_size=80)
    headers = st.dictionaries(
        st.sampled_from(["Range", "Accept", "If-None-Match", "Authorization", "Host"]),
        st.one_of(header_value, st.sampled_from(["bytes=0-", "bytes=-1", "bytes=5-2", "*/*"])),
        max_size=4,
    )
    method = st.sampled_from(["GET", "HEAD", "GET", "PUT", "DELETE", "OPTIONS", "BREW"])
    version = st.sampled_from(
        ["HTTP/1.1", "HTTP/1.1", "HTTP/1.0", "HTTP/2.0", "HTTP/0.9", "HTTP/9"]
    )
    formed = st.builds(
        lambda m, t, q, v, h: (
            f"{m} {t}{q} {v}\r\nHost: x\r\n"
            + "".join(f"{k}: {val}\r\n" for k, val in h.items())
            + "Connection: close\r\n\r\n"
        ).encode("utf-8", "surrogateescape"),
        method,
        target,
        query,
        version,
        headers,
    )
    # Garbage ends like a request head, so the server answers it rather than waiting.
    garbage = st.builds(lambda b: b + b"\r\n\r\n", st.binary(max_size=300))
    request = st.one_of(formed, formed, garbage)

    @with_seed(seed)
    @settings(
        max_examples=examples,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(request)
    def send(data: bytes) -> None:
        answer = raw_exchange(host, data)
        status = status_of(answer)
        result.runs += 1
        key = status or 0
        statuses[key] = statuses.get(key, 0) + 1
        if status is not None and status >= 500 and status != 505:
            result.failures += 1
            if len(result.notes) < 3:
                result.notes.append(f"{status} for {data[:80]!r}")

    send()
    outside = sorted(
        str(p)
        for p in set(watched.rglob("*")) - before
        if not any(p.is_relative_to(a) for a in allowed)
    )
    result.failures += len(outside)
    if outside:
        result.notes.append(f"files appeared: {outside[:3]}")
    unanswered = statuses.get(0, 0)
    summary = ", ".join(f"{k or 'none'}: {v}" for k, v in sorted(statuses.items()))
    result.notes.append(f"answers {summary} ({unanswered} closed without one)")
    return result


# --- slow clients ------------------------------------------------------------------------


async def probe_latencies(url: str, n: int) -> list[float]:
    out = []
    async with aiohttp.ClientSession() as session:
        for _ in range(n):
            started = time.perf_counter()
            async with session.get(f"{url}/v2/") as response:
                await response.read()
                assert response.status == 200
            out.append(time.perf_counter() - started)
    return out


def _p(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def slow_client_trial(
    proxy: ProxyProcess,
    repo: str,
    digest: str,
    *,
    slowloris: int,
    stalled: int,
    header_timeout: float,
    send_timeout: float,
) -> TrialResult:
    """``slowloris`` connections that send a partial request line and stall, and
    ``stalled`` readers of a cached blob that stop reading after the headers: all must be
    closed by the proxy's timeouts while probes are answered as fast as before."""
    result = TrialResult("slowloris and stalled readers")
    baseline = await probe_latencies(proxy.url, 50)
    address, _, port = proxy.host.rpartition(":")
    sent_before = proxy.metric(
        "registry_proxy_client_connections_closed_total", reason="send_timeout"
    )
    conns: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
    for _ in range(slowloris):
        reader, writer = await asyncio.open_connection(address, int(port))
        writer.write(b"GET /v2/library/x/manifests/la")
        conns.append((reader, writer))
    readers = []
    for _ in range(stalled):
        reader, writer = await asyncio.open_connection(address, int(port))
        writer.write(f"GET /v2/{repo}/blobs/{digest} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        await reader.readuntil(b"\r\n\r\n")
        readers.append((reader, writer))
    started = time.monotonic()
    during = await probe_latencies(proxy.url, 50)
    deadline = header_timeout + send_timeout + 15

    async def closed(reader: asyncio.StreamReader) -> bool:
        try:
            async with asyncio.timeout(max(deadline - (time.monotonic() - started), 0.1)):
                while await reader.read(65536):
                    pass
            return True
        except (TimeoutError, ConnectionError):
            return isinstance(reader.exception(), ConnectionError)

    loris_closed = await asyncio.gather(*(closed(r) for r, _ in conns))
    # The stalled readers are dropped server-side; their unread bytes drain here after.
    await async_wait_until(
        lambda: (
            proxy.metric("registry_proxy_client_connections_closed_total", reason="send_timeout")
            >= sent_before + stalled
        ),
        within=deadline,
        what="stalled readers dropped",
    )
    for _, writer in (*conns, *readers):
        writer.close()
    result.runs = slowloris + stalled
    result.failures = loris_closed.count(False)
    p50_before, p99_before = _p(baseline, 0.5), _p(baseline, 0.99)
    p50_during, p99_during = _p(during, 0.5), _p(during, 0.99)
    if p99_during > max(10 * p99_before, 0.25):
        result.failures += 1
    result.notes.append(
        f"{slowloris} partial request lines (closed at {header_timeout:g}s), {stalled} stalled "
        f"readers (dropped at {send_timeout:g}s); probe p50/p99 {p50_before * 1000:.1f}/"
        f"{p99_before * 1000:.1f} ms before, {p50_during * 1000:.1f}/{p99_during * 1000:.1f} ms "
        "during"
    )
    return result


# --- soak ----------------------------------------------------------------------------------


@dataclass
class SoakImages:
    repo: str
    manifest_digest: str
    warm_blobs: list[str]
    cold: list[tuple[str, str]]  # (repo, digest) of blobs nobody fetched yet


async def soak_trial(
    proxy: ProxyProcess,
    images: SoakImages,
    *,
    clients: int,
    seconds: float,
) -> TrialResult:
    """``clients`` concurrent clients for ``seconds``, each looping over a warm manifest
    by tag, a warm blob, and now and then a cold blob. Errors must be 0; RSS, open fds
    and asyncio tasks must come back to their baseline."""
    result = TrialResult(f"soak: {clients} clients, {seconds:g} s")
    tasks_before = proxy.metric("registry_proxy_asyncio_tasks")
    rss_before, fds_before = proxy.rss_bytes(), proxy.open_fds()
    latencies: dict[str, list[float]] = {"manifest": [], "warm blob": [], "cold blob": []}
    cold = list(images.cold)
    errors: list[str] = []
    stop_at = time.monotonic() + seconds
    connector = aiohttp.TCPConnector(limit=clients)
    accept = {"Accept": oci.OCI_MANIFEST}

    async def one(session: aiohttp.ClientSession, kind: str, path: str, **kw: Any) -> None:
        started = time.perf_counter()
        try:
            async with session.get(proxy.url + path, **kw) as response:
                body = await response.read()
                if response.status != 200:
                    errors.append(f"{kind} {response.status}")
                elif kind != "manifest" and (
                    "sha256:" + hashlib.sha256(body).hexdigest() != path.rsplit("/", 1)[1]
                ):
                    result.corrupt += 1
        except (aiohttp.ClientError, TimeoutError) as exc:
            errors.append(f"{kind} {type(exc).__name__}")
        latencies[kind].append(time.perf_counter() - started)

    async def client(session: aiohttp.ClientSession, n: int) -> None:
        rng = random.Random(n)
        while time.monotonic() < stop_at:
            roll = rng.random()
            if roll < 0.02 and cold:
                repo, digest = cold.pop()
                await one(session, "cold blob", f"/v2/{repo}/blobs/{digest}")
            elif roll < 0.5:
                blob = rng.choice(images.warm_blobs)
                await one(session, "warm blob", f"/v2/{images.repo}/blobs/{blob}")
            else:
                await one(session, "manifest", f"/v2/{images.repo}/manifests/v1", headers=accept)

    timeout = aiohttp.ClientTimeout(total=120)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        await asyncio.gather(*(client(session, n) for n in range(clients)))
    result.runs = sum(len(v) for v in latencies.values())
    result.failures = len(errors)

    # Back to baseline: the connections close, the fills end; polled with a deadline.
    def settled() -> bool:
        return (
            proxy.open_fds() <= fds_before + 8
            and proxy.metric("registry_proxy_asyncio_tasks") <= tasks_before + 4
        )

    try:
        await async_wait_until(settled, within=30, what="fds and tasks back to baseline")
    except AssertionError:
        result.failures += 1
        result.notes.append("fds or tasks did not come back")
    rss_after, fds_after = proxy.rss_bytes(), proxy.open_fds()
    tasks_after = proxy.metric("registry_proxy_asyncio_tasks")
    parts = [
        f"{kind} p50/p99 {_p(v, 0.5) * 1000:.1f}/{_p(v, 0.99) * 1000:.1f} ms (n={len(v)})"
        for kind, v in latencies.items()
        if v
    ]
    result.notes.append(", ".join(parts))
    result.notes.append(
        f"RSS {rss_before / MiB:.0f} -> {rss_after / MiB:.0f} MiB, fds {fds_before} -> "
        f"{fds_after}, tasks {tasks_before:g} -> {tasks_after:g}"
    )
    if errors:
        result.notes.append(f"errors: {sorted(set(errors))[:4]}")
    return result


async def seed_soak_images(
    http: aiohttp.ClientSession, registry_url: str, workdir: Path, proxy_url: str, cold: int
) -> SoakImages:
    """One image (3 small layers) pulled through the proxy once (warm), and ``cold`` blobs
    in the upstream that the proxy has not seen."""
    image = await push_image(
        http, registry_url, workdir, "soak/app", "v1", layers=3, layer_size=256 * 1024
    )
    for layer in image.layer_digests:
        got = await fetch_blob(proxy_url, "soak/app", layer)
        assert got.status == 200 and got.digest == layer
    ok = await raw_request(
        _host(proxy_url), "GET", "/v2/soak/app/manifests/v1", headers={"Accept": oci.OCI_MANIFEST}
    )
    assert ok.status == 200
    cold_blobs = []
    for n in range(cold):
        data, digest = random_blob(64 * 1024 + n)
        await push_blob(http, registry_url, "soak/app", data)
        cold_blobs.append(("soak/app", digest))
    return SoakImages("soak/app", image.manifest.digest, image.layer_digests, cold_blobs)
