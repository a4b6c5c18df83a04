"""``python -m bench.requestcost``: CPU time of the proxy's own code per warm request,
without sockets, A/B between source trees.

``bench.warm`` measures req/s and CPU seconds of a real server under wrk; on a shared
2-core machine both move with whatever else runs, and a third or more of that CPU is the
kernel's (socket writes and reads, epoll), the same for any tree. This one drives the
application in process instead: the real app (``create_app``, the guarded runner, the
access logger, logging set up as ``serve`` does, its lines going to a file), and 16
connections whose transports are in-memory (a request's bytes go in through the
protocol's ``data_received``, the answer is counted as it is written). A connection sends
its next request as soon as its answer is complete, scheduled like a socket event, so the
loop serves several per turn as under wrk. What is timed is the process's CPU time
(``time.process_time``) for a batch of ``--requests`` requests; the fastest of
``--repeats`` batches and their first quartile are the figures (interference only ever
adds), the median beside them.

The upstream is a real docker-registry with one image pushed; each tree's process fills
its own cache dir through the app (a cold manifest GET) before timing. Paths: manifest by
digest, by tag, HEAD by digest. One process per tree, all started at once and driven in
turns over their stdin: a batch of one tree right after the other's, so that whatever
else the machine does hits every tree alike.

A tree is a directory holding the ``proxy`` package; its child runs with
``PYTHONPATH=DIR`` (this file is run by path, so nothing else shadows it).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent.parent
ACCEPT = "application/vnd.oci.image.manifest.v1+json"
CONNECTIONS = 16
PATHS = ("manifest-digest", "manifest-tag", "manifest-head")


# --------------------------------------------------------------------------- the child


class MemoryTransport(asyncio.Transport):
    """A connection's transport: counts the bytes of answers, each ``size`` long once
    the first is known (answers to one path differ in nothing but the Date value)."""

    def __init__(self, on_answer: Any) -> None:
        super().__init__()
        self.on_answer = on_answer
        self.size = 0
        self.received = 0
        self.first = b""
        self.closing = False

    def write(self, data: Any) -> None:
        if not self.size:
            self.first += bytes(data)
            self.received = len(self.first)
            return
        self.received += len(data)
        while self.received >= self.size:
            self.received -= self.size
            self.on_answer(self)

    def writelines(self, chunks: Any) -> None:
        for chunk in chunks:
            self.write(chunk)

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        self.closing = True

    def abort(self) -> None:
        self.closing = True

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"peername": ("127.0.0.1", 40000), "sockname": ("127.0.0.1", 5000)}.get(
            name, default
        )

    def get_write_buffer_size(self) -> int:
        return 0

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        pass

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def is_reading(self) -> bool:
        return True


class Connections:
    """``CONNECTIONS`` connections of ``server`` sending ``raw``, each its next request as
    soon as its answer is complete (scheduled, like a socket event), ``left`` in all."""

    def __init__(self, server: Any, raw: bytes) -> None:
        self.raw = raw
        self.loop = asyncio.get_running_loop()
        self.left = 0
        self.done: asyncio.Future[None] = self.loop.create_future()
        self.protocols: dict[MemoryTransport, Any] = {}
        for _ in range(CONNECTIONS):
            transport = MemoryTransport(self.answered)
            protocol = server()
            protocol.connection_made(transport)
            self.protocols[transport] = protocol

    def answered(self, transport: MemoryTransport) -> None:
        self.left -= 1
        if self.left >= CONNECTIONS:
            self.loop.call_soon(self.protocols[transport].data_received, self.raw)
        elif self.left == 0 and not self.done.done():
            self.done.set_result(None)

    async def run(self, requests: int) -> float:
        """CPU microseconds per request for ``requests`` requests."""
        self.done = self.loop.create_future()
        self.left = requests
        started = time.process_time()
        for protocol in self.protocols.values():
            protocol.data_received(self.raw)
        await self.done
        return (time.process_time() - started) / requests * 1e6

    def close(self) -> None:
        for protocol in self.protocols.values():
            protocol.connection_lost(None)


async def _first_answer(server: Any, transport: MemoryTransport, raw: bytes, method: str) -> Any:
    protocol = server()
    protocol.connection_made(transport)
    protocol.data_received(raw)
    await _answered(transport, raw, method)
    return protocol


async def _answered(transport: MemoryTransport, raw: bytes, method: str) -> None:
    """Until the transport holds a whole 200 answer (a deadline, then RuntimeError)."""
    deadline = asyncio.get_running_loop().time() + 30
    while not _complete(transport, method):
        if asyncio.get_running_loop().time() > deadline:
            raise RuntimeError(f"no answer to {raw!r}: {transport.first[:300]!r}")
        await asyncio.sleep(0.001)
    if not transport.first.startswith(b"HTTP/1.1 200 "):
        raise RuntimeError(f"{raw!r}: {transport.first[:400]!r}")


async def _child(args: argparse.Namespace) -> None:
    """Set up, fill, say ``ready`` (with each path's answer head) on stdout, then run one
    timed batch per ``PATH N`` line read from stdin (answering the microseconds per
    request) until ``quit``."""
    from proxy import __main__ as cli
    from proxy import logs
    from proxy.api.accesslog import AccessLogger
    from proxy.app import create_app, create_runner

    parsed = cli._parser().parse_args(
        ["serve", "--upstream", args.upstream, "--cache-dir", args.cache_dir]
    )
    settings = cli._settings(parsed)
    logs.configure(settings.log_level, settings.log_format)
    app = create_app(settings)
    runner = create_runner(app, settings, access_log_class=AccessLogger, handle_signals=False)
    await runner.setup()
    server = runner.server
    assert server is not None
    loads: dict[str, Connections] = {}
    answers: dict[str, str] = {}
    try:
        for path in args.paths.split(","):
            method = "HEAD" if path == "manifest-head" else "GET"
            reference = args.tag if path == "manifest-tag" else args.digest
            raw = (
                f"{method} /v2/{args.repo}/manifests/{reference} HTTP/1.1\r\n"
                f"Host: 127.0.0.1:5000\r\nAccept: {ACCEPT}\r\nUser-Agent: bench\r\n\r\n"
            ).encode()
            # A cold fill on a connection of its own; then the first answer on each
            # connection gives the size of every answer after it.
            filler = await _first_answer(server, MemoryTransport(None), raw, method)
            filler.connection_lost(None)
            connections = Connections(server, raw)
            for transport, protocol in connections.protocols.items():
                protocol.data_received(raw)
                await _answered(transport, raw, method)
                transport.size = len(transport.first)
            answer = next(iter(connections.protocols)).first
            answers[path] = answer[: answer.index(b"\r\n\r\n") + 4].decode()
            loads[path] = connections
        _say({"ready": answers})
        while (line := sys.stdin.readline().split()) and line[0] != "quit":
            _say(await loads[line[0]].run(int(line[1])))
        for connections in loads.values():
            connections.close()
        await asyncio.sleep(0)
    finally:
        await runner.cleanup()


def _say(value: object) -> None:
    sys.stdout.write(json.dumps(value) + "\n")
    sys.stdout.flush()


def _complete(transport: MemoryTransport, method: str) -> bool:
    head, found, body = transport.first.partition(b"\r\n\r\n")
    if not found:
        return False
    if method == "HEAD":
        return True
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            return len(body) >= int(line.split(b":", 1)[1])
    return False


# --------------------------------------------------------------------------- the parent


class Child:
    """One tree's child process, driven over its stdin and stdout."""

    def __init__(self, tree: Path, child_args: list[str], profile: Path | None) -> None:
        argv = [sys.executable, str(Path(__file__).resolve()), "--child", *child_args]
        if profile is not None:
            spy = Path(sys.executable).parent / "py-spy"
            argv = [str(spy), "record", "--rate", "1000", "--format", "raw", "--output"]
            argv += [str(profile), "--", sys.executable, str(Path(__file__).resolve())]
            argv += ["--child", *child_args]
        self.process = subprocess.Popen(
            argv,
            env={**os.environ, "PYTHONPATH": str(tree)},
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            cwd="/",
        )

    def read(self) -> Any:
        assert self.process.stdout is not None
        while line := self.process.stdout.readline():
            if line.startswith(("{", "[", "0", "1", "2", "3", "4", "5", "6", "7", "8", "9")):
                return json.loads(line)
        raise SystemExit(f"child {self.process.args!r} ended: {self.process.wait()}")

    def ask(self, command: str) -> Any:
        assert self.process.stdin is not None
        self.process.stdin.write(command + "\n")
        self.process.stdin.flush()
        return self.read()

    def stop(self) -> None:
        if self.process.poll() is None:
            assert self.process.stdin is not None
            self.process.stdin.write("quit\n")
            self.process.stdin.close()
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


async def _push(workdir: Path) -> tuple[Any, Any]:
    sys.path.insert(0, str(HERE))
    import aiohttp

    from bench.images import Pusher, mib
    from bench.servers import REGISTRY_LOG_LEVEL
    from tests.rig.registry import Registry

    upstream = Registry(workdir / "upstream", log_level=REGISTRY_LOG_LEVEL)
    upstream.start(20.0)
    async with aiohttp.ClientSession() as http:
        image = await Pusher(http, upstream.url).push_image("bench/cost", "v1", [mib(1)])
    return upstream, image


def _parent(args: argparse.Namespace, workdir: Path) -> None:
    trees: list[tuple[str, Path]] = []
    for item in args.tree or [f"this={HERE}"]:
        label, _, directory = item.partition("=")
        if not (Path(directory) / "proxy" / "__main__.py").exists():
            raise SystemExit(f"--tree {item}: no proxy package in {directory}")
        trees.append((label, Path(directory).resolve()))
    upstream, image = asyncio.run(_push(workdir))
    paths = args.only.split(",")
    figures: dict[tuple[str, str], list[float]] = {}
    answers: dict[tuple[str, str], str] = {}
    children: dict[str, Child] = {}
    try:
        for label, tree in trees:
            children[label] = Child(
                tree,
                [
                    *("--upstream", upstream.url, "--cache-dir", str(workdir / f"cache-{label}")),
                    *("--log", str(workdir / f"proxy-{label}.log"), "--repo", image.repo),
                    *("--digest", image.manifest_digest, "--tag", image.tag, "--paths", args.only),
                ],
                args.profile / f"{label}.txt" if args.profile else None,
            )
        for label, child in children.items():
            for path, text in child.read()["ready"].items():
                answers[(path, label)] = text
        load_before = os.getloadavg()
        labels = list(children)
        for turn in range(args.repeats):
            for path in paths:
                # Each batch of one tree right after the other's, in turns: whatever
                # else the machine does hits every tree alike.
                order = labels[turn % len(labels) :] + labels[: turn % len(labels)]
                for label in order:
                    figure = children[label].ask(f"{path} {args.requests}")
                    figures.setdefault((path, label), []).append(figure)
        load_after = os.getloadavg()
    finally:
        for child in children.values():
            child.stop()
        upstream.stop()
    print(
        f"load average before {load_before[0]:.2f}, after {load_after[0]:.2f}; "
        f"{os.cpu_count()} cores; {args.repeats} batches per tree and path, in turns, of "
        f"{args.requests} requests over {CONNECTIONS} connections"
    )
    print(
        f"{'path':<16} {'tree':<10} {'CPU us/request: best':>22} {'p25':>7} {'median':>7}"
        f"  {'best vs first':>13} {'p25 vs first':>12}"
    )
    for path in args.only.split(","):
        first = figures[(path, trees[0][0])]
        first_best, first_p25 = min(first), _quartile(first)
        for label, _ in trees:
            runs = figures[(path, label)]
            best, p25 = min(runs), _quartile(runs)
            print(
                f"{path:<16} {label:<10} {best:>22.1f} {p25:>7.1f} {statistics.median(runs):>7.1f}"
                f"  {best / first_best:>12.2f}x {p25 / first_p25:>11.2f}x"
            )
    if args.show_answers:
        for (path, label), text in answers.items():
            print(f"--- {path} {label}\n{text}")


def _quartile(values: list[float]) -> float:
    return statistics.quantiles(values, n=4)[0] if len(values) > 1 else values[0]


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.requestcost", description=__doc__)
    parser.add_argument("--tree", action="append", metavar="LABEL=DIR")
    parser.add_argument("--repeats", type=int, default=15, help="timed batches per tree and path")
    parser.add_argument("--requests", type=int, default=2000, help="per timed batch")
    parser.add_argument("--only", default=",".join(PATHS), help=f"of {','.join(PATHS)}")
    parser.add_argument("--show-answers", action="store_true", help="print each answer's head")
    parser.add_argument(
        "--profile", type=Path, metavar="DIR", help="py-spy each child: DIR/<tree>.txt"
    )
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    for name in ("upstream", "cache-dir", "log", "repo", "digest", "tag", "paths"):
        parser.add_argument(f"--{name}", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        # Logging goes where serve's would (stderr), here a file.
        with open(args.log, "a") as log:
            os.dup2(log.fileno(), 2)
        asyncio.run(_child(args))
        return
    with tempfile.TemporaryDirectory(prefix="bench-cost-") as scratch:
        _parent(args, Path(scratch))


if __name__ == "__main__":
    main()
