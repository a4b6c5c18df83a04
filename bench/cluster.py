"""``python -m bench.cluster``: scale-out, 3 replicas sharing Redis against 1.

One upstream (docker-registry, access log on), one ``redis-server``, and the proxy as
``registry-proxy serve`` child processes with ``cache.redis`` and the ``cluster`` section,
behind the test rig's round-robin balancer (per request; it runs in this process, for
both set-ups alike). For each set-up, fresh images (so the first round is cold):

- cold: ``--concurrent`` skopeo pulls at once, spread over ``--images`` images;
- warm: the same pulls again.

Set-ups: 1 replica; 3 replicas sharing Redis without the ``cluster`` section (what
replicas did before it: descriptors, tags and links shared, blobs not); 3 replicas as
one cache.

Reported per set-up and round: wall seconds, upstream bytes over the images' size (1.00
is one fetch of everything) and the most upstream GETs any blob got, read from the
upstream's access log. Prints a table; ``--results FILE`` also appends it (markdown).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import aiohttp

from bench.images import Image, Pusher, mib
from bench.servers import START_TIMEOUT, AccessLog
from tests.rig.cluster import Replicas, RoundRobin
from tests.rig.redis_server import RedisServer
from tests.rig.registry import Registry
from tests.rig.skopeo import Skopeo

Row = tuple[str, str, str, str]
SETUPS = (
    ("1 replica", 1, True),
    ("3 replicas, Redis only (before)", 3, False),
    ("3 replicas, cluster", 3, True),
)


@contextlib.contextmanager
def started(*servers: Registry | RedisServer) -> Iterator[None]:
    try:
        for server in servers:
            server.start(START_TIMEOUT)
        yield
    finally:
        for server in reversed(servers):
            server.stop()


async def pulls(skopeo: Skopeo, host: str, images: list[Image], n: int) -> tuple[float, int]:
    """``n`` pulls at once over ``images``: wall seconds and failed pulls."""
    started_at = time.perf_counter()
    outcomes = await asyncio.gather(
        *(skopeo.timed_pull(host, images[i % len(images)].reference) for i in range(n)),
        return_exceptions=True,
    )
    return time.perf_counter() - started_at, sum(isinstance(o, BaseException) for o in outcomes)


async def measure(args: argparse.Namespace, workdir: Path) -> list[Row]:
    upstream = Registry(workdir / "upstream", log_level="warn")
    redis = RedisServer(workdir / "redis")
    access = AccessLog(upstream.log_path)
    skopeo = Skopeo(workdir / "skopeo")
    rows: list[Row] = []
    timeout = aiohttp.ClientTimeout(total=600)
    with started(upstream, redis):
        async with aiohttp.ClientSession(timeout=timeout) as http:
            for label, count, cluster in SETUPS:
                key = f"{count}{'c' if cluster else 'r'}"
                images = [
                    await Pusher(http, upstream.url).push_image(
                        f"scale{key}/app{i}", "v1", [mib(args.layer_mib)] * args.layers
                    )
                    for i in range(args.images)
                ]
                size = sum(image.size for image in images)
                settings: dict[str, object] = {"log_level": "warning"}
                if not cluster:
                    settings["cluster"] = {}  # Redis shared, no leases nor peers
                replicas = Replicas(
                    workdir / f"replicas-{key}",
                    count,
                    upstream_url=upstream.url,
                    redis_url=redis.url,
                    settings=settings,
                )
                try:
                    replicas.start()
                    async with RoundRobin([r.url for r in replicas]) as balancer:
                        for phase in ("cold", "warm"):
                            access.wait_quiet()
                            offset = access.offset()
                            wall, failed = await pulls(
                                skopeo, balancer.host, images, args.concurrent
                            )
                            access.wait_quiet()
                            window = access.since(offset)
                            gets = window.blob_gets()
                            rows.append(
                                (
                                    f"{label}, {phase}",
                                    f"{wall:.2f}",
                                    f"{window.bytes / size:.2f}",
                                    f"{max(gets.values(), default=0)}"
                                    + (f" ({failed} failed)" if failed else ""),
                                )
                            )
                finally:
                    replicas.stop()
    return rows


def table(rows: list[Row], args: argparse.Namespace) -> str:
    lines = [
        f"{args.concurrent} concurrent skopeo pulls over {args.images} images of "
        f"{args.layers} x {args.layer_mib:g} MiB, through a round-robin balancer:",
        "",
        "| set-up | wall s | upstream bytes / images | upstream GETs per blob (max) |",
        "| --- | ---: | ---: | ---: |",
        *(f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows),
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.cluster", description=__doc__)
    parser.add_argument("--images", type=int, default=4)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--layer-mib", type=float, default=16.0)
    parser.add_argument("--concurrent", type=int, default=24)
    parser.add_argument("--results", type=Path, help="append the table to this markdown file")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="rp-bench-cluster-") as tmp:
        rows = asyncio.run(measure(args, Path(tmp)))
    text = table(rows, args)
    print(text)
    if args.results is not None:
        with args.results.open("a") as out:
            out.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
