"""``podman`` (Debian's, 4.3) pulling through a ``registries.conf`` mirror, as root, with
everything private in a short temp dir.

Every call runs ``podman --root R --runroot RR --storage-driver vfs --tmpdir T
--events-backend none --cgroup-manager cgroupfs`` in a hermetic environment:
``CONTAINERS_REGISTRIES_CONF`` is the file the test gives (``registries.conf`` with a
``[[registry.mirror]]`` pointing at the proxy, as the README shows), ``REGISTRY_AUTH_FILE``
the auth file (``podman login`` writes it, ``pull`` reads it), ``CONTAINERS_CONF`` an empty
file, and the dead proxy of :mod:`.engine`: podman falls back to the registry's own
``location`` when the mirror fails, and that must fail rather than reach it.

    podman = Podman(tmp_path / "podman")
    conf = podman.write_registries_conf(mirror_registries_conf("docker.io", proxy.host))
    image = await podman.pull("docker.io/team/app:v1", registries_conf=conf)
    await podman.login(proxy.host, "user", "secret", auth_file=auth)   # then pull with it
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

from .engine import PulledImage, checked, offline_proxy_environment, sha256_id
from .process import Completed, hermetic_environment, run_command

PODMAN_BINARY = "/usr/bin/podman"
PODMAN_TIMEOUT = 180.0


def mirror_registries_conf(registry: str, mirror_host: str, *, insecure: bool = True) -> str:
    """A ``registries.conf`` that pulls ``registry`` (e.g. ``docker.io``) through the
    mirror at ``mirror_host`` (``host:port``), plain HTTP when ``insecure``."""
    return (
        "unqualified-search-registries = []\n\n"
        "[[registry]]\n"
        f'location = "{registry}"\n\n'
        "[[registry.mirror]]\n"
        f'location = "{mirror_host}"\n'
        f"insecure = {'true' if insecure else 'false'}\n"
    )


class Podman:
    """podman bound to a private storage root; :meth:`cleanup` removes it (the fixture
    calls it). Work files (registries.conf, auth files) go in ``workdir``."""

    def __init__(self, workdir: Path, binary: str = PODMAN_BINARY) -> None:
        self.workdir = workdir
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.binary = binary
        # Storage paths end up in socket and lock paths: keep them short.
        self.root = Path(tempfile.mkdtemp(prefix="rp-pdm-", dir="/tmp"))
        self.containers_conf = self.workdir / "containers.conf"
        self.containers_conf.write_text("")
        self.default_registries_conf = self.write_registries_conf(
            "unqualified-search-registries = []\n", name="empty-registries.conf"
        )
        # podman insists that REGISTRY_AUTH_FILE exists: an empty one when none is given.
        self.no_auth_file = self.workdir / "no-auth.json"
        self.no_auth_file.write_text('{"auths": {}}\n')
        self._proxy_env = offline_proxy_environment()

    def write_registries_conf(self, text: str, *, name: str = "registries.conf") -> Path:
        path = self.workdir / name
        path.write_text(text)
        return path

    def cleanup(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)

    def _argv(self, args: tuple[str, ...]) -> list[str]:
        return [
            self.binary,
            "--root",
            str(self.root / "root"),
            "--runroot",
            str(self.root / "run"),
            "--tmpdir",
            str(self.root / "tmp"),
            "--storage-driver",
            "vfs",
            "--events-backend",
            "none",
            "--cgroup-manager",
            "cgroupfs",
            *args,
        ]

    def _env(self, registries_conf: Path | None, auth_file: Path | None) -> dict[str, str]:
        tmp = self.root / "tmp"
        tmp.mkdir(exist_ok=True)
        return hermetic_environment(
            self.workdir,
            XDG_RUNTIME_DIR=str(self.root / "run"),
            XDG_CONFIG_HOME=str(self.workdir / "config"),
            TMPDIR=str(tmp),
            CONTAINERS_CONF=str(self.containers_conf),
            CONTAINERS_REGISTRIES_CONF=str(registries_conf or self.default_registries_conf),
            REGISTRY_AUTH_FILE=str(auth_file or self.no_auth_file),
            **self._proxy_env,
        )

    async def run(
        self,
        *args: str,
        registries_conf: Path | None = None,
        auth_file: Path | None = None,
        time_limit: float = PODMAN_TIMEOUT,
    ) -> Completed:
        """``podman ARGS``; returns however it ended (see :meth:`run_checked`)."""
        return await run_command(
            self._argv(args), env=self._env(registries_conf, auth_file), time_limit=time_limit
        )

    async def run_checked(
        self,
        *args: str,
        registries_conf: Path | None = None,
        auth_file: Path | None = None,
        time_limit: float = PODMAN_TIMEOUT,
    ) -> str:
        """:meth:`run`; its stdout, or :class:`~.engine.EngineError`."""
        result = await self.run(
            *args, registries_conf=registries_conf, auth_file=auth_file, time_limit=time_limit
        )
        return checked(result).stdout

    async def pull(
        self,
        reference: str,
        *,
        registries_conf: Path,
        auth_file: Path | None = None,
        time_limit: float = PODMAN_TIMEOUT,
    ) -> PulledImage:
        """``podman pull REFERENCE`` (fully qualified, e.g. ``docker.io/team/app:v1``)
        with ``registries_conf``; then what podman reports of the image."""
        await self.run_checked(
            "pull",
            "--quiet",
            reference,
            registries_conf=registries_conf,
            auth_file=auth_file,
            time_limit=time_limit,
        )
        return await self.inspect_image(reference)

    async def inspect_image(self, reference: str) -> PulledImage:
        (raw,) = json.loads(await self.run_checked("image", "inspect", reference))
        return PulledImage(
            reference=reference,
            id=sha256_id(raw["Id"]),
            repo_digests=tuple(raw.get("RepoDigests") or ()),
            size=int(raw.get("Size", 0)),
            raw=raw,
        )

    async def remove_image(self, reference: str) -> None:
        await self.run_checked("rmi", "--force", reference)

    async def login(
        self,
        host: str,
        username: str,
        password: str,
        *,
        auth_file: Path,
        tls_verify: bool = False,
    ) -> Completed:
        """``podman login`` with the password as an argument (the rig gives commands no
        stdin); writes ``auth_file``. Returns however it ended: a refused login is a
        result, not an error."""
        return await self.run(
            "login",
            f"--tls-verify={'true' if tls_verify else 'false'}",
            "--username",
            username,
            "--password",
            password,
            host,
            auth_file=auth_file,
        )
