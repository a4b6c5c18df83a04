"""A small tmpfs to put a cache directory on (a disk that fills up for real).

Mounting needs root (CAP_SYS_ADMIN); :func:`tmpfs_unavailable` says why it cannot be
done here, or None. The mount is ours: it is unmounted on the way out (lazily, if a
process still holds files in it).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path


def tmpfs_unavailable() -> str | None:
    """None when a tmpfs can be mounted here, else the reason."""
    if os.geteuid() != 0:
        return f"mounting a tmpfs needs root (the tests run as uid {os.geteuid()})"
    if shutil.which("mount") is None or shutil.which("umount") is None:
        return "mount/umount are not installed"
    return None


@contextlib.contextmanager
def mounted_tmpfs(path: Path, size_mib: int) -> Iterator[Path]:
    """``mount -t tmpfs -o size=<size_mib>m tmpfs <path>``, unmounted afterwards."""
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size_mib}m,mode=0755", "tmpfs", str(path)],
        check=True,
        capture_output=True,
    )
    try:
        yield path
    finally:
        done = subprocess.run(["umount", str(path)], check=False, capture_output=True)
        if done.returncode != 0:
            subprocess.run(["umount", "-l", str(path)], check=False, capture_output=True)


def fill(path: Path, *, leave: int = 0) -> Path:
    """Write a ballast file in ``path`` until its filesystem has ``leave`` bytes free (or
    none: ENOSPC ends it); returns the ballast."""
    ballast = path / "ballast"
    block = b"\0" * (1 << 20)
    with ballast.open("wb") as f:
        while True:
            st = os.statvfs(path)
            room = st.f_bavail * st.f_frsize - leave
            if room <= 0:
                break
            try:
                f.write(block[: min(room, len(block))])
                f.flush()
            except OSError:
                break
    return ballast
