"""The servers under benchmark, each a child process on a free loopback port.

- :class:`Registry`: Debian's ``docker-registry`` (CNCF Distribution 2.8) with filesystem
  storage. As the upstream it has its access log on (stdout, Combined Log Format) so the
  bench counts what the upstream served; with ``proxy_of`` it is the peer: Distribution's
  own pull-through mode (``proxy.remoteurl``) with storage of its own.
- :class:`Proxy`: this project's ``registry-proxy serve`` console script with its embedded
  defaults (only listen, upstream and cache dir given; optionally ``--redis``).
- :class:`Redis`: ``redis-server`` without persistence.

Every process is stopped by its PID (SIGTERM, then SIGKILL after a deadline).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

REGISTRY_BINARY = "/usr/bin/docker-registry"
REDIS_BINARY = "/usr/bin/redis-server"
START_TIMEOUT = 20.0
STOP_TIMEOUT = 10.0


def free_port() -> int:
    """A TCP port that was free on 127.0.0.1 a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def proxy_binary() -> str:
    """The ``registry-proxy`` console script of the running interpreter's environment."""
    beside = Path(sys.executable).parent / "registry-proxy"
    if beside.exists():
        return str(beside)
    found = shutil.which("registry-proxy")
    if found is None:
        raise SystemExit("registry-proxy is not installed (pip install -e . in this venv)")
    return found


def binary_version(argv: list[str]) -> str:
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    return (out.stdout or out.stderr).strip().splitlines()[0] if (out.stdout or out.stderr) else "?"


class Server:
    """A child process with a log file, a readiness probe and a PID-based stop."""

    name: str
    port: int
    workdir: Path

    def __init__(self, name: str, workdir: Path) -> None:
        self.name = name
        self.workdir = workdir
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None
        self.env: dict[str, str] = {}
        self.stdout_path = workdir / "stdout.log"
        self.stderr_path = workdir / "stderr.log"

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.host}"

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def argv(self) -> list[str]:
        raise NotImplementedError

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(self.url + "/v2/", timeout=1) as response:
                return bool(response.status == 200)
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
            return False

    def start(self) -> None:
        with self.stdout_path.open("ab") as out, self.stderr_path.open("ab") as err:
            self.process = subprocess.Popen(
                self.argv(),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                cwd=self.workdir,
                env={**os.environ, **self.env} if self.env else None,
            )
        deadline = time.monotonic() + START_TIMEOUT
        while not self.ready():
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited {self.process.returncode}:\n{self.tail()}")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"{self.name} not ready after {START_TIMEOUT}s:\n{self.tail()}")
            time.sleep(0.05)

    def stop(self) -> None:
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        os.kill(process.pid, signal.SIGTERM)
        try:
            process.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            os.kill(process.pid, signal.SIGKILL)
            process.wait(STOP_TIMEOUT)

    def tail(self, lines: int = 30) -> str:
        text = ""
        for path in (self.stdout_path, self.stderr_path):
            if path.exists():
                text += "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) + "\n"
        return text


REGISTRY_CONFIG = """\
version: 0.1
log:
  level: warn
  accesslog:
    disabled: false
storage:
  filesystem:
    rootdirectory: {root}
  delete:
    enabled: true
  maintenance:
    uploadpurging:
      enabled: false
http:
  addr: 127.0.0.1:{port}
health:
  storagedriver:
    enabled: false
"""

PROXY_SECTION = """\
proxy:
  remoteurl: {remote}
"""


class Registry(Server):
    """``docker-registry serve``: the upstream, or with ``proxy_of`` the peer.

    The access log (Combined Log Format) is the process's stdout; its application log
    (level warn, so no per-request line besides the access log) is stderr.
    """

    def __init__(self, name: str, workdir: Path, *, proxy_of: str | None = None) -> None:
        super().__init__(name, workdir)
        self.root = workdir / "storage"
        self.root.mkdir(parents=True, exist_ok=True)
        self.config_path = workdir / "config.yml"
        config = REGISTRY_CONFIG.format(root=self.root, port=self.port)
        if proxy_of is not None:
            config += PROXY_SECTION.format(remote=proxy_of)
        self.config_path.write_text(config)

    def argv(self) -> list[str]:
        return [REGISTRY_BINARY, "serve", str(self.config_path)]

    def has_blob(self, digest: str) -> bool:
        hex_ = digest.removeprefix("sha256:")
        return (self.root / "docker/registry/v2/blobs/sha256" / hex_[:2] / hex_ / "data").exists()

    @property
    def access_log(self) -> AccessLog:
        return AccessLog(self.stdout_path)


class Proxy(Server):
    """``registry-proxy serve`` with embedded defaults, optionally with Redis."""

    def __init__(
        self, name: str, workdir: Path, *, upstream: str, redis_url: str | None = None
    ) -> None:
        super().__init__(name, workdir)
        self.upstream = upstream
        self.redis_url = redis_url
        self.cache_dir = workdir / "cache"

    def argv(self) -> list[str]:
        argv = [
            proxy_binary(),
            "serve",
            "--listen",
            self.host,
            "--upstream",
            self.upstream,
            "--cache-dir",
            str(self.cache_dir),
        ]
        if self.redis_url is not None:
            argv += ["--redis", self.redis_url]
        return argv


class Redis(Server):
    def argv(self) -> list[str]:
        return [
            REDIS_BINARY,
            "--bind",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(self.workdir),
        ]

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def ready(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1) as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(16).startswith(b"+PONG")
        except OSError:
            return False


# --------------------------------------------------------------------------- access log

_COMBINED = re.compile(
    r'^\S+ \S+ \S+ \[[^\]]*\] "(?P<method>[A-Z]+) (?P<path>\S+) [^"]*" '
    r"(?P<status>\d{3}) (?P<bytes>\d+|-)"
)


@dataclass(frozen=True, slots=True)
class Hit:
    method: str
    path: str
    status: int
    bytes: int

    @property
    def kind(self) -> str:
        if self.blob_digest is not None:
            return "blob"
        return "manifest" if "/manifests/" in self.path else "other"

    @property
    def blob_digest(self) -> str | None:
        _, found, rest = self.path.partition("/blobs/")
        if not found or rest.startswith("uploads"):
            return None
        return rest.split("?")[0]


@dataclass
class Window:
    """What the upstream served between two offsets of its access log."""

    hits: list[Hit] = field(default_factory=list)

    @property
    def requests(self) -> int:
        return len(self.hits)

    @property
    def bytes(self) -> int:
        return sum(h.bytes for h in self.hits)

    def blob_gets(self) -> Counter[str]:
        return Counter(
            d for h in self.hits if h.method == "GET" and (d := h.blob_digest) is not None
        )

    def methods(self) -> str:
        counts = Counter(f"{h.method} {h.kind}" for h in self.hits)
        return ", ".join(f"{n} {k}" for k, n in sorted(counts.items()))


class AccessLog:
    """Docker-registry's access log on disk, read from an offset."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def offset(self) -> int:
        return self.path.stat().st_size if self.path.exists() else 0

    def since(self, offset: int) -> Window:
        window = Window()
        with self.path.open("rb") as f:
            f.seek(offset)
            for raw in f:
                m = _COMBINED.match(raw.decode(errors="replace"))
                if m is None:
                    continue
                size = m.group("bytes")
                window.hits.append(
                    Hit(
                        m.group("method"),
                        m.group("path"),
                        int(m.group("status")),
                        0 if size == "-" else int(size),
                    )
                )
        return window

    def wait_quiet(self, *, quiet: float = 0.5, within: float = 60.0) -> None:
        """Wait until the log has not grown for ``quiet`` seconds (background fills done)."""
        deadline = time.monotonic() + within
        last = self.offset()
        last_change = time.monotonic()
        while time.monotonic() < deadline:
            time.sleep(0.1)
            now = self.offset()
            if now != last:
                last, last_change = now, time.monotonic()
            elif time.monotonic() - last_change >= quiet:
                return
