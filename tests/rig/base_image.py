"""The base image of ``deploy/Dockerfile`` made from Debian's packages: no Docker Hub.

:func:`make_base_rootfs` runs ``deploy/base-image.sh`` (mmdebstrap: Debian bookworm with
python3, python3-venv and ca-certificates) into a tarball, which
:meth:`~.dockerd.Dockerd.import_rootfs` turns into an image and ``docker build
--build-arg BASE_IMAGE=...`` builds on. It takes about 30 s: the integration tests make it
once per run (a session fixture) and import it into each daemon that builds.
"""

from __future__ import annotations

import os
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from .process import find_binary

ROOT = Path(__file__).resolve().parents[2]
BASE_IMAGE_SCRIPT = ROOT / "deploy" / "base-image.sh"
MMDEBSTRAP_BINARY = "/usr/bin/mmdebstrap"
MMDEBSTRAP_TIMEOUT = 600.0


@dataclass(frozen=True)
class BaseRootfs:
    tarball: Path
    seconds: float  # how long mmdebstrap took


def make_base_rootfs(tarball: Path, *, mirror: str | None = None) -> BaseRootfs:
    """Run ``deploy/base-image.sh TARBALL [MIRROR]``; AssertionError with its output if it
    fails. ``mirror`` defaults to the script's (``$DEBIAN_MIRROR`` or deb.debian.org)."""
    if find_binary(MMDEBSTRAP_BINARY) is None:
        raise AssertionError(f"{MMDEBSTRAP_BINARY} is not installed")
    argv = ["sh", str(BASE_IMAGE_SCRIPT), str(tarball)]
    if mirror is not None:
        argv.append(mirror)
    started = time.monotonic()
    result = subprocess.run(
        argv,
        capture_output=True,
        text=True,
        timeout=MMDEBSTRAP_TIMEOUT,
        check=False,
        env={**os.environ, "TMPDIR": str(tarball.parent)},
    )
    if result.returncode != 0 or not tarball.is_file():
        raise AssertionError(
            f"{' '.join(argv)} exited {result.returncode}\n{result.stdout}\n{result.stderr}"
        )
    return BaseRootfs(tarball=tarball, seconds=time.monotonic() - started)
