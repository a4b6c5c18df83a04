"""``workers: N`` (N > 1): a supervisor and N worker processes on one port and one cache.

Each worker is the ordinary server (``proxy.app.run``), started as ``python -m proxy
serve <the same arguments>`` with ``--worker-index``: a fresh interpreter, so that
``PROMETHEUS_MULTIPROC_DIR`` is in place before ``prometheus_client`` is first imported.
Every worker binds the listen address (and ``metrics_listen``) with ``SO_REUSEPORT``; the
kernel spreads connections over them. What they share is the cache directory: single
flight through the temp files (``proxy.storage.claims``), maintenance by one worker at a
time (``proxy.storage.maintenance``), tags and links in the SQLite files (or Redis), and
metrics through prometheus_client's multiprocess files.

The supervisor (this module, ``supervise``) does what must happen once per node:

* Start-up checks: the addresses are bound once without ``SO_REUSEPORT`` (so an address
  in use, by anything, is the usual one-line start-up error and exit 1, rather than a
  silent share with another proxy's workers), the directory lock is taken shared (an
  operator command holding it is a start-up error too) and kept, and the temp files a
  previous run left are removed, before any worker runs: a worker never removes them,
  since another worker's live fetch may be among them.
* A fresh metrics directory for the workers, removed at exit.
* Signals: SIGTERM and SIGINT are forwarded to every worker as SIGTERM; each drains as a
  single process does (unready, ``shutdown_grace``, verified fetches commit), and the
  supervisor exits once all have.
* A worker that dies is restarted (its metrics files of live gauges are dropped). One
  that fails before it is listening is a start-up failure: at the first start the
  supervisor stops the others and exits 1; later, after ``MAX_START_FAILURES`` in a row.

``workers: 1`` runs no supervisor: ``serve`` is the single process it always was.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from proxy.settings import Settings

log = logging.getLogger("proxy.workers")

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
MAX_START_FAILURES = 5
"""Restarted workers in a row that fail before listening, before the supervisor gives up."""
RESTART_BACKOFF = (0.5, 1.0, 2.0, 4.0, 8.0)
STABLE_AFTER = 30.0
"""A worker that ran this long resets the failure count."""
EXIT_START_ERROR = 1


@dataclass(frozen=True)
class WorkerRole:
    """What a worker process knows of its place: its index (1..count) and the pipe it
    tells the supervisor on that it is listening."""

    index: int
    count: int
    ready_fd: int | None = None

    def announce_ready(self) -> None:
        if self.ready_fd is not None:
            with contextlib.suppress(OSError):
                os.write(self.ready_fd, b"r")
                os.close(self.ready_fd)


class StartFailed(Exception):
    """Workers could not be started (each told why on stderr)."""


@dataclass
class Worker:
    index: int
    process: asyncio.subprocess.Process | None = None
    started_at: float = 0.0
    ready: asyncio.Future[bool] | None = None
    ready_task: asyncio.Task[None] | None = None
    failures: int = 0
    pids: list[int] = field(default_factory=list)


class Supervisor:
    def __init__(self, settings: Settings, argv: Sequence[str], metrics_dir: Path) -> None:
        self._settings = settings
        self._argv = list(argv)
        self._metrics_dir = metrics_dir
        self._workers = [Worker(i + 1) for i in range(settings.workers)]
        self._stopping = asyncio.Event()
        self._failed = False

    async def _spawn(self, worker: Worker) -> None:
        loop = asyncio.get_running_loop()
        read_fd, write_fd = os.pipe()
        env = {**os.environ, MULTIPROC_ENV: str(self._metrics_dir)}
        argv = [
            *self._argv,
            "--worker-index",
            str(worker.index),
            "--worker-ready-fd",
            str(write_fd),
        ]
        try:
            process = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "proxy", *argv, pass_fds=(write_fd,), env=env
            )
        finally:
            os.close(write_fd)
        ready: asyncio.Future[bool] = loop.create_future()
        reader = asyncio.StreamReader()
        transport, _ = await loop.connect_read_pipe(
            lambda: asyncio.StreamReaderProtocol(reader), os.fdopen(read_fd, "rb", buffering=0)
        )

        async def wait_ready() -> None:
            try:
                ready.set_result(await reader.read(1) == b"r")
            finally:
                transport.close()

        worker.ready_task = asyncio.create_task(wait_ready())
        worker.process, worker.ready, worker.started_at = process, ready, time.monotonic()
        worker.pids.append(process.pid)
        log.info("worker %d started", worker.index, extra={"pid": process.pid})

    async def start(self) -> None:
        """Start every worker and wait until each listens; ``StartFailed`` otherwise."""
        for worker in self._workers:
            await self._spawn(worker)
        for worker in self._workers:
            assert worker.ready is not None and worker.process is not None
            if not await worker.ready:
                await worker.process.wait()
                raise StartFailed(f"worker {worker.index} exited with {worker.process.returncode}")

    def stop(self) -> None:
        """Forward the stop to every worker (SIGTERM: each drains)."""
        if self._stopping.is_set():
            return
        self._stopping.set()
        for worker in self._workers:
            if worker.process is not None and worker.process.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    worker.process.send_signal(signal.SIGTERM)

    async def wait_all(self) -> None:
        for worker in self._workers:
            if worker.process is not None:
                await worker.process.wait()

    async def _watch(self, worker: Worker) -> None:
        """Restart ``worker`` whenever it dies, until stopping (or too many failures)."""
        while True:
            assert worker.process is not None and worker.ready is not None
            code = await worker.process.wait()
            was_ready = worker.ready.done() and worker.ready.result()
            _mark_dead(worker.process.pid, self._metrics_dir)
            if self._stopping.is_set():
                return
            ran = time.monotonic() - worker.started_at
            if ran >= STABLE_AFTER:
                worker.failures = 0
            if not was_ready or ran < STABLE_AFTER:
                worker.failures += 1
            log.warning(
                "worker %d exited with %s after %.1fs: restarting",
                worker.index,
                code,
                ran,
                extra={"pid": worker.process.pid},
            )
            if worker.failures >= MAX_START_FAILURES:
                log.error("worker %d keeps failing: stopping", worker.index)
                self._failed = True
                self.stop()
                return
            if worker.failures:
                delay = RESTART_BACKOFF[min(worker.failures, len(RESTART_BACKOFF)) - 1]
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stopping.wait(), delay)
                if self._stopping.is_set():
                    return
            await self._spawn(worker)

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self.stop)
        try:
            await self.start()
        except StartFailed as exc:
            log.debug("%s", exc)
            self.stop()
            await self.wait_all()
            return EXIT_START_ERROR
        log.info("%d workers listening", len(self._workers))
        watchers = [asyncio.create_task(self._watch(w)) for w in self._workers]
        await self._stopping.wait()
        await self.wait_all()
        for task in watchers:
            task.cancel()
        log.info("all workers stopped")
        return EXIT_START_ERROR if self._failed else 0


def _mark_dead(pid: int, metrics_dir: Path) -> None:
    """Drop a dead worker's live-gauge files (its counters stay: they are summed)."""
    from prometheus_client import multiprocess

    with contextlib.suppress(OSError):
        multiprocess.mark_process_dead(pid, str(metrics_dir))  # type: ignore[no-untyped-call]


async def _probe(settings: Settings) -> None:
    """Bind each address once without SO_REUSEPORT: raises the OSError of one in use."""
    loop = asyncio.get_running_loop()
    addresses = [settings.listen]
    if settings.metrics_listen is not None:
        addresses.append(settings.metrics_listen)
    for host, port in addresses:
        server = await loop.create_server(asyncio.Protocol, host, port)
        server.close()
        await server.wait_closed()


async def _supervise(settings: Settings, argv: Sequence[str]) -> int:
    from proxy.pullthrough.registry import DirectoryBusy
    from proxy.storage.disk import DiskBlobStore
    from proxy.storage.lock import DirectoryLock

    await _probe(settings)
    lock = DirectoryLock(settings.cache_dir)
    if not await asyncio.to_thread(lock.acquire, exclusive=False):
        raise DirectoryBusy(settings.cache_dir, exclusive=False)
    metrics_dir = Path(tempfile.mkdtemp(prefix="registry-proxy-metrics-"))
    try:
        # Before any worker: leftovers of a previous run are nobody's now.
        await asyncio.to_thread(DiskBlobStore(settings.cache_dir).prepare)
        return await Supervisor(settings, argv, metrics_dir).run()
    finally:
        shutil.rmtree(metrics_dir, ignore_errors=True)
        lock.release()


def supervise(settings: Settings, argv: Sequence[str]) -> int:
    """Run ``settings.workers`` workers for ``serve`` with ``argv``; the exit status.
    Raises the OSError of a start-up check (the caller reports it in one line)."""
    return asyncio.run(_supervise(settings, argv))
