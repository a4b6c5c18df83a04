"""The servers under benchmark, each a child process on a free loopback port.

Built from the test rig (``tests.rig``): the upstream is docker-registry with its access
log on (Combined Log Format, which the bench counts); the peer is docker-registry in its
own pull-through mode (``proxy.remoteurl``) with storage of its own; Redis is
redis-server without persistence. What only the bench needs is here:

- :class:`Proxy`: this project's ``registry-proxy serve`` console script with its
  embedded defaults (only listen, upstream and cache dir given; optionally ``--redis``;
  optionally a YAML file for settings that have no flag, such as ``workers``; optionally
  the console script of another checkout, the baseline).
- :class:`~bench.nginx.Nginx`: the second peer, nginx caching as rpardini's mirror does.
- :class:`Stack`: the processes, started in order and stopped in reverse (by PID). The
  optional ones (nginx, ``proxy-wN``, ``proxy@base``) are left out, with the reason in
  :attr:`Stack.skipped`, when they cannot start: nginx not installed, or a proxy that
  refuses its configuration (``workers`` before the key exists).
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

import yaml

from bench.nginx import Nginx
from tests.rig.process import ChildProcess, LoopbackAddress, NotReady, free_port
from tests.rig.redis_server import RedisServer
from tests.rig.registry import Registry, proxy_section

# Servers get longer to start than in the tests: the bench machine is busy by design
# (a deadline, not a wait: a server that is up sooner is used sooner).
START_TIMEOUT = 60.0
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


def baseline_binary(checkout: Path) -> Path:
    """``registry-proxy`` of another checkout's virtual environment (``--baseline``)."""
    return checkout / ".venv" / "bin" / "registry-proxy"


class Proxy(ChildProcess, LoopbackAddress):
    """``registry-proxy serve`` with embedded defaults, optionally with Redis.

    ``settings`` (top-level YAML keys, e.g. ``{"workers": 2}``) go into a config file
    given with ``--config``; the flags still set listen, upstream and cache dir.
    ``binary`` is another checkout's console script (default: this environment's)."""

    name = "registry-proxy"

    def __init__(
        self,
        workdir: Path,
        *,
        upstream: str,
        redis_url: str | None = None,
        settings: dict[str, object] | None = None,
        binary: str | None = None,
    ) -> None:
        super().__init__(workdir, log_name="proxy.log")
        self.port = free_port()
        self.upstream = upstream
        self.redis_url = redis_url
        self.cache_dir = workdir / "cache"
        self.binary = binary
        self.config_path: Path | None = None
        if settings:
            self.config_path = workdir / "config.yml"
            self.config_path.write_text(yaml.safe_dump(settings, sort_keys=False))

    def argv(self) -> list[str]:
        argv = [
            self.binary or proxy_binary(),
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
        if self.config_path is not None:
            argv += ["--config", str(self.config_path)]
        return argv

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(self.url + "/v2/", timeout=1) as response:
                return bool(response.status == 200)
        except (urllib.error.URLError, OSError):
            return False

    def refusal(self) -> str | None:
        """The configuration error it exited with, if that is why it did not start."""
        for line in reversed(self.log_tail(20).splitlines()):
            if "configuration error" in line:
                return line.strip()
        return None


@dataclass(frozen=True)
class Served:
    """A target of the scenarios: its name, what it listens on, and the monitored process
    (tree) that does the serving."""

    name: str
    server: LoopbackAddress
    process: str


class Stack:
    """redis, upstream, peer, nginx, proxy, proxy+redis and the optional proxies, by the
    names the monitor uses. ``nginx_workers`` is nginx's ``worker_processes`` (``auto``;
    ``None``: no nginx); ``workers`` adds ``proxy-w<N>`` (``workers: N`` in its config
    file); ``baseline`` (a checkout with its own ``.venv``) adds ``proxy@base``."""

    def __init__(
        self,
        workdir: Path,
        *,
        nginx_workers: str | None = "auto",
        workers: int | None = None,
        baseline: Path | None = None,
    ) -> None:
        self.redis = RedisServer(workdir / "redis")
        self.upstream = Registry(workdir / "upstream", log_level=REGISTRY_LOG_LEVEL)
        self.peer = Registry(
            workdir / "peer", log_level=REGISTRY_LOG_LEVEL, extra=proxy_section(self.upstream.url)
        )
        self.proxy = Proxy(workdir / "proxy", upstream=self.upstream.url)
        self.proxy_redis = Proxy(
            workdir / "proxy-redis", upstream=self.upstream.url, redis_url=self.redis.url
        )
        self.nginx: Nginx | None = None
        self.servers: dict[str, ChildProcess] = {
            "redis": self.redis,
            "upstream": self.upstream,
            "peer": self.peer,
        }
        self.optional: set[str] = set()
        self.skipped: dict[str, str] = {}
        """Optional servers that did not start, with the reason."""
        if nginx_workers is not None:
            self.nginx = Nginx(
                workdir / "nginx", upstream=self.upstream.host, workers=nginx_workers
            )
            self._add("nginx", self.nginx, optional=True)
        self._add("proxy", self.proxy)
        self._add("proxy+redis", self.proxy_redis)
        self.proxies: list[Proxy] = [self.proxy, self.proxy_redis]
        self.workers_name: str | None = None
        if workers is not None:
            self.workers_name = f"proxy-w{workers}"
            pool = Proxy(
                workdir / self.workers_name,
                upstream=self.upstream.url,
                settings={"workers": workers},
            )
            self._add(self.workers_name, pool, optional=True)
            self.proxies.append(pool)
        self.baseline = baseline
        if baseline is not None:
            base = Proxy(
                workdir / "proxy-base",
                upstream=self.upstream.url,
                binary=str(baseline_binary(baseline)),
            )
            self._add("proxy@base", base, optional=True)
            self.proxies.append(base)

    def _add(self, name: str, server: ChildProcess, *, optional: bool = False) -> None:
        server.name = name  # what start-up failures are reported as
        self.servers[name] = server
        if optional:
            self.optional.add(name)

    @property
    def access_log(self) -> AccessLog:
        return AccessLog(self.upstream.log_path)

    def targets(self) -> list[Served]:
        """The running targets in table order: direct (the upstream itself) first."""
        order = [("direct", "upstream")]
        order += [(n, n) for n in self.servers if n not in ("redis", "upstream")]
        out = []
        for name, process in order:
            server = self.servers[process]
            if server.running:
                assert isinstance(server, LoopbackAddress)
                out.append(Served(name, server, process))
        return out

    def set_proxy_env(self, key: str, value: str) -> None:
        """Extra environment for every proxy process (before :meth:`running`)."""
        for proxy in self.proxies:
            proxy.env[key] = value

    def _start_optional(self, name: str, server: ChildProcess) -> bool:
        if isinstance(server, Nginx) and not server.available():
            self.skipped[name] = f"{server.binary} is not installed"
            return False
        try:
            server.start(START_TIMEOUT)
        except NotReady as exc:
            refusal = server.refusal() if isinstance(server, Proxy) else None
            if refusal is not None:
                self.skipped[name] = f"registry-proxy refused its configuration ({refusal})"
            else:
                lines = str(exc).strip().splitlines()
                self.skipped[name] = f"did not start: {lines[0] if lines else exc}"
            return False
        return True

    @contextlib.contextmanager
    def running(self) -> Iterator[dict[str, int]]:
        """Start every server in order (yielding name -> PID); stop them in reverse. An
        optional server that cannot start is left out (see :attr:`skipped`)."""
        try:
            pids: dict[str, int] = {}
            for name, server in self.servers.items():
                if name in self.optional:
                    if not self._start_optional(name, server):
                        continue
                else:
                    server.start(START_TIMEOUT)
                assert server.pid is not None
                pids[name] = server.pid
            yield pids
        finally:
            for server in reversed(self.servers.values()):
                server.stop()


# -------------------------------------------------------------------------- access log

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
