"""The servers under benchmark, each a child process on a free loopback port.

Built from the test rig (``tests.rig``): the upstream is docker-registry with its access
log on (Combined Log Format, which the bench counts); the peer is docker-registry in its
own pull-through mode (``proxy.remoteurl``) with storage of its own; Redis is
redis-server without persistence. What only the bench needs is here:

- :class:`Proxy`: this project's ``registry-proxy serve`` console script with its
  embedded defaults (only listen, upstream and cache dir given; optionally ``--redis``).
- :class:`Stack`: the five processes, started in order and stopped in reverse (by PID).
- :class:`AccessLog`: what the upstream served between two offsets of its log.
"""

from __future__ import annotations

import contextlib
import re
import shutil
import sys
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from tests.rig.process import ChildProcess, LoopbackAddress, free_port
from tests.rig.redis_server import RedisServer
from tests.rig.registry import Registry, proxy_section

# Servers get longer to start than in the tests: the bench machine is busy by design.
START_TIMEOUT = 20.0
# The upstream's and the peer's application log level: warn, so no per-request line
# besides the access log (which favours the peer; its access log stays on, as ours does).
REGISTRY_LOG_LEVEL = "warn"


def proxy_binary() -> str:
    """The ``registry-proxy`` console script of the running interpreter's environment."""
    beside = Path(sys.executable).parent / "registry-proxy"
    if beside.exists():
        return str(beside)
    found = shutil.which("registry-proxy")
    if found is None:
        raise SystemExit("registry-proxy is not installed (pip install -e . in this venv)")
    return found


class Proxy(ChildProcess, LoopbackAddress):
    """``registry-proxy serve`` with embedded defaults, optionally with Redis."""

    name = "registry-proxy"

    def __init__(self, workdir: Path, *, upstream: str, redis_url: str | None = None) -> None:
        super().__init__(workdir, log_name="proxy.log")
        self.port = free_port()
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

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(self.url + "/v2/", timeout=1) as response:
                return bool(response.status == 200)
        except (urllib.error.URLError, OSError):
            return False


class Stack:
    """redis, upstream, peer, proxy and proxy+redis, by the names the monitor uses."""

    def __init__(self, workdir: Path) -> None:
        self.redis = RedisServer(workdir / "redis")
        self.upstream = Registry(workdir / "upstream", log_level=REGISTRY_LOG_LEVEL)
        self.peer = Registry(
            workdir / "peer", log_level=REGISTRY_LOG_LEVEL, extra=proxy_section(self.upstream.url)
        )
        self.proxy = Proxy(workdir / "proxy", upstream=self.upstream.url)
        self.proxy_redis = Proxy(
            workdir / "proxy-redis", upstream=self.upstream.url, redis_url=self.redis.url
        )
        self.servers: dict[str, ChildProcess] = {
            "redis": self.redis,
            "upstream": self.upstream,
            "peer": self.peer,
            "proxy": self.proxy,
            "proxy+redis": self.proxy_redis,
        }
        for name, server in self.servers.items():
            server.name = name  # what start-up failures are reported as

    @property
    def access_log(self) -> AccessLog:
        return AccessLog(self.upstream.log_path)

    def set_proxy_env(self, key: str, value: str) -> None:
        """Extra environment for both proxy processes (before :meth:`running`)."""
        self.proxy.env[key] = value
        self.proxy_redis.env[key] = value

    @contextlib.contextmanager
    def running(self) -> Iterator[dict[str, int]]:
        """Start every server in order (yielding name -> PID); stop them in reverse."""
        try:
            pids: dict[str, int] = {}
            for name, server in self.servers.items():
                server.start(START_TIMEOUT)
                assert server.pid is not None
                pids[name] = server.pid
            yield pids
        finally:
            for server in reversed(self.servers.values()):
                server.stop()


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
    """Docker-registry's access log on disk, read from an offset. The file also holds the
    application log (level warn); only Combined Log Format lines count."""

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
