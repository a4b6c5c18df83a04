"""The scenarios: each runs against every target in turn and records what it measured.

The order of the targets rotates from one scenario or repetition to the next, so drift on
the machine hits all alike. Upstream traffic is read from the upstream's access log
between two offsets; RSS and CPU from the monitor's phases. See bench/README.md for what
each scenario measures and why.
"""

from __future__ import annotations

import logging
import os
import resource
import sys
import time
import uuid
from collections.abc import Awaitable
from pathlib import Path

import aiohttp

from bench import clients, micro, pagecache, profile
from bench.config import Config
from bench.images import Image, Pusher, mib
from bench.procstats import Monitor, ProcessStats, tree_cpu_split
from bench.results import Results
from bench.servers import Served as Target
from bench.servers import Stack
from tests.rig import oci
from tests.rig.process import free_port
from tests.rig.skopeo import Skopeo, SkopeoError

MiB = 1 << 20
RECYCLE_SLACK = 64 * MiB
"""Freed beyond what a cold measurement writes (manifests, temp files, the client's)."""
ACCEPT = {"Accept": oci.OCI_MANIFEST}
PULL_TIMEOUT = 600.0


def rotated(targets: list[Target], k: int) -> list[Target]:
    k %= len(targets)
    return targets[k:] + targets[:k]


class Scenarios:
    """One run's scenarios over a running :class:`~bench.servers.Stack`."""

    def __init__(self, config: Config, workdir: Path, stack: Stack) -> None:
        self.config = config
        self.workdir = workdir
        self.stack = stack
        self.targets: list[Target] = []
        self.monitor = Monitor()
        self.results = Results()
        self.skopeo = Skopeo(workdir / "skopeo")
        self.access = stack.access_log
        self.run_id = uuid.uuid4().hex[:8]
        self.micro: list[micro.MicroResult] = []
        self.profiles: list[profile.Profile] = []
        self.started = time.monotonic()

    def watch(self, pids: dict[str, int]) -> None:
        """Start monitoring the servers (name -> PID) once they run; the targets are the
        servers that started."""
        self.targets = self.stack.targets()
        self.results.targets = tuple(t.name for t in self.targets)
        for name, reason in self.stack.skipped.items():
            self.results.notes.append(f"{name} skipped: {reason}")
            self.say(f"{name} SKIPPED: {reason}")
        for name, pid in pids.items():
            self.monitor.add(name, pid)
        self.monitor.start()

    def run_stats(self) -> dict[str, ProcessStats]:
        """Each target's serving process over the whole run, by target name."""
        return {t.name: self.monitor.procs[t.process] for t in self.targets}

    def say(self, text: str) -> None:
        print(f"[{time.monotonic() - self.started:6.1f}s] {text}", file=sys.stderr, flush=True)

    # ------------------------------------------------------------------ images

    async def push_images(self, only: frozenset[str]) -> None:
        """Fresh images for the scenarios in ``only`` (names carry this run's id)."""
        c = self.config
        layer = mib(c.layer_mib)
        timeout = aiohttp.ClientTimeout(total=None, sock_read=300)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            pusher = Pusher(session, self.stack.upstream.url)
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
            self.small_images: list[Image] = []
            self.big_images: list[Image] = []
            if "single" in only:
                for i in range(c.single_repeats):
                    self.small_images.append(await push(f"one-small{i}", [layer]))
                    self.big_images.append(await push(f"one-big{i}", [mib(c.big_mib)]))
            if "profile" in only and c.profile:
                self.profile_image = await push("profile", [mib(c.big_mib / 2)])
            total = sum(i.size for i in pushed)
            self.say(
                f"pushed {total / MiB:.0f} MiB of fresh images in "
                f"{time.perf_counter() - started:.1f}s"
            )

    # ------------------------------------------------------------------ helpers

    def before_cold(self, writes: int) -> None:
        """Before a cold step that writes ``writes`` bytes into new files (outside its
        timing). Dirty pages are written back: the proxy fsyncs what it caches, and an
        fsync queued behind gigabytes of someone else's writeback (the upstream's pushes,
        the peer's fills) measures the disk, not us. Then as much page cache is freed a
        moment before the step takes it (``bench.pagecache.recycle``; not with
        ``--no-recycle``)."""
        os.sync()
        if self.config.recycle:
            pagecache.recycle(self.workdir / "recycle", writes + RECYCLE_SLACK)

    def settle(self, target: Target, digests: list[str]) -> None:
        """Let background fills finish before the upstream's log is read: the peer stores a
        blob in a goroutine of its own after the client got it."""
        if target.name == "peer":
            deadline = time.monotonic() + 120
            while not all(self.stack.peer.has_blob(d) for d in digests):
                if time.monotonic() > deadline:
                    self.results.notes.append(f"peer did not store {digests} within 120 s")
                    break
                time.sleep(0.05)
        self.access.wait_quiet(quiet=0.4)

    async def _pull(self, kind: str, rep: int, target: Target, image: Image) -> float | None:
        """One timed skopeo pull of ``image`` from ``target``: wall seconds, or None when
        it failed (noted, and counted as ``<kind>_failed``)."""
        try:
            return await self.skopeo.timed_pull(
                target.server.host, image.reference, time_limit=PULL_TIMEOUT
            )
        except SkopeoError as exc:
            self.results.notes.append(f"{kind} pull {rep}, {target.name} failed: {exc.last_line}")
            self.results.add(f"{kind}_failed", target.name, 1)
            return None

    async def cold_pull(self) -> None:
        for rep, image in enumerate(self.pull_images):
            for target in rotated(self.targets, rep):
                self.before_cold(2 * image.size)  # the cache's copy and skopeo's
                offset = self.access.offset()
                # The client's CPU (skopeo, a child that has ended) and the upstream's,
                # beside the server's: on 2 cores all three share, the wall follows the sum.
                client_before = _children_cpu()
                upstream_pids = self.monitor.tree("upstream")
                upstream_before = sum(tree_cpu_split(upstream_pids))
                with self.monitor.phase(f"cold pull {rep}", target.process) as phase:
                    try:
                        wall = await self._pull("cold", rep, target, image)
                    finally:
                        client_cpu = _children_cpu() - client_before
                        upstream_cpu = sum(tree_cpu_split(upstream_pids)) - upstream_before
                        self.settle(target, [b.digest for b in image.blobs])
                if wall is None:
                    continue
                self.results.add("cold_client_cpu", target.name, client_cpu)
                self.results.add("cold_upstream_cpu", target.name, upstream_cpu)
                busy = client_cpu + upstream_cpu + (phase.cpu if target.name != "direct" else 0)
                self.results.add("cold_cores_busy", target.name, busy / wall)
                window = self.access.since(offset)
                gets = window.blob_gets()
                self.results.add("cold_wall", target.name, wall)
                self.results.add("cold_cpu", target.name, phase.cpu)
                self.results.add("cold_requests", target.name, window.requests)
                self.results.add("cold_bytes", target.name, window.bytes / image.size)
                per_blob = [gets.get(b.digest, 0) for b in image.blobs]
                self.results.add("cold_blob_gets_max", target.name, max(per_blob))
                self.results.add("cold_blob_gets_min", target.name, min(per_blob))
                self.results.detail("cold", target.name, window.methods())
                self.say(
                    f"cold pull {rep} {target.name}: {wall:.2f}s, cpu {phase.cpu:.2f}s, "
                    f"{window.methods()}"
                )

    async def warm_pull(self, *, warm_up: bool) -> None:
        if warm_up:
            for target in self.targets:
                await self.skopeo.timed_pull(
                    target.server.host, self.pull_images[0].reference, time_limit=PULL_TIMEOUT
                )
            self.access.wait_quiet(quiet=0.4)
        for rep in range(self.config.warm_repeats):
            image = self.pull_images[0]
            for target in rotated(self.targets, rep + 1):
                offset = self.access.offset()
                wall = await self._pull("warm", rep, target, image)
                if wall is None:
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
            self.before_cold((n + 1) * image.size)  # the cache's copy and each client's
            offset = self.access.offset()
            with self.monitor.phase(f"concurrent {rep}", target.process) as phase:
                wall, failures = await self.skopeo.pull_many(
                    target.server.host, image.reference, n, time_limit=PULL_TIMEOUT
                )
                errors = [failure.last_line for failure in failures]
                self.settle(target, [b.digest for b in image.blobs])
            window = self.access.since(offset)
            self.results.add("conc_wall", target.name, wall)
            self.results.add("conc_cpu", target.name, phase.cpu)
            self.results.add("conc_failed", target.name, len(errors))
            for error in sorted(set(errors)):
                self.results.notes.append(
                    f"{n} concurrent cold pulls, {target.name}: {errors.count(error)} of {n} "
                    f"skopeo pulls failed: {error}"
                )
            gets = window.blob_gets()
            per_blob = [gets.get(b.digest, 0) for b in image.blobs]
            self.results.add("conc_bytes", target.name, window.bytes / image.size)
            self.results.add("conc_requests", target.name, window.requests)
            self.results.add("conc_blob_gets_max", target.name, max(per_blob))
            self.results.add("conc_blob_gets_min", target.name, min(per_blob))
            self.results.add("conc_rss", target.name, phase.peak_rss / MiB)
            self.results.add("conc_rss_each", target.name, phase.peak_rss_each / MiB)
            self.results.detail("conc", target.name, window.methods())
            self.say(
                f"{n}x cold pull {rep} {target.name}: {wall:.2f}s, cpu {phase.cpu:.2f}s, peak RSS "
                f"{phase.peak_rss / MiB:.0f} MiB, upstream "
                f"{window.bytes / image.size:.2f}x image size, GETs per blob {per_blob}"
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
            await clients.curl_get(f"{target.server.url}{path_for}", headers=headers)
            self.access.wait_quiet(quiet=0.2)
            self.results.detail(f"{key} warm-up", target.name, self.access.since(offset).methods())
        for rnd in range(c.wrk_rounds):
            for target in rotated(self.targets, rnd + 3):
                offset = self.access.offset()
                result = await clients.wrk(
                    f"{target.server.url}{path_for}",
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

    async def single_blob(self, key: str, image: Image, rep: int = 0) -> None:
        """One cold then one warm GET of a single-layer image's layer, per target."""
        layer = image.layers[0]
        path = f"/v2/{image.repo}/blobs/{layer.digest}"
        for state in ("cold", "warm"):
            for target in rotated(self.targets, rep + (1 if state == "cold" else 2)):
                if state == "cold":
                    self.before_cold(layer.size)  # the cache's copy (curl writes nothing)
                offset = self.access.offset()
                with self.monitor.phase(f"{key} {state} {rep}", target.process) as phase:
                    wall = await clients.curl_get(target.server.url + path, expect_size=layer.size)
                    if state == "cold":
                        self.settle(target, [layer.digest])
                    else:
                        self.access.wait_quiet(quiet=0.2)
                window = self.access.since(offset)
                self.results.add(f"{key}_{state}_wall", target.name, wall)
                self.results.add(f"{key}_{state}_mibs", target.name, layer.size / MiB / wall)
                self.results.add(f"{key}_{state}_rss", target.name, phase.peak_rss / MiB)
                self.results.add(f"{key}_{state}_rss_each", target.name, phase.peak_rss_each / MiB)
                self.results.add(f"{key}_{state}_cpu", target.name, phase.cpu)
                self.results.add(f"{key}_{state}_cpu_user", target.name, phase.cpu_user)
                self.results.add(f"{key}_{state}_upbytes", target.name, window.bytes / layer.size)
                each = (
                    f" ({phase.processes} processes, largest {phase.peak_rss_each / MiB:.0f})"
                    if phase.processes > 1
                    else ""
                )
                self.say(
                    f"{key} {state} GET {target.name}: {wall:.2f}s, peak RSS "
                    f"{phase.peak_rss / MiB:.0f} MiB{each}, cpu {phase.cpu:.2f}s, upstream "
                    f"{window.bytes / layer.size:.2f}x"
                )

    async def run_micro(self) -> None:
        logging.getLogger("proxy").setLevel(logging.CRITICAL)
        url = self.stack.redis.url.rsplit("/", 1)[0] + "/1"
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
        base = f"{self.stack.proxy.url}/v2/{image.repo}"
        for ref in (image.manifest_digest, image.tag):  # warm, if no scenario did
            await clients.curl_get(f"{base}/manifests/{ref}", headers=ACCEPT)
        await clients.curl_get(f"{base}/blobs/{image.layers[0].digest}")

        def wrk(path: str, headers: dict[str, str] | None = None) -> Awaitable[object]:
            return clients.wrk(
                base + path,
                connections=c.connections,
                seconds=c.profile_seconds,
                headers=headers,
            )

        warm_blob = image.layers[0]
        cold = self.profile_image.layers[0]
        cold_url = f"{self.stack.proxy.url}/v2/{self.profile_image.repo}/blobs/{cold.digest}"
        loads: list[tuple[str, Awaitable[object]]] = [
            ("manifest-by-digest", wrk(f"/manifests/{image.manifest_digest}", ACCEPT)),
            ("manifest-by-tag", wrk(f"/manifests/{image.tag}", ACCEPT)),
            ("warm-blob-get", wrk(f"/blobs/{warm_blob.digest}")),
            ("cold-blob-get", self._timed_get(cold_url, cold.size)),
        ]
        pid = self.stack.proxy.pid
        assert pid is not None, "the proxy is not running"
        for label, load in loads:
            prof = await profile.record(
                label, pid, out / f"{label}.txt", load, idle=label == "cold-blob-get"
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
            for rep, (small, big) in enumerate(
                zip(self.small_images, self.big_images, strict=True)
            ):
                await self.single_blob("small", small, rep)
                await self.single_blob("big", big, rep)
        self.monitor.finish()
        if "micro" in only:
            await self.run_micro()
        if c.profile and "profile" in only:
            await self.run_profiles()


def _children_cpu() -> float:
    """User and system CPU seconds of this process's children that ended and were
    waited for (the clients: each pull's skopeo is awaited before this is read)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime
