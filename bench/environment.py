"""What the bench runs on, probed in one place: machine, code revision, tool versions.

Probed before any server starts (the servers run the code checked out then) and once
more at the end, to note if ``proxy/`` changed during the run.
"""

from __future__ import annotations

import datetime as dt
import os
import platform
import subprocess
from pathlib import Path

import aiohttp

from bench import clients, profile
from tests.rig.process import binary_version
from tests.rig.redis_server import REDIS_BINARY
from tests.rig.registry import REGISTRY_BINARY
from tests.rig.skopeo import SKOPEO_BINARY

REPO_ROOT = Path(__file__).resolve().parent.parent


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


def _git(*args: str) -> str:
    """stdout of ``git -C <repo root> ARGS``; OSError or CalledProcessError on failure."""
    return subprocess.run(
        ["git", "-C", str(REPO_ROOT), *args], capture_output=True, text=True, check=True
    ).stdout


def git_rev() -> str:
    try:
        rev = _git("rev-parse", "--short", "HEAD").strip()
        dirty = _git("status", "--porcelain", "--", "proxy").strip()
    except (OSError, subprocess.CalledProcessError):
        return "?"
    return rev + (" (proxy/ modified)" if dirty else "")


def git_rev_of(checkout: Path) -> str:
    """Short HEAD of another checkout (the baseline), with ``(proxy/ modified)`` if so."""
    try:
        run = subprocess.run
        rev = run(
            ["git", "-C", str(checkout), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        dirty = run(
            ["git", "-C", str(checkout), "status", "--porcelain", "--", "proxy"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "?"
    return rev + (" (proxy/ modified)" if dirty else "")


def load_average() -> str:
    """The 1, 5 and 15 minute load averages (the machine is shared: say how busy it was)."""
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"


def proxy_tree() -> str:
    """What identifies the proxy's code: the tree of proxy/ at HEAD plus local changes."""
    try:
        tree = _git("rev-parse", "HEAD:proxy").strip()
        diff = _git("diff", "HEAD", "--", "proxy")
    except (OSError, subprocess.CalledProcessError):
        return "?"
    return tree + str(hash(diff))


def environment() -> list[tuple[str, str]]:
    """(name, value) lines describing the machine, the code and every binary's version."""
    import redis

    import proxy

    return [
        ("date", dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")),
        ("machine", f"{platform.node()}: {platform.system()} {platform.release()}"),
        ("cpu", f"{os.cpu_count()} x {_cpu_model()}"),
        ("memory", _mem_total()),
        ("registry-proxy", f"{proxy.__version__} at {git_rev()}"),
        ("python", platform.python_version()),
        ("aiohttp / redis-py", f"{aiohttp.__version__} / {redis.__version__}"),
        ("docker-registry", binary_version([REGISTRY_BINARY, "--version"])),
        ("skopeo", binary_version([SKOPEO_BINARY, "--version"])),
        ("wrk", binary_version([clients.WRK_BINARY, "-v"])),
        ("redis-server", binary_version([REDIS_BINARY, "--version"])),
        ("py-spy", binary_version([profile.py_spy() or "py-spy", "--version"])),
    ]
