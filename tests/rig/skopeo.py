"""``skopeo`` as an asyncio subprocess, in a hermetic environment.

The proxy under test may be served by the caller's own event loop, so skopeo never
blocks it. The environment holds no HTTP proxy variables, an empty registries.conf, no
auth file; every call has ``--insecure-policy`` and ``--retry-times 0``.

skopeo with ``--*-tls-verify=false`` first sends a TLS ClientHello to the plain-HTTP port,
then retries over HTTP; servers under test must survive that.
"""

from __future__ import annotations

import asyncio
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from .process import hermetic_environment, run_command

SKOPEO_BINARY = "/usr/bin/skopeo"
SKOPEO_TIMEOUT = 120.0


class SkopeoError(AssertionError):
    """skopeo failed or timed out; the message carries the command line and stderr."""

    def __init__(self, message: str, returncode: int | None, stderr: str) -> None:
        super().__init__(message)
        self.returncode = returncode
        self.stderr = stderr

    @property
    def last_line(self) -> str:
        """The last non-blank line of stderr (at most 300 characters), for summaries."""
        lines = [line for line in self.stderr.strip().splitlines() if line.strip()]
        return lines[-1][:300] if lines else ""


@dataclass
class Skopeo:
    """skopeo bound to a scratch directory for its config, temp files and pulled layouts."""

    workdir: Path
    binary: str = SKOPEO_BINARY
    _pulls: int = field(default=0, init=False, repr=False)

    def _env(self) -> dict[str, str]:
        self.workdir.mkdir(parents=True, exist_ok=True)
        registries_conf = self.workdir / "registries.conf"
        if not registries_conf.exists():
            registries_conf.write_text("unqualified-search-registries = []\n")
        tmp = self.workdir / "tmp"
        tmp.mkdir(exist_ok=True)
        return hermetic_environment(
            self.workdir,
            XDG_RUNTIME_DIR=str(self.workdir),
            XDG_CONFIG_HOME=str(self.workdir / "config"),
            TMPDIR=str(tmp),
            CONTAINERS_REGISTRIES_CONF=str(registries_conf),
            REGISTRY_AUTH_FILE=str(self.workdir / "auth.json"),
        )

    async def run(self, *args: str, time_limit: float = SKOPEO_TIMEOUT) -> str:
        """Run ``skopeo --insecure-policy ARGS``; returns stdout, raises SkopeoError."""
        argv = [self.binary, "--insecure-policy", *args]
        result = await run_command(argv, env=self._env(), time_limit=time_limit)
        if result.returncode is None:
            raise SkopeoError(
                f"skopeo timed out after {time_limit}s: {result.command}\nstderr:\n{result.stderr}",
                None,
                result.stderr,
            )
        if result.returncode != 0:
            raise SkopeoError(
                f"skopeo exited {result.returncode}: {result.command}\nstderr:\n{result.stderr}",
                result.returncode,
                result.stderr,
            )
        return result.stdout

    async def push(
        self,
        source: str,
        host: str,
        repo: str,
        tag: str,
        *,
        format: str | None = None,
        all_images: bool = False,
        preserve_digests: bool = False,
        creds: str | None = None,
    ) -> None:
        """``skopeo copy SOURCE docker://HOST/REPO:TAG`` over plain HTTP.

        ``source`` is e.g. ``oci:DIR:TAG``; ``format`` ``"v2s2"`` converts to Docker schema2
        (an index then becomes a Docker manifest list), ``"oci"`` keeps OCI; ``all_images``
        copies every platform of an index; ``creds`` is ``user:password``."""
        args = ["copy", "--retry-times", "0", "--dest-tls-verify=false"]
        if format is not None:
            args += ["--format", format]
        if all_images:
            args.append("--all")
        if preserve_digests:
            args.append("--preserve-digests")
        if creds is not None:
            args += ["--dest-creds", creds]
        await self.run(*args, source, f"docker://{host}/{repo}:{tag}")

    async def pull(
        self,
        host: str,
        reference: str,
        dest: Path,
        tag: str = "pulled",
        *,
        all_images: bool = False,
        arch: str | None = None,
        os_name: str = "linux",
        time_limit: float = SKOPEO_TIMEOUT,
        creds: str | None = None,
    ) -> None:
        """``skopeo copy docker://HOST/REFERENCE oci:DEST:TAG`` over plain HTTP.

        ``reference`` is ``repo:tag`` or ``repo@sha256:...``. ``all_images`` keeps every
        platform of a list; ``arch`` picks one platform (``--override-arch``); ``creds``
        (``user:password``) is passed as ``--src-creds``."""
        args: list[str] = []
        if arch is not None:
            args += ["--override-arch", arch, "--override-os", os_name]
        args += ["copy", "--retry-times", "0", "--src-tls-verify=false"]
        if all_images:
            args.append("--all")
        if creds is not None:
            args += ["--src-creds", creds]
        await self.run(
            *args, f"docker://{host}/{reference}", f"oci:{dest}:{tag}", time_limit=time_limit
        )

    async def inspect_raw(self, host: str, reference: str) -> str:
        """``skopeo inspect --raw``: the manifest bytes as the registry served them."""
        return await self.run(
            "inspect",
            "--raw",
            "--retry-times",
            "0",
            "--tls-verify=false",
            f"docker://{host}/{reference}",
        )

    async def timed_pull(
        self, host: str, reference: str, *, time_limit: float = SKOPEO_TIMEOUT
    ) -> float:
        """:meth:`pull` into a fresh layout in the work dir, removed afterwards; returns
        wall seconds."""
        self._pulls += 1
        dest = self.workdir / f"pull-{self._pulls}"
        started = time.perf_counter()
        try:
            await self.pull(host, reference, dest, time_limit=time_limit)
            return time.perf_counter() - started
        finally:
            shutil.rmtree(dest, ignore_errors=True)

    async def pull_many(
        self, host: str, reference: str, n: int, *, time_limit: float = SKOPEO_TIMEOUT
    ) -> tuple[float, list[SkopeoError]]:
        """``n`` pulls at once; returns wall seconds until the last one ended, and the
        errors of the pulls that failed (the others still count)."""
        started = time.perf_counter()
        outcomes = await asyncio.gather(
            *(self.timed_pull(host, reference, time_limit=time_limit) for _ in range(n)),
            return_exceptions=True,
        )
        wall = time.perf_counter() - started
        errors: list[SkopeoError] = []
        for outcome in outcomes:
            if isinstance(outcome, SkopeoError):
                errors.append(outcome)
            elif isinstance(outcome, BaseException):
                raise outcome
        return wall, errors
