"""Run ``skopeo copy`` from tests without blocking the event loop.

The proxy under test is served by the test's own event loop, so skopeo must run as an
asyncio subprocess. The environment is hermetic: no HTTP proxy variables, an empty
registries.conf, no auth file, ``--insecure-policy``, no retries.

skopeo with ``--*-tls-verify=false`` first sends a TLS ClientHello to the plain-HTTP port,
then retries over HTTP; servers under test must survive that.
"""

from __future__ import annotations

import asyncio
import os
from dataclasses import dataclass
from pathlib import Path

SKOPEO_BINARY = "/usr/bin/skopeo"
SKOPEO_TIMEOUT = 120.0


class SkopeoError(AssertionError):
    """skopeo failed or timed out; the message carries the command line and stderr."""

    def __init__(self, message: str, returncode: int | None, stderr: str) -> None:
        super().__init__(message)
        self.returncode = returncode
        self.stderr = stderr


@dataclass(frozen=True)
class Skopeo:
    """skopeo bound to a scratch directory for its config and temp files."""

    workdir: Path
    binary: str = SKOPEO_BINARY

    def _env(self) -> dict[str, str]:
        self.workdir.mkdir(parents=True, exist_ok=True)
        registries_conf = self.workdir / "registries.conf"
        if not registries_conf.exists():
            registries_conf.write_text("unqualified-search-registries = []\n")
        tmp = self.workdir / "tmp"
        tmp.mkdir(exist_ok=True)
        keep = {"PATH", "LANG", "LC_ALL", "TZ"}
        env = {k: v for k, v in os.environ.items() if k in keep}
        env.update(
            HOME=str(self.workdir),
            XDG_RUNTIME_DIR=str(self.workdir),
            XDG_CONFIG_HOME=str(self.workdir / "config"),
            TMPDIR=str(tmp),
            CONTAINERS_REGISTRIES_CONF=str(registries_conf),
            REGISTRY_AUTH_FILE=str(self.workdir / "auth.json"),
        )
        return env

    async def run(self, *args: str, time_limit: float = SKOPEO_TIMEOUT) -> str:
        """Run ``skopeo --insecure-policy ARGS``; returns stdout, raises SkopeoError."""
        argv = [self.binary, "--insecure-policy", *args]
        process = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=self._env(),
        )
        try:
            async with asyncio.timeout(time_limit):
                stdout, stderr = await process.communicate()
        except TimeoutError:
            process.kill()
            stdout, stderr = await process.communicate()
            raise SkopeoError(
                f"skopeo timed out after {time_limit}s: {' '.join(argv)}\n"
                f"stderr:\n{stderr.decode(errors='replace')}",
                None,
                stderr.decode(errors="replace"),
            ) from None
        except BaseException:
            if process.returncode is None:
                process.kill()
                await process.wait()
            raise
        if process.returncode != 0:
            text = stderr.decode(errors="replace")
            raise SkopeoError(
                f"skopeo exited {process.returncode}: {' '.join(argv)}\nstderr:\n{text}",
                process.returncode,
                text,
            )
        return stdout.decode(errors="replace")

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
    ) -> None:
        """``skopeo copy SOURCE docker://HOST/REPO:TAG`` over plain HTTP.

        ``source`` is e.g. ``oci:DIR:TAG``; ``format`` ``"v2s2"`` converts to Docker schema2
        (an index then becomes a Docker manifest list), ``"oci"`` keeps OCI; ``all_images``
        copies every platform of an index."""
        args = ["copy", "--retry-times", "0", "--dest-tls-verify=false"]
        if format is not None:
            args += ["--format", format]
        if all_images:
            args.append("--all")
        if preserve_digests:
            args.append("--preserve-digests")
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
    ) -> None:
        """``skopeo copy docker://HOST/REFERENCE oci:DEST:TAG`` over plain HTTP.

        ``reference`` is ``repo:tag`` or ``repo@sha256:...``. ``all_images`` keeps every
        platform of a list; ``arch`` picks one platform (``--override-arch``)."""
        args: list[str] = []
        if arch is not None:
            args += ["--override-arch", arch, "--override-os", os_name]
        args += ["copy", "--retry-times", "0", "--src-tls-verify=false"]
        if all_images:
            args.append("--all")
        await self.run(*args, f"docker://{host}/{reference}", f"oci:{dest}:{tag}")

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
