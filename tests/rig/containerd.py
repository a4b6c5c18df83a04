"""A private containerd for the integration tests, and ``ctr`` to drive it.

containerd runs as a child process (as root: it insists) with its own root, state, socket
and config in a short temp dir (a unix socket path must stay under 108 bytes, which
pytest's tmp_path does not promise). Plugins a content fetch does not need are disabled,
the CRI plugin and ``opt`` (which would write to /opt/containerd) among them. Pulls go
through ``ctr content fetch --hosts-dir DIR``, which needs no snapshotter, with one
``hosts.toml`` per registry name:

    server = "http://127.0.0.1:<a port nobody listens on>"
    [host."http://127.0.0.1:<proxy>"]
      capabilities = ["pull", "resolve"]

The unreachable ``server`` makes a failing mirror fail the pull instead of being bypassed.
"""

from __future__ import annotations

import shutil
import socket
import tempfile
from pathlib import Path

from .process import (
    STOP_TIMEOUT,
    ChildProcess,
    Completed,
    free_port,
    hermetic_environment,
    run_command,
)

CONTAINERD_BINARY = "/usr/bin/containerd"
CTR_BINARY = "/usr/bin/ctr"
CONTAINERD_START_TIMEOUT = 20.0
CTR_TIMEOUT = 120.0
NAMESPACE = "rp-tests"

# Everything but content, metadata, leases, namespaces and images (and what they need).
DISABLED_PLUGINS = (
    "io.containerd.grpc.v1.cri",
    "io.containerd.internal.v1.opt",
    "io.containerd.internal.v1.tracing",
    "io.containerd.tracing.processor.v1.otlp",
    "io.containerd.snapshotter.v1.aufs",
    "io.containerd.snapshotter.v1.btrfs",
    "io.containerd.snapshotter.v1.devmapper",
    "io.containerd.snapshotter.v1.zfs",
    "io.containerd.snapshotter.v1.overlayfs",
    "io.containerd.runtime.v1.linux",
    "io.containerd.runtime.v2.task",
    "io.containerd.monitor.v1.cgroups",
    "io.containerd.service.v1.tasks-service",
    "io.containerd.grpc.v1.tasks",
    "io.containerd.internal.v1.restart",
)

CONFIG = """\
version = 2
root = "{root}"
state = "{state}"
disabled_plugins = [{disabled}]

[grpc]
  address = "{socket}"

[ttrpc]
  address = "{socket}.ttrpc"

[debug]
  address = ""
  level = "info"

[metrics]
  address = ""
"""


def hosts_toml(mirror_url: str, server_url: str, *, override_path: bool = False) -> str:
    """One mirror host. With ``override_path`` the mirror URL's path is used as the API
    root as it is (``http://proxy/v2/<upstream-name>``) instead of ``<path>/v2``."""
    lines = [
        f'server = "{server_url}"',
        "",
        f'[host."{mirror_url}"]',
        '  capabilities = ["pull", "resolve"]',
    ]
    if override_path:
        lines.append("  override_path = true")
    return "\n".join(lines) + "\n"


def write_hosts_dir(root: Path, mirrors: dict[str, str], *, override_path: bool = False) -> Path:
    """``root/<registry name>/hosts.toml`` for each name -> mirror URL, every one with an
    unreachable ``server``; returns ``root``."""
    unreachable = f"http://127.0.0.1:{free_port()}"
    for name, mirror_url in mirrors.items():
        directory = root / name
        directory.mkdir(parents=True, exist_ok=True)
        toml = hosts_toml(mirror_url, unreachable, override_path=override_path)
        (directory / "hosts.toml").write_text(toml)
    return root


class Containerd(ChildProcess):
    """A private containerd daemon; stopped by PID, its temp dir removed. The log goes
    to ``log_path`` (outside the short-lived temp dir, so it outlives a failure)."""

    name = "containerd"
    start_timeout = CONTAINERD_START_TIMEOUT

    def __init__(self, binary: str, ctr_binary: str, log_path: Path) -> None:
        super().__init__(Path(tempfile.mkdtemp(prefix="rp-ctrd-", dir="/tmp")))
        self.binary = binary
        self.ctr_binary = ctr_binary
        self.log_path = log_path
        self.socket = self.workdir / "c.sock"
        self.config_path = self.workdir / "config.toml"
        self.config_path.write_text(
            CONFIG.format(
                root=self.workdir / "root",
                state=self.workdir / "state",
                socket=self.socket,
                disabled=", ".join(f'"{p}"' for p in DISABLED_PLUGINS),
            )
        )

    def argv(self) -> list[str]:
        return [self.binary, "--config", str(self.config_path)]

    def ready(self) -> bool:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            try:
                sock.connect(str(self.socket))
            except (FileNotFoundError, ConnectionRefusedError):
                return False
        return True

    def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        """SIGTERM by PID, SIGKILL after a timeout; then the temp dir goes. Idempotent."""
        super().stop(timeout)
        shutil.rmtree(self.workdir, ignore_errors=True)

    async def ctr(self, *args: str, time_limit: float = CTR_TIMEOUT) -> Completed:
        """``ctr -a SOCK -n rp-tests ARGS`` as an asyncio subprocess (the proxy it talks to
        is served by this same event loop), with no proxy variables in its environment."""
        argv = [self.ctr_binary, "-a", str(self.socket), "-n", NAMESPACE, *args]
        result = await run_command(
            argv, env=hermetic_environment(self.workdir), time_limit=time_limit
        )
        if result.returncode is None:
            raise TimeoutError(f"ctr timed out after {time_limit}s: {result.command}")
        return result

    async def fetch(self, hosts_dir: Path, reference: str) -> Completed:
        """``ctr content fetch --hosts-dir DIR REF``: resolve and fetch every blob of the
        image for this platform into the content store (no unpacking)."""
        return await self.ctr("content", "fetch", "--hosts-dir", str(hosts_dir), reference)

    async def content_digests(self) -> set[str]:
        """Digests of everything in the content store."""
        result = await self.ctr("content", "ls", "-q")
        assert result.returncode == 0, result.stderr
        return {line.strip() for line in result.stdout.splitlines() if line.strip()}
