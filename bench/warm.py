"""``python -m bench.warm``: the per-request cost of the warm paths, A/B between trees.

One upstream (docker-registry) with one image (a ``--blob-mib`` layer), and one
``registry-proxy serve`` (embedded defaults, access log at info, as ``python -m bench``
runs it) per source tree given with ``--tree LABEL=DIR`` (default: this checkout), each
with its own cache, filled before the load. Then ``--rounds`` rounds of ``wrk -t2 -c16``
on each path (manifest by digest, by tag, HEAD by digest, the blob), the trees in an
order that rotates from one run to the next, so drift on the machine hits all alike.
HEAD goes through ``ab -k -i`` (16 connections), as wrk cannot read HEAD answers.

For each run: req/s (MiB/s for the blob) and the proxy's CPU seconds across it
(utime + stime from /proc), per 10,000 requests (per GiB for the blob). CPU per request
is the figure to compare: it moves far less than req/s when other work shares the
cores. The load average before and after is printed with the table.

``--profile`` also records py-spy (``bench.profile``) on each tree under each path and
prints the top frames by self and inclusive share.

A tree is a directory holding the ``proxy`` package (a checkout, or ``git archive main
proxy | tar -x -C DIR``); its proxy runs as ``python -m proxy`` with ``PYTHONPATH=DIR``
in this interpreter's environment.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

from bench import clients, profile
from bench.images import Image, Pusher, mib
from bench.procstats import cpu_seconds
from bench.servers import REGISTRY_LOG_LEVEL, START_TIMEOUT, Proxy
from tests.rig import oci
from tests.rig.process import ChildProcess, run_command
from tests.rig.registry import Registry

ACCEPT = {"Accept": oci.OCI_MANIFEST}
HERE = Path(__file__).resolve().parent.parent
AB_BINARY = "/usr/bin/ab"
PATHS = ("manifest-digest", "manifest-tag", "manifest-head", "blob")


class TreeProxy(Proxy):
    """``python -m proxy serve`` from one source tree."""

    def __init__(self, workdir: Path, *, upstream: str, tree: Path) -> None:
        super().__init__(workdir, upstream=upstream)
        self.env["PYTHONPATH"] = str(tree)

    def argv(self) -> list[str]:
        return [sys.executable, "-m", "proxy", *super().argv()[1:]]


@dataclass
class Figures:
    rate: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)


async def fill(url: str, image: Image) -> None:
    async with aiohttp.ClientSession() as http:
        for path in (
            f"manifests/{image.manifest_digest}",
            f"manifests/{image.tag}",
            *(f"blobs/{b.digest}" for b in image.blobs),
        ):
            async with http.get(f"{url}/v2/{image.repo}/{path}", headers=ACCEPT) as r:
                assert r.status == 200, (url, path, r.status)
                await r.read()


async def ab_head(url: str, seconds: float) -> clients.WrkResult:
    """HEAD under load with ``ab -k -i`` (wrk waits for a body after a HEAD's
    Content-Length and never completes one); latency percentiles are not read."""
    argv = [AB_BINARY, "-q", "-k", "-i", "-c", "16", "-t", str(max(1, round(seconds)))]
    argv += ["-n", "100000000", "-H", f"Accept: {ACCEPT['Accept']}", url]
    result = await run_command(argv, time_limit=seconds + clients.WRK_GRACE)
    if result.returncode != 0:
        raise clients.ClientError(f"{result.command} exited {result.returncode}:\n{result.stderr}")
    values: dict[str, float] = {}
    for m in re.finditer(r"^([A-Za-z -]+):\s+(\d+(?:\.\d+)?)(?: |$)", result.stdout, re.M):
        values[m.group(1)] = float(m.group(2))
    errors = int(values.get("Failed requests", 0)) + int(values.get("Non-2xx responses", 0))
    return clients.WrkResult(
        requests=int(values["Complete requests"]),
        bytes=0,
        seconds=values["Time taken for tests"],
        errors=errors,
        p50_ms=0.0,
        p99_ms=0.0,
    )


async def one_run(url: str, method: str, seconds: float) -> clients.WrkResult:
    if method == "HEAD":
        return await ab_head(url, seconds)
    return await clients.wrk(url, connections=16, seconds=seconds, headers=ACCEPT)


async def measure(args: argparse.Namespace, workdir: Path) -> None:
    trees: list[tuple[str, Path]] = args.trees
    upstream = Registry(workdir / "upstream", log_level=REGISTRY_LOG_LEVEL)
    proxies = {
        label: TreeProxy(workdir / f"proxy-{label}", upstream=upstream.url, tree=tree)
        for label, tree in trees
    }
    started: list[ChildProcess] = []
    try:
        for server in (upstream, *proxies.values()):
            server.start(START_TIMEOUT)
            started.append(server)
        async with aiohttp.ClientSession() as http:
            image = await Pusher(http, upstream.url).push_image(
                "bench/warm", "v1", [mib(args.blob_mib)]
            )
        for proxy in proxies.values():
            await fill(proxy.url, image)
        base = f"/v2/{image.repo}"
        targets = {
            "manifest-digest": ("GET", f"{base}/manifests/{image.manifest_digest}"),
            "manifest-tag": ("GET", f"{base}/manifests/{image.tag}"),
            "manifest-head": ("HEAD", f"{base}/manifests/{image.manifest_digest}"),
            "blob": ("GET", f"{base}/blobs/{image.layers[0].digest}"),
        }
        paths = [p for p in PATHS if p in args.only.split(",")]
        load_before = os.getloadavg()
        figures: dict[tuple[str, str], Figures] = {}
        labels = list(proxies)
        turn = 0
        for _ in range(args.rounds):
            for path in paths:
                method, target = targets[path]
                order = labels[turn % len(labels) :] + labels[: turn % len(labels)]
                turn += 1
                for label in order:
                    proxy = proxies[label]
                    assert proxy.pid is not None
                    seconds = args.blob_seconds if path == "blob" else args.seconds
                    cpu0 = cpu_seconds(proxy.pid)
                    run = await one_run(proxy.url + target, method, seconds)
                    cpu = cpu_seconds(proxy.pid) - cpu0
                    assert run.errors == 0, (label, path, str(run))
                    entry = figures.setdefault((path, label), Figures())
                    if path == "blob":
                        entry.rate.append(run.mib_per_s)
                        entry.cpu.append(cpu / max(1, run.bytes) * (1 << 30))
                    else:
                        entry.rate.append(run.rps)
                        entry.cpu.append(cpu / max(1, run.requests) * 10_000)
        load_after = os.getloadavg()
        print(
            f"load average before {load_before[0]:.2f} {load_before[1]:.2f}, "
            f"after {load_after[0]:.2f} {load_after[1]:.2f}; {os.cpu_count()} cores; "
            f"{args.rounds} rounds, medians (min-max)"
        )
        print(f"{'path':<16} {'tree':<12} {'rate':>26} {'proxy CPU':>34}")
        for path in paths:
            unit, per = ("MiB/s", "s/GiB") if path == "blob" else ("req/s", "s/10k req")
            for label in labels:
                f = figures[(path, label)]
                shown = f"{statistics.median(f.rate):,.0f} ({min(f.rate):,.0f}-{max(f.rate):,.0f})"
                used = f"{statistics.median(f.cpu):.3f} ({min(f.cpu):.3f}-{max(f.cpu):.3f}) {per}"
                print(f"{path:<16} {label:<12} {shown + ' ' + unit:>26} {used:>34}")
        if args.profile:
            for path in paths:
                method, target = targets[path]
                for label, proxy in proxies.items():
                    assert proxy.pid is not None
                    out = workdir / f"profile-{path}-{label}.txt"
                    prof = await profile.record(
                        f"{path} {label}",
                        proxy.pid,
                        out,
                        one_run(proxy.url + target, method, args.seconds),
                    )
                    if prof is None:
                        print("py-spy is not installed: no profiles")
                        return
                    print(f"\n== {prof.label}: {prof.busy} busy samples of {prof.samples}")
                    print("-- self")
                    for name, share in prof.top(prof.self_time, args.top):
                        print(f"{share:5.1f}%  {name}")
                    print("-- inclusive")
                    for name, share in prof.top(prof.inclusive, args.top):
                        print(f"{share:5.1f}%  {name}")
                    if args.keep:
                        print(f"(stacks: {out})")
    finally:
        for server in reversed(started):
            server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.warm", description=__doc__)
    parser.add_argument(
        "--tree",
        action="append",
        metavar="LABEL=DIR",
        help="a source tree to measure (repeatable; default: this checkout)",
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=3.0, help="per manifest run")
    parser.add_argument("--blob-seconds", type=float, default=3.0, help="per blob run")
    parser.add_argument("--blob-mib", type=float, default=64.0)
    parser.add_argument("--only", default=",".join(PATHS), help=f"of {','.join(PATHS)}")
    parser.add_argument("--profile", action="store_true", help="py-spy each tree and path")
    parser.add_argument("--top", type=int, default=15, help="profile frames to print")
    parser.add_argument("--keep", action="store_true", help="keep the scratch directory")
    args = parser.parse_args()
    args.trees = []
    for item in args.tree or [f"this={HERE}"]:
        label, _, directory = item.partition("=")
        if not (Path(directory) / "proxy" / "__main__.py").exists():
            parser.error(f"--tree {item}: no proxy package in {directory}")
        args.trees.append((label, Path(directory).resolve()))
    if args.keep:
        workdir = Path(tempfile.mkdtemp(prefix="bench-warm-"))
        print(f"scratch directory: {workdir}")
        asyncio.run(measure(args, workdir))
        return
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="bench-warm-") as scratch:
        asyncio.run(measure(args, Path(scratch)))
    print(f"({time.monotonic() - started:.0f} s)")


if __name__ == "__main__":
    main()
