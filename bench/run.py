"""Benchmark entry point: ``python -m bench [--quick]`` from the repository root.

Starts a real upstream (docker-registry, access log on), the peer (docker-registry in
proxy mode), this proxy twice (embedded defaults; and with Redis), pushes fresh random
images into the upstream, runs every scenario against direct / peer / proxy /
proxy+redis interleaved (the order rotates from one scenario or repetition to the next),
and prints one table with ratios; a full run also writes bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import logging
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Iterator
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import aiohttp

from bench import clients, micro, profile
from bench.images import Image, Pusher, mib
from bench.procstats import Monitor
from bench.report import TARGETS, Row, markdown_table, simple_table
from bench.servers import Proxy, Redis, Registry, Server, binary_version, free_port

MiB = 1 << 20
BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
ACCEPT = {"Accept": clients.OCI_MANIFEST}
log = logging.getLogger("bench")


@dataclass(frozen=True)
class Config:
    layers: int = 3
    layer_mib: float = 64
    big_mib: float = 1024
    concurrent: int = 16
    cold_repeats: int = 3
    warm_repeats: int = 3
    conc_repeats: int = 3
    wrk_seconds: float = 3
    blob_wrk_seconds: float = 5
    wrk_rounds: int = 3
    connections: int = 16
    micro_lookups: int = 20_000
    profile: bool = True
    profile_seconds: float = 5

    @classmethod
    def quick(cls) -> Config:
        return cls(
            layer_mib=4,
            big_mib=64,
            cold_repeats=1,
            warm_repeats=1,
            conc_repeats=1,
            wrk_seconds=1,
            blob_wrk_seconds=1,
            wrk_rounds=1,
            micro_lookups=2_000,
            profile_seconds=2,
        )


@dataclass
class Target:
    name: str
    server: Server
    process: str  # name of the monitored process that does the serving

    @property
    def host(self) -> str:
        return self.server.host

    @property
    def url(self) -> str:
        return self.server.url


@dataclass
class Results:
    """Raw measurements, by scenario then target."""

    values: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    details: dict[str, dict[str, str]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def add(self, key: str, target: str, value: float) -> None:
        self.values.setdefault(key, {}).setdefault(target, []).append(value)

    def detail(self, key: str, target: str, text: str) -> None:
        self.details.setdefault(key, {})[target] = text

    def median(self, key: str) -> dict[str, float | None]:
        per = self.values.get(key, {})
        return {t: statistics.median(per[t]) if per.get(t) else None for t in TARGETS}


def rotated(targets: list[Target], k: int) -> list[Target]:
    k %= len(targets)
    return targets[k:] + targets[:k]


class Bench:
    def __init__(self, config: Config, workdir: Path) -> None:
        self.config = config
        self.workdir = workdir
        self.redis = Redis("redis", workdir / "redis")
        self.upstream = Registry("upstream", workdir / "upstream")
        self.peer = Registry("peer", workdir / "peer", proxy_of=self.upstream.url)
        self.proxy = Proxy("proxy", workdir / "proxy", upstream=self.upstream.url)
        self.proxy_redis = Proxy(
            "proxy+redis",
            workdir / "proxy-redis",
            upstream=self.upstream.url,
            redis_url=self.redis.url,
        )
        self.servers: list[Server] = [
            self.redis,
            self.upstream,
            self.peer,
            self.proxy,
            self.proxy_redis,
        ]
        self.targets = [
            Target("direct", self.upstream, "upstream"),
            Target("peer", self.peer, "peer"),
            Target("proxy", self.proxy, "proxy"),
            Target("proxy+redis", self.proxy_redis, "proxy+redis"),
        ]
        self.monitor = Monitor()
        self.results = Results()
        self.skopeo = clients.Skopeo(workdir / "skopeo")
        self.access = self.upstream.access_log
        self.run_id = uuid.uuid4().hex[:8]
        self.micro: list[micro.MicroResult] = []
        self.profiles: list[profile.Profile] = []
        self.started = time.monotonic()
        self.proxy_env: list[str] = []
        self.env_info: list[tuple[str, str]] = []
        self.proxy_tree = ""

    # ------------------------------------------------------------------ lifecycle

    @contextlib.contextmanager
    def running(self) -> Iterator[None]:
        try:
            for server in self.servers:
                server.start()
                self.monitor.add(server.name, server.pid)
            self.monitor.start()
            yield
        finally:
            for server in reversed(self.servers):
                server.stop()

    def say(self, text: str) -> None:
        print(f"[{time.monotonic() - self.started:6.1f}s] {text}", file=sys.stderr, flush=True)

    # ------------------------------------------------------------------ images

    async def push_images(self, only: frozenset[str]) -> None:
        """Fresh images for the scenarios in ``only`` (names carry this run's id)."""
        c = self.config
        layer = mib(c.layer_mib)
        timeout = aiohttp.ClientTimeout(total=None, sock_read=300)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            pusher = Pusher(session, self.upstream.url)
            base = f"bench/{self.run_id}"
            started = time.perf_counter()
            pushed: list[Image] = []

            async def push(name: str, sizes: list[int]) -> Image:
                image = await pusher.push_image(f"{base}/{name}", "v1", sizes)
                pushed.append(image)
                return image

            n_pull = c.cold_repeats if "cold" in only else 1
            self.pull_images = [await push(f"pull{i}", [layer] * c.layers) for i in range(n_pull)]
            n_conc = c.conc_repeats if "concurrent" in only else 0
            self.conc_images = [await push(f"conc{i}", [layer] * c.layers) for i in range(n_conc)]
            if "single" in only:
                self.small_image = await push("one-small", [layer])
                self.big_image = await push("one-big", [mib(c.big_mib)])
            if "profile" in only and c.profile:
                self.profile_image = await push("profile", [mib(c.big_mib / 2)])
            total = sum(i.size for i in pushed)
            self.say(
                f"pushed {total / MiB:.0f} MiB of fresh images in "
                f"{time.perf_counter() - started:.1f}s"
            )

    # ------------------------------------------------------------------ helpers

    def flush(self) -> None:
        """Write dirty pages back before a cold scenario (outside its timing): the proxy
        fsyncs what it caches, and an fsync queued behind gigabytes of someone else's
        writeback (the upstream's pushes, the peer's fills) measures the disk, not us."""
        os.sync()

    def settle(self, target: Target, digests: list[str]) -> None:
        """Let background fills finish before the upstream's log is read: the peer stores a
        blob in a goroutine of its own after the client got it."""
        if target.name == "peer":
            deadline = time.monotonic() + 120
            while not all(self.peer.has_blob(d) for d in digests):
                if time.monotonic() > deadline:
                    self.results.notes.append(f"peer did not store {digests} within 120 s")
                    break
                time.sleep(0.05)
        self.access.wait_quiet(quiet=0.4)

    async def cold_pull(self) -> None:
        for rep, image in enumerate(self.pull_images):
            for target in rotated(self.targets, rep):
                self.flush()
                offset = self.access.offset()
                with self.monitor.phase(f"cold pull {rep}", target.process):
                    try:
                        wall = await self.skopeo.pull(target.host, image.reference)
                    except clients.ClientError as exc:
                        self.results.notes.append(
                            f"cold pull {rep}, {target.name} failed: {clients.last_line(str(exc))}"
                        )
                        self.results.add("cold_failed", target.name, 1)
                        continue
                    finally:
                        self.settle(target, [b.digest for b in image.blobs])
                window = self.access.since(offset)
                gets = window.blob_gets()
                self.results.add("cold_wall", target.name, wall)
                self.results.add("cold_requests", target.name, window.requests)
                self.results.add("cold_bytes", target.name, window.bytes / image.size)
                per_blob = [gets.get(b.digest, 0) for b in image.blobs]
                self.results.add("cold_blob_gets_max", target.name, max(per_blob))
                self.results.add("cold_blob_gets_min", target.name, min(per_blob))
                self.results.detail("cold", target.name, window.methods())
                self.say(f"cold pull {rep} {target.name}: {wall:.2f}s, {window.methods()}")

    async def warm_pull(self, *, warm_up: bool) -> None:
        if warm_up:
            for target in self.targets:
                await self.skopeo.pull(target.host, self.pull_images[0].reference)
            self.access.wait_quiet(quiet=0.4)
        for rep in range(self.config.warm_repeats):
            image = self.pull_images[0]
            for target in rotated(self.targets, rep + 1):
                offset = self.access.offset()
                try:
                    wall = await self.skopeo.pull(target.host, image.reference)
                except clients.ClientError as exc:
                    self.results.notes.append(
                        f"warm pull {rep}, {target.name} failed: {clients.last_line(str(exc))}"
                    )
                    self.results.add("warm_failed", target.name, 1)
                    continue
                self.access.wait_quiet(quiet=0.2)
                window = self.access.since(offset)
                self.results.add("warm_wall", target.name, wall)
                self.results.add("warm_requests", target.name, window.requests)
                self.results.detail("warm", target.name, window.methods() or "none")
                self.say(f"warm pull {rep} {target.name}: {wall:.2f}s, {window.requests} upstream")

    async def concurrent_pull(self) -> None:
        n = self.config.concurrent
        for rep, image in enumerate(self.conc_images):
            await self._concurrent_pull(rep, image, n)

    async def _concurrent_pull(self, rep: int, image: Image, n: int) -> None:
        for target in rotated(self.targets, rep + 2):
            self.flush()
            offset = self.access.offset()
            with self.monitor.phase(f"concurrent {rep}", target.process) as phase:
                wall, errors = await self.skopeo.pull_many(target.host, image.reference, n)
                self.settle(target, [b.digest for b in image.blobs])
            window = self.access.since(offset)
            self.results.add("conc_wall", target.name, wall)
            self.results.add("conc_failed", target.name, len(errors))
            for error in sorted(set(errors)):
                self.results.notes.append(
                    f"{n} concurrent cold pulls, {target.name}: {errors.count(error)} of {n} "
                    f"skopeo pulls failed: {error}"
                )
            self.results.add("conc_bytes", target.name, window.bytes / image.size)
            self.results.add("conc_requests", target.name, window.requests)
            self.results.add("conc_rss", target.name, phase.peak_rss / MiB)
            self.results.detail("conc", target.name, window.methods())
            self.say(
                f"{n}x cold pull {rep} {target.name}: {wall:.2f}s, peak RSS "
                f"{phase.peak_rss / MiB:.0f} MiB, upstream "
                f"{window.bytes / image.size:.2f}x image size"
            )

    async def wrk_scenario(
        self,
        key: str,
        path_for: str,
        headers: dict[str, str] | None = None,
        *,
        seconds: float | None = None,
    ) -> None:
        c = self.config
        for target in self.targets:
            # warm: one request exactly like the load's (the proxy caches a tag per Accept
            # class, so a narrower Accept than the pulls' is its own first request)
            offset = self.access.offset()
            await clients.curl_get(f"{target.url}{path_for}", headers=headers)
            self.access.wait_quiet(quiet=0.2)
            self.results.detail(f"{key} warm-up", target.name, self.access.since(offset).methods())
        for rnd in range(c.wrk_rounds):
            for target in rotated(self.targets, rnd + 3):
                offset = self.access.offset()
                result = await clients.wrk(
                    f"{target.url}{path_for}",
                    connections=c.connections,
                    seconds=seconds or c.wrk_seconds,
                    headers=headers,
                )
                self.access.wait_quiet(quiet=0.2)
                window = self.access.since(offset)
                if result.errors:
                    self.results.notes.append(
                        f"{key} {target.name}: {result.errors} wrk errors / non-2xx"
                    )
                self.results.add(f"{key}_rps", target.name, result.rps)
                self.results.add(f"{key}_mibs", target.name, result.mib_per_s)
                self.results.add(f"{key}_p50", target.name, result.p50_ms)
                self.results.add(f"{key}_p99", target.name, result.p99_ms)
                self.results.add(f"{key}_upstream", target.name, window.requests)
                self.say(
                    f"{key} {target.name}: {result.rps:.0f} req/s, {result.mib_per_s:.0f} MiB/s,"
                    f" p50 {result.p50_ms:.2f} ms, p99 {result.p99_ms:.2f} ms,"
                    f" {window.requests} upstream"
                )

    async def single_blob(self, key: str, image: Image) -> None:
        """One cold then one warm GET of a single-layer image's layer, per target."""
        layer = image.layers[0]
        path = f"/v2/{image.repo}/blobs/{layer.digest}"
        for state in ("cold", "warm"):
            for target in rotated(self.targets, 1 if state == "cold" else 2):
                if state == "cold":
                    self.flush()
                offset = self.access.offset()
                with self.monitor.phase(f"{key} {state}", target.process) as phase:
                    wall = await clients.curl_get(target.url + path, expect_size=layer.size)
                    if state == "cold":
                        self.settle(target, [layer.digest])
                    else:
                        self.access.wait_quiet(quiet=0.2)
                window = self.access.since(offset)
                self.results.add(f"{key}_{state}_wall", target.name, wall)
                self.results.add(f"{key}_{state}_mibs", target.name, layer.size / MiB / wall)
                self.results.add(f"{key}_{state}_rss", target.name, phase.peak_rss / MiB)
                self.results.add(f"{key}_{state}_cpu", target.name, phase.cpu)
                self.results.add(f"{key}_{state}_upbytes", target.name, window.bytes / layer.size)
                self.say(
                    f"{key} {state} GET {target.name}: {wall:.2f}s, peak RSS "
                    f"{phase.peak_rss / MiB:.0f} MiB, cpu {phase.cpu:.2f}s, upstream "
                    f"{window.bytes / layer.size:.2f}x"
                )

    async def run_micro(self) -> None:
        logging.getLogger("proxy").setLevel(logging.CRITICAL)
        url = self.redis.url.rsplit("/", 1)[0] + "/1"
        self.micro = await micro.run(url, free_port(), self.config.micro_lookups)
        for m in self.micro:
            self.say(f"micro {m.name}: {m.mean_us:.1f} µs mean")

    async def run_profiles(self) -> None:
        """py-spy on the proxy (embedded defaults) under the wrk loads on the manifest and
        blob endpoints, and during one cold GET of a fresh blob. Runs after the
        measurements: profiling slows the process down."""
        c = self.config
        image = self.pull_images[0]
        out = self.workdir / "profiles"
        out.mkdir(exist_ok=True)
        base = f"{self.proxy.url}/v2/{image.repo}"
        for ref in (image.manifest_digest, image.tag):  # warm, if no scenario did
            await clients.curl_get(f"{base}/manifests/{ref}", headers=ACCEPT)
        await clients.curl_get(f"{base}/blobs/{image.layers[0].digest}")
        loads: list[tuple[str, Awaitable[object]]] = [
            (
                "manifest-by-digest",
                clients.wrk(
                    f"{self.proxy.url}/v2/{image.repo}/manifests/{image.manifest_digest}",
                    connections=c.connections,
                    seconds=c.profile_seconds,
                    headers=ACCEPT,
                ),
            ),
            (
                "manifest-by-tag",
                clients.wrk(
                    f"{self.proxy.url}/v2/{image.repo}/manifests/{image.tag}",
                    connections=c.connections,
                    seconds=c.profile_seconds,
                    headers=ACCEPT,
                ),
            ),
        ]
        warm_blob = image.layers[0]
        loads.append(
            (
                "warm-blob-get",
                clients.wrk(
                    f"{self.proxy.url}/v2/{image.repo}/blobs/{warm_blob.digest}",
                    connections=c.connections,
                    seconds=c.profile_seconds,
                ),
            )
        )
        cold = self.profile_image.layers[0]
        loads.append(
            (
                "cold-blob-get",
                self._timed_get(
                    f"{self.proxy.url}/v2/{self.profile_image.repo}/blobs/{cold.digest}",
                    cold.size,
                ),
            )
        )
        for label, load in loads:
            prof = await profile.record(
                label, self.proxy.pid, out / f"{label}.txt", load, idle=label == "cold-blob-get"
            )
            if prof is not None:
                self.profiles.append(prof)
                self.say(f"profiled {label}: {prof.samples} samples; {prof.load}")

    async def _timed_get(self, url: str, size: int) -> str:
        wall = await clients.curl_get(url, expect_size=size)
        return (
            f"one cold GET of {size / MiB:.0f} MiB in {wall:.2f}s ({size / MiB / wall:.0f} MiB/s)"
        )

    async def run(self, only: frozenset[str]) -> None:
        """Every scenario, or those in ``only``; each warms what it needs itself."""
        c = self.config
        await self.push_images(only)
        image = self.pull_images[0]
        if "cold" in only:
            await self.cold_pull()
        if "warm" in only:
            await self.warm_pull(warm_up="cold" not in only)
        if "concurrent" in only:
            await self.concurrent_pull()
        if "blob" in only:
            blob = image.layers[0]
            await self.wrk_scenario(
                "blob", f"/v2/{image.repo}/blobs/{blob.digest}", seconds=c.blob_wrk_seconds
            )
        if "manifest" in only:
            await self.wrk_scenario(
                "mdigest", f"/v2/{image.repo}/manifests/{image.manifest_digest}", ACCEPT
            )
            await self.wrk_scenario("mtag", f"/v2/{image.repo}/manifests/{image.tag}", ACCEPT)
        if "single" in only:
            await self.single_blob("small", self.small_image)
            await self.single_blob("big", self.big_image)
        self.monitor.finish()
        if "micro" in only:
            await self.run_micro()
        if c.profile and "profile" in only:
            await self.run_profiles()

    # ------------------------------------------------------------------ table

    def rows(self) -> list[Row]:
        r = self.results
        c = self.config
        m = r.median
        img = f"{c.layers}x{c.layer_mib:g} MiB"
        big = f"{c.big_mib:g} MiB"
        small = f"{c.layer_mib:g} MiB"
        conn = c.connections

        def procs(attr: str) -> dict[str, float | None]:
            out: dict[str, float | None] = {}
            for t in self.targets:
                stats = self.monitor.procs[t.process]
                out[t.name] = stats.peak_rss / MiB if attr == "rss" else stats.cpu
            return out

        rss_run = procs("rss")
        cpu_run = procs("cpu")
        rows = [
            Row(
                f"cold pull {img}, skopeo: wall s",
                m("cold_wall"),
                target="<= 1.3x direct",
                check=lambda n, v: _le(v[n], v["direct"], 1.3) and not _sum(r, "cold_failed")[n],
            ),
            Row("cold pull: upstream requests", m("cold_requests"), fmt="{:.0f}"),
            Row(
                "cold pull: upstream bytes / image size",
                m("cold_bytes"),
                target="1.00x",
                check=lambda n, v: _le(v[n], 1.0, 1.01),
            ),
            Row(
                "cold pull: upstream GETs per blob (max)",
                _max(r, "cold_blob_gets_max"),
                fmt="{:.0f}",
                target="each blob once",
                check=lambda n, v: v[n] == 1 and _min(r, "cold_blob_gets_min")[n] == 1,
            ),
            Row("warm pull: wall s", m("warm_wall")),
            Row(
                "warm pull: upstream requests",
                _max(r, "warm_requests"),
                fmt="{:.0f}",
                target="0 (tag within TTL)",
                check=lambda n, v: v[n] == 0,
            ),
            Row(
                f"{c.concurrent} concurrent cold pulls: wall s",
                m("conc_wall"),
                target="<= peer, no pull failed",
                check=lambda n, v: _le(v[n], v["peer"], 1.0) and not _sum(r, "conc_failed")[n],
            ),
            Row(
                f"{c.concurrent} concurrent cold pulls: failed pulls",
                _sum(r, "conc_failed"),
                fmt="{:.0f}",
                target="0",
                check=lambda n, v: v[n] == 0,
            ),
            Row(
                f"{c.concurrent} concurrent: upstream bytes / image size",
                m("conc_bytes"),
                target="1.00x",
                check=lambda n, v: _le(v[n], 1.0, 1.01),
            ),
            Row(f"{c.concurrent} concurrent: peak RSS MiB", m("conc_rss"), fmt="{:.0f}"),
            Row(
                f"warm {small} blob GET, wrk -c{conn}: MiB/s",
                m("blob_mibs"),
                fmt="{:.0f}",
                target=">= 0.9x direct, >= peer",
                check=lambda n, v: _ge(v[n], v["direct"], 0.9) and _ge(v[n], v["peer"], 1.0),
            ),
            Row("warm blob GET: p99 ms", m("blob_p99")),
            Row(
                f"warm manifest by digest, wrk -c{conn}: req/s",
                m("mdigest_rps"),
                fmt="{:.0f}",
                target=">= 3x peer",
                check=lambda n, v: _ge(v[n], v["peer"], 3.0),
            ),
            Row("manifest by digest: p50 ms", m("mdigest_p50")),
            Row(
                "manifest by digest: p99 ms",
                m("mdigest_p99"),
                target="<= peer",
                check=lambda n, v: _le(v[n], v["peer"], 1.0),
            ),
            Row(
                f"warm manifest by tag, wrk -c{conn}: req/s",
                m("mtag_rps"),
                fmt="{:.0f}",
                target=">= 5x peer",
                check=lambda n, v: _ge(v[n], v["peer"], 5.0),
            ),
            Row("manifest by tag: p50 ms", m("mtag_p50")),
            Row("manifest by tag: p99 ms", m("mtag_p99")),
            Row(
                "manifest by tag: upstream requests",
                _sum(r, "mtag_upstream"),
                fmt="{:.0f}",
                target="0",
                check=lambda n, v: v[n] == 0,
            ),
            Row(f"{small} blob cold GET: wall s", m("small_cold_wall")),
            Row(f"{big} blob cold GET: wall s", m("big_cold_wall")),
            Row(f"{big} blob cold GET: MiB/s", m("big_cold_mibs"), fmt="{:.0f}"),
            Row(f"{big} blob cold GET: upstream bytes / blob", m("big_cold_upbytes")),
            Row(f"{big} blob warm GET: MiB/s", m("big_warm_mibs"), fmt="{:.0f}"),
            Row(f"peak RSS MiB, {small} blob cold", m("small_cold_rss"), fmt="{:.0f}"),
            Row(
                f"peak RSS MiB, {big} blob cold",
                m("big_cold_rss"),
                fmt="{:.0f}",
                target=f"<= 150, flat vs {small}",
                check=lambda n, v: _flat(v[n], m("small_cold_rss")[n]),
            ),
            Row(f"peak RSS MiB, {small} blob warm", m("small_warm_rss"), fmt="{:.0f}"),
            Row(
                f"peak RSS MiB, {big} blob warm",
                m("big_warm_rss"),
                fmt="{:.0f}",
                target=f"<= 150, flat vs {small}",
                check=lambda n, v: _flat(v[n], m("small_warm_rss")[n]),
            ),
            Row(f"CPU s serving {big} blob cold", m("big_cold_cpu")),
            Row(f"CPU s serving {big} blob warm", m("big_warm_cpu")),
            Row(
                "peak RSS MiB over the run",
                rss_run,
                fmt="{:.0f}",
                target="<= 150",
                check=lambda n, v: _le(v[n], 150.0, 1.0),
            ),
            Row("CPU s over the run", cpu_run, fmt="{:.1f}"),
        ]
        for row in rows:
            row.evaluate()
        return rows


def _le(a: float | None, b: float | None, factor: float) -> bool | None:
    if a is None or b is None:
        return None
    return a <= b * factor


def _ge(a: float | None, b: float | None, factor: float) -> bool | None:
    if a is None or b is None:
        return None
    return a >= b * factor


def _flat(big: float | None, small: float | None) -> bool | None:
    """Peak RSS within 150 MiB and no more than 16 MiB above the small blob's."""
    if big is None or small is None:
        return None
    return big <= 150 and big - small <= 16


def _agg(r: Results, key: str, fn: str) -> dict[str, float | None]:
    per = r.values.get(key, {})
    out: dict[str, float | None] = {}
    for t in TARGETS:
        vals = per.get(t)
        out[t] = (
            None
            if not vals
            else max(vals)
            if fn == "max"
            else min(vals)
            if fn == "min"
            else sum(vals)
        )
    return out


def _max(r: Results, key: str) -> dict[str, float | None]:
    return _agg(r, key, "max")


def _min(r: Results, key: str) -> dict[str, float | None]:
    return _agg(r, key, "min")


def _sum(r: Results, key: str) -> dict[str, float | None]:
    return _agg(r, key, "sum")


# ---------------------------------------------------------------------------- output


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "?"


def _mem_total() -> str:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return f"{int(line.split()[1]) / (1 << 20):.1f} GiB"
    except OSError:
        pass
    return "?"


def _git_rev() -> str:
    try:
        rev = subprocess.run(
            ["git", "-C", str(REPO_ROOT), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(REPO_ROOT), "status", "--porcelain", "--", "proxy"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "?"
    return rev + (" (proxy/ modified)" if dirty else "")


def _proxy_tree() -> str:
    """What identifies the proxy's code: the tree of proxy/ at HEAD plus local changes."""
    try:
        tree = subprocess.run(
            ["git", "-C", str(REPO_ROOT), "rev-parse", "HEAD:proxy"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        diff = subprocess.run(
            ["git", "-C", str(REPO_ROOT), "diff", "HEAD", "--", "proxy"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        return "?"
    return tree + str(hash(diff))


def environment() -> list[tuple[str, str]]:
    import redis

    import proxy

    return [
        ("date", dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")),
        ("machine", f"{platform.node()}: {platform.system()} {platform.release()}"),
        ("cpu", f"{os.cpu_count()} x {_cpu_model()}"),
        ("memory", _mem_total()),
        ("registry-proxy", f"{proxy.__version__} at {_git_rev()}"),
        ("python", platform.python_version()),
        ("aiohttp / redis-py", f"{aiohttp.__version__} / {redis.__version__}"),
        ("docker-registry", binary_version(["/usr/bin/docker-registry", "--version"])),
        ("skopeo", binary_version([clients.SKOPEO_BINARY, "--version"])),
        ("wrk", binary_version([clients.WRK_BINARY, "-v"])),
        ("redis-server", binary_version(["/usr/bin/redis-server", "--version"])),
        ("py-spy", binary_version([profile.py_spy() or "py-spy", "--version"])),
    ]


def micro_table(results: list[micro.MicroResult]) -> str:
    return simple_table(
        ["descriptor stat()", "lookups", "mean µs", "p50 µs", "p99 µs", "note"],
        [
            [
                m.name,
                str(m.lookups),
                f"{m.mean_us:.1f}",
                f"{m.p50_us:.1f}",
                f"{m.p99_us:.1f}",
                m.note,
            ]
            for m in results
        ],
    )


def targets_summary(rows: list[Row]) -> str:
    lines = []
    for row in rows:
        if not row.verdicts:
            continue
        marks = ", ".join(
            f"{n}: {'n/a' if v is None else 'met' if v else 'MISSED'}"
            for n, v in row.verdicts.items()
        )
        lines.append(f"- {row.label} ({row.target}): {marks}")
    return "\n".join(lines)


def details_section(bench: Bench) -> str:
    lines = []
    names = {"cold": "cold pull", "warm": "warm pull", "conc": "concurrent cold pulls"}
    for key, title in names.items():
        per = bench.results.details.get(key, {})
        for t in TARGETS:
            if t in per:
                lines.append(f"- {title}, {t}: {per[t] or 'none'}")
    return "\n".join(lines)


def profiles_section(bench: Bench) -> str:
    parts = []
    for prof in bench.profiles:
        parts.append(
            f"#### {prof.label}\n\nLoad while profiled: {prof.load}. {prof.samples} samples "
            f"at {profile.RATE} Hz over all threads, {prof.idle} of them idle (executor "
            f"workers waiting for work, the loop in epoll); shares below are of the "
            f"{prof.busy} busy ones. Stacks: `{prof.path.name}`.\n\nSelf (leaf frame):\n\n"
            + simple_table(
                ["frame", "% samples"],
                [[f"`{k}`", f"{p:.1f}"] for k, p in prof.top(prof.self_time)],
            )
            + "\n\nInclusive:\n\n"
            + simple_table(
                ["function", "% samples"],
                [[f"`{k}`", f"{p:.1f}"] for k, p in prof.top(prof.inclusive, 20)],
            )
        )
    return "\n\n".join(parts)


def render(bench: Bench, rows: list[Row], elapsed: float) -> str:
    c = bench.config
    env = "\n".join(f"- {k}: {v}" for k, v in bench.env_info)
    config = ", ".join(f"{k}={v}" for k, v in asdict(c).items())
    if bench.proxy_env:
        config += "; proxy environment: " + " ".join(bench.proxy_env)
    notes = "\n".join(f"- {n}" for n in bench.results.notes) or "- none"
    text = f"""# registry-proxy benchmark results

Produced by `python -m bench` ({elapsed:.0f} s). Targets: `direct` is the upstream itself
(docker-registry, the limit), `peer` is docker-registry in proxy mode, `proxy` is
`registry-proxy serve` with embedded defaults, `proxy+redis` the same with `--redis`.
Medians over repetitions; ratios are ours divided by theirs.

{env}
- config: {config}

## Results

{markdown_table(rows)}

Targets:

{targets_summary(rows)}

## Descriptor look-up cost (in-process, one at a time)

{micro_table(bench.micro)}

## Upstream requests seen in the upstream's access log

{details_section(bench)}

## Notes

{notes}
"""
    if bench.profiles:
        text += f"""
## Profiles of the proxy (py-spy, after the measurements)

`proxy` (embedded defaults) profiled with `py-spy record` while wrk loads the manifest and
warm blob endpoints, and during one cold GET of a fresh blob (with `--idle`, so threads
waiting on I/O are sampled too). Collapsed stacks are in `bench/profiles/`.

{profiles_section(bench)}
"""
    return text


SCENARIOS = ("cold", "warm", "concurrent", "blob", "manifest", "single", "micro", "profile")
HELP = {
    "layers": "layers of the pull images",
    "layer_mib": "layer size of the pull images, MiB",
    "big_mib": "size of the single-layer big image, MiB",
    "concurrent": "concurrent cold pulls",
    "cold_repeats": "cold pulls per target, each of a fresh image",
    "warm_repeats": "warm pulls per target",
    "conc_repeats": "rounds of concurrent cold pulls, each of a fresh image",
    "wrk_seconds": "duration of one wrk run on a manifest endpoint",
    "blob_wrk_seconds": "duration of one wrk run on the blob endpoint",
    "wrk_rounds": "wrk runs per target and endpoint (interleaved)",
    "connections": "wrk connections",
    "micro_lookups": "look-ups per descriptor micro-benchmark",
    "profile_seconds": "duration of each profiled wrk run",
}


def parse_args(argv: list[str] | None) -> tuple[Config, argparse.Namespace]:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    p.add_argument("--quick", action="store_true", help="smoke run: small blobs, short wrk")
    defaults = Config()
    for f in fields(Config):
        if f.name == "profile":
            continue
        default = getattr(defaults, f.name)
        p.add_argument(
            "--" + f.name.replace("_", "-"),
            type=type(default),
            metavar="N",
            help=f"{HELP.get(f.name, f.name)} (default {default}; --quick: "
            f"{getattr(Config.quick(), f.name)})",
        )
    p.add_argument("--no-profile", action="store_true", help="skip the py-spy profiles")
    p.add_argument(
        "--only",
        metavar="LIST",
        help=f"comma-separated scenarios to run, of: {','.join(SCENARIOS)} (default: all)",
    )
    p.add_argument(
        "--proxy-env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra environment for both proxy processes (experiments, e.g. MALLOC_ARENA_MAX=2)",
    )
    p.add_argument(
        "--results",
        type=Path,
        help="write the report here (default: bench/RESULTS.md for a full run, none for --quick)",
    )
    p.add_argument("--workdir", type=Path, help="scratch directory (default: a new one in /tmp)")
    p.add_argument("--keep", action="store_true", help="keep the scratch directory")
    args = p.parse_args(argv)
    config = Config.quick() if args.quick else Config()
    overrides: dict[str, object] = {
        f.name: getattr(args, f.name)
        for f in fields(Config)
        if f.name != "profile" and getattr(args, f.name) is not None
    }
    if args.no_profile:
        overrides["profile"] = False
    only = frozenset(SCENARIOS)
    if args.only:
        only = frozenset(x.strip() for x in args.only.split(",") if x.strip())
        unknown = only - set(SCENARIOS)
        if unknown:
            p.error(f"unknown scenario(s): {', '.join(sorted(unknown))}")
    args.only_set = only
    for item in args.proxy_env:
        if "=" not in item:
            p.error(f"--proxy-env expects KEY=VALUE, got {item!r}")
    return replace(config, **overrides), args  # type: ignore[arg-type]


def main(argv: list[str] | None = None) -> int:
    config, args = parse_args(argv)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="rp-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    results_path = args.results
    if results_path is None and not args.quick and not args.only:
        results_path = BENCH_DIR / "RESULTS.md"
    bench = Bench(config, workdir)
    for item in args.proxy_env:
        key, _, value = item.partition("=")
        bench.proxy.env[key] = value
        bench.proxy_redis.env[key] = value
    bench.proxy_env = list(args.proxy_env)
    # before any server starts: the servers run the code checked out now
    bench.env_info = environment()
    bench.proxy_tree = _proxy_tree()
    bench.say(f"scratch directory {workdir}")
    try:
        with bench.running():
            asyncio.run(bench.run(args.only_set))
            if bench.profiles and results_path is not None:
                dest = results_path.parent / "profiles"
                dest.mkdir(exist_ok=True)
                for prof in bench.profiles:
                    shutil.copy(prof.path, dest / prof.path.name)
                    prof.path = dest / prof.path.name
        if _proxy_tree() != bench.proxy_tree:
            bench.results.notes.append(
                f"proxy/ changed during the run (HEAD now {_git_rev()}); the servers ran the "
                "code checked out at the start"
            )
        rows = bench.rows()
        elapsed = time.monotonic() - bench.started
        text = render(bench, rows, elapsed)
        print(markdown_table(rows))
        print()
        print(micro_table(bench.micro))
        print()
        print(targets_summary(rows))
        if bench.results.notes:
            print("\nnotes:\n" + "\n".join(f"- {n}" for n in bench.results.notes))
        if results_path is not None:
            results_path.write_text(text)
            bench.say(f"wrote {results_path}")
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    return 0
