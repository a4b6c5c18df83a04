"""Child processes of the rig: free ports, start with a readiness deadline, stop by PID.

Contract shared by every server the rig starts (docker-registry, redis-server, containerd,
prometheus, and bench's ``registry-proxy serve``): the process is our child, its stdout
and stderr go to one log file in its work dir (appended, so a restart keeps the earlier
output), readiness is polled with a deadline (never slept for), and it is stopped by its
own PID (SIGTERM, then SIGKILL after a timeout). A process that exits or never becomes
ready raises :class:`NotReady` with the tail of its log.

Commands that run to completion (skopeo, ctr, wrk, curl) go through :func:`run_command`,
an asyncio subprocess: the servers they talk to may be served by the caller's own loop.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self

START_TIMEOUT = 15.0
STOP_TIMEOUT = 10.0
# What a hermetic child keeps of our environment (no proxy variables, no HOME).
KEPT_ENVIRONMENT = ("PATH", "LANG", "LC_ALL", "TZ")


class NotReady(AssertionError):
    """A child process exited, or did not become ready in time; the message carries the
    tail of its log. An AssertionError, so a test fails (not errors) with it."""


def free_port() -> int:
    """A TCP port that was free on 127.0.0.1 a moment ago (for child processes only; our
    own aiohttp servers bind port 0 and read the port back)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def find_binary(path: str) -> str | None:
    """``path`` if it is executable, else the same name on PATH, else None."""
    if os.access(path, os.X_OK):
        return path
    return shutil.which(os.path.basename(path))


def binary_version(argv: Sequence[str]) -> str:
    """The first line ``argv`` (e.g. ``[binary, "--version"]``) prints, or ``?``."""
    try:
        out = subprocess.run(list(argv), capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    text = (out.stdout or out.stderr).strip()
    return text.splitlines()[0] if text else "?"


def hermetic_environment(home: Path, **extra: str) -> dict[str, str]:
    """Our PATH and locale, ``HOME`` set to ``home``, plus ``extra``; nothing else."""
    env = {k: v for k, v in os.environ.items() if k in KEPT_ENVIRONMENT}
    env["HOME"] = str(home)
    env.update(extra)
    return env


def wait_until(
    predicate: Callable[[], bool], *, within: float, what: str, interval: float = 0.02
) -> None:
    """Poll ``predicate`` until it is true; AssertionError naming ``what`` after ``within``
    seconds."""
    deadline = time.monotonic() + within
    while True:
        if predicate():
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {within}s waiting for {what}")
        time.sleep(interval)


async def async_wait_until(
    predicate: Callable[[], Any], *, within: float, what: str, interval: float = 0.02
) -> None:
    """Async :func:`wait_until`; ``predicate`` may be a plain or an async callable."""
    deadline = asyncio.get_running_loop().time() + within
    while True:
        result = predicate()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out after {within}s waiting for {what}")
        await asyncio.sleep(interval)


def stop_process(process: subprocess.Popen[bytes] | None, timeout: float = STOP_TIMEOUT) -> None:
    """SIGTERM a child we started, by PID, then SIGKILL if it lingers; reap it."""
    if process is None or process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout)


def read_tail(path: Path, lines: int = 40) -> str:
    """The last ``lines`` lines of a log file, for failure messages ("" if unreadable)."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


class LoopbackAddress:
    """``host`` and ``url`` of an HTTP server listening on 127.0.0.1:``port``."""

    port: int

    @property
    def host(self) -> str:
        """``127.0.0.1:PORT``: what goes into ``docker://HOST/repo:tag``."""
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.host}"


class ChildProcess:
    """One server binary as our child. Subclasses give :meth:`argv` and :meth:`ready`;
    ``env`` (empty: inherit ours) is added to our environment."""

    name = "process"
    start_timeout = START_TIMEOUT

    def __init__(self, workdir: Path, *, log_name: str | None = None) -> None:
        self.workdir = workdir
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.log_path = workdir / (log_name or f"{self.name}.log")
        self.process: subprocess.Popen[bytes] | None = None
        self.env: dict[str, str] = {}
        self.preexec: Callable[[], None] | None = None
        """Run in the child before it executes (resource limits)."""

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def argv(self) -> list[str]:
        raise NotImplementedError

    def ready(self) -> bool:
        """One readiness probe; called only while the process is alive."""
        raise NotImplementedError

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def spawn(self) -> None:
        """Start the process without waiting for it (see :meth:`start`)."""
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                self.argv(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.workdir,
                env={**os.environ, **self.env} if self.env else None,
                preexec_fn=self.preexec,
            )

    def start(self, timeout: float | None = None) -> None:
        """Start the process and wait until :meth:`ready`; idempotent while it runs."""
        if self.running:
            return
        self.spawn()
        within = self.start_timeout if timeout is None else timeout
        try:
            wait_until(self._alive_and_ready, within=within, what=f"{self.name} to be ready")
        except AssertionError as exc:
            self.stop()
            if isinstance(exc, NotReady):
                raise
            raise NotReady(f"{exc}\n{self._log_section()}") from None

    def _alive_and_ready(self) -> bool:
        if self.process is None or self.process.poll() is not None:
            raise NotReady(
                f"{self.name} exited with {self.process and self.process.returncode}"
                f"\n{self._log_section()}"
            )
        return self.ready()

    def _log_section(self) -> str:
        return f"--- {self.name} log ---\n{self.log_tail()}"

    def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        """SIGTERM by PID, then SIGKILL if it does not exit in ``timeout``; idempotent."""
        process, self.process = self.process, None
        stop_process(process, timeout)

    def log_tail(self, lines: int = 40) -> str:
        return read_tail(self.log_path, lines)


@dataclass(frozen=True)
class Completed:
    """How a command ended. ``returncode`` is None when it was killed at its time limit."""

    argv: tuple[str, ...]
    returncode: int | None
    stdout: str
    stderr: str

    @property
    def command(self) -> str:
        return " ".join(self.argv)


async def run_command(
    argv: Sequence[str], *, env: Mapping[str, str] | None = None, time_limit: float
) -> Completed:
    """Run ``argv`` to completion as an asyncio subprocess, output captured. At the time
    limit it is killed (by PID) and what it printed so far is returned with returncode
    None; if the caller is cancelled it is killed and reaped before the error propagates."""
    process = await asyncio.create_subprocess_exec(
        *argv,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=dict(env) if env is not None else None,
    )
    returncode: int | None
    try:
        async with asyncio.timeout(time_limit):
            stdout, stderr = await process.communicate()
        returncode = process.returncode
    except TimeoutError:
        process.kill()
        stdout, stderr = await process.communicate()
        returncode = None
    except BaseException:
        if process.returncode is None:
            process.kill()
            await process.wait()
        raise
    return Completed(
        tuple(argv), returncode, stdout.decode(errors="replace"), stderr.decode(errors="replace")
    )
