"""A private Docker daemon (Debian's ``docker.io``, 20.10) and the ``docker`` CLI to drive it.

dockerd runs as our child, as root, with everything in a short temp dir (a unix socket
path must stay under 108 bytes): data root (``vfs`` storage, which needs no kernel
support), exec root, pid file, socket, and its configuration file, so the host's
``/etc/docker/daemon.json`` is never read. No networking of its own (``--bridge=none``,
no iptables): containers and builds run with ``--network host``. It starts its own
containerd, which it stops when it is stopped.

``registry-mirrors`` only ever applies to Docker Hub names: ``docker pull team/app:v1``
asks the mirror for ``/v2/team/app/manifests/v1`` (no ``ns``), so the proxy's default
upstream plays Docker Hub. With the dead proxy of :mod:`.engine` in dockerd's
environment, a mirror that fails makes the pull fail instead of falling back to Docker Hub.

The CLI is Debian's ``/usr/bin/docker`` (a newer client elsewhere on PATH would do, but
this is the pair the tests were written against), with ``DOCKER_BUILDKIT=0``: Debian's
dockerd builds with the classic builder.

    with Dockerd(DOCKERD_BINARY, DOCKER_BINARY, tmp_path / "dockerd.log",
                 registry_mirrors=[proxy.url], insecure_registries=[proxy.host]) as dockerd:
        image = await dockerd.pull("team/app:v1")      # PulledImage: .id, .digests
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from .engine import PulledImage, checked, offline_proxy_environment, sha256_id
from .process import STOP_TIMEOUT, ChildProcess, Completed, hermetic_environment, run_command

DOCKERD_BINARY = "/usr/sbin/dockerd"
DOCKER_BINARY = "/usr/bin/docker"
DOCKERD_START_TIMEOUT = 30.0
DOCKER_TIMEOUT = 180.0
BUILD_TIMEOUT = 900.0


def mounts_under(directory: Path) -> list[str]:
    """Mount points at or below ``directory``, deepest first (from /proc/self/mounts;
    octal escapes such as ``\\040`` for a space decoded)."""
    prefix = str(directory.resolve())
    points: list[str] = []
    with open("/proc/self/mounts") as mounts:
        for line in mounts:
            point = line.split()[1].encode().decode("unicode_escape")
            if point == prefix or point.startswith(prefix + "/"):
                points.append(point)
    return sorted(points, key=len, reverse=True)


class Dockerd(ChildProcess):
    """A private dockerd; stopped by PID, its temp dir removed. ``config`` is extra
    daemon.json content (e.g. the README's), merged under the mirror lists given here.
    The log goes to ``log_path``, outside the temp dir, so it outlives a failure."""

    name = "dockerd"
    start_timeout = DOCKERD_START_TIMEOUT

    def __init__(
        self,
        binary: str,
        docker_binary: str,
        log_path: Path,
        *,
        registry_mirrors: Sequence[str] = (),
        insecure_registries: Sequence[str] = (),
        config: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(Path(tempfile.mkdtemp(prefix="rp-dkd-", dir="/tmp")))
        self.binary = binary
        self.docker_binary = docker_binary
        self.log_path = log_path
        self.socket = self.workdir / "d.sock"
        self.config_path = self.workdir / "daemon.json"
        daemon: dict[str, Any] = dict(config or {})
        if registry_mirrors:
            daemon["registry-mirrors"] = list(registry_mirrors)
        if insecure_registries:
            daemon["insecure-registries"] = list(insecure_registries)
        self.config: dict[str, Any] = daemon
        self.config_path.write_text(json.dumps(daemon, indent=2))
        self.env = offline_proxy_environment()

    @property
    def docker_host(self) -> str:
        return f"unix://{self.socket}"

    def argv(self) -> list[str]:
        return [
            self.binary,
            "--config-file",
            str(self.config_path),
            "--iptables=false",
            "--ip6tables=false",
            "--bridge=none",
            "--storage-driver=vfs",
            "--data-root",
            str(self.workdir / "data"),
            "--exec-root",
            str(self.workdir / "exec"),
            "--pidfile",
            str(self.workdir / "dockerd.pid"),
            "-H",
            self.docker_host,
        ]

    def ready(self) -> bool:
        """``GET /_ping`` on the socket answers ``OK``."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(2)
            try:
                sock.connect(str(self.socket))
                sock.sendall(b"GET /_ping HTTP/1.0\r\nHost: docker\r\n\r\n")
                answer = sock.recv(4096)
            except (FileNotFoundError, ConnectionRefusedError, TimeoutError, OSError):
                return False
        return answer.startswith(b"HTTP/1.") and answer.rstrip().endswith(b"OK")

    def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        """SIGTERM by PID (dockerd stops its containers and containerd), SIGKILL after
        ``timeout``; then what it left mounted in its temp dir (the network namespace
        it bind-mounts under the exec root) is unmounted and the temp dir goes.
        Idempotent."""
        super().stop(max(timeout, 20.0))
        for mount_point in mounts_under(self.workdir):
            subprocess.run(["umount", "--lazy", mount_point], capture_output=True, check=False)
        shutil.rmtree(self.workdir, ignore_errors=True)

    def cli_environment(self) -> dict[str, str]:
        """What ``docker`` runs with: our socket, a private client config, classic builds."""
        return hermetic_environment(
            self.workdir,
            DOCKER_HOST=self.docker_host,
            DOCKER_CONFIG=str(self.workdir / "cli"),
            DOCKER_BUILDKIT="0",
        )

    async def docker(self, *args: str, time_limit: float = DOCKER_TIMEOUT) -> Completed:
        """``docker ARGS`` as an asyncio subprocess (the servers it reaches may be served
        by this same event loop); returns however it ended."""
        return await run_command(
            [self.docker_binary, *args], env=self.cli_environment(), time_limit=time_limit
        )

    async def run_checked(self, *args: str, time_limit: float = DOCKER_TIMEOUT) -> str:
        """``docker ARGS``; its stdout, or :class:`~.engine.EngineError`."""
        return checked(await self.docker(*args, time_limit=time_limit)).stdout

    async def pull(self, reference: str, *, time_limit: float = DOCKER_TIMEOUT) -> PulledImage:
        """``docker pull REFERENCE``, then what the daemon reports of the image."""
        await self.run_checked("pull", "--quiet", reference, time_limit=time_limit)
        return await self.inspect_image(reference)

    async def inspect_image(self, reference: str) -> PulledImage:
        (raw,) = json.loads(await self.run_checked("image", "inspect", reference))
        return PulledImage(
            reference=reference,
            id=sha256_id(raw["Id"]),
            repo_digests=tuple(raw.get("RepoDigests") or ()),
            size=int(raw["Size"]),
            raw=raw,
        )

    async def remove_image(self, reference: str) -> None:
        await self.run_checked("image", "rm", "--force", reference)

    async def import_rootfs(self, tarball: Path, reference: str) -> str:
        """``docker import TARBALL REFERENCE``: a root file system as a one-layer image;
        returns its image ID."""
        out = await self.run_checked("import", str(tarball), reference, time_limit=300)
        return sha256_id(out.strip())

    async def build(
        self,
        context: Path,
        *,
        dockerfile: Path,
        tag: str,
        build_args: Mapping[str, str] | None = None,
        time_limit: float = BUILD_TIMEOUT,
    ) -> Completed:
        """``docker build --network host`` with the classic builder; never pulls (a
        ``FROM`` that is not local fails through the dead proxy)."""
        args = ["build", "--network", "host", "--file", str(dockerfile), "--tag", tag]
        for key, value in (build_args or {}).items():
            args += ["--build-arg", f"{key}={value}"]
        return checked(await self.docker(*args, str(context), time_limit=time_limit))


# What the ``dockerd_factory`` fixture hands a test: keyword arguments of :class:`Dockerd`
# (``registry_mirrors``, ``insecure_registries``, ``config``) -> a started daemon.
DockerdFactory = Callable[..., Dockerd]
