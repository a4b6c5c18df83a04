"""What putting new bytes into the page cache costs on this machine, measured, not assumed.

Every cache in the bench (this proxy, nginx, Distribution's proxy) writes what it fetches
into a new file, so the kernel gives it new page-cache pages. On a virtual machine whose
memory the host backs lazily and takes back (Firecracker; ``page_reporting`` hands free
memory to the host), a page the guest has not used lately costs a host fault when it is
written; a page freed a moment ago does not. The kernel time of a cold GET then depends on
which free pages the machine has at that moment as much as on the cache: in one run the
same write took 0.34 s/GiB at the start and 3.76 s/GiB at the end.

:func:`probe` writes a new file of ``size`` bytes in ``directory`` three ways and reports
the kernel CPU seconds per GiB of each (``getrusage(RUSAGE_THREAD)``, the write and its
fsync):

- ``buffered``: ``write`` of 1 MiB buffers into the page cache, memory as found;
- ``recycled``: the same again right after deleting the first file (its pages are free
  and not yet reported: the best case, what a machine without reporting always gets);
- ``direct``: ``O_DIRECT`` writes of the same buffers (no page cache; None where the
  file system refuses it, e.g. tmpfs).

``reported_mib`` reads how much memory the kernel has reported to the host so far (None
without ``page_reporting``); the bench prints its growth over the run.

:func:`recycle` evens that out between targets: right before each cold measurement the
bench writes as many bytes as the measurement will put into new files (the cache's copy,
the client's) into a scratch file and deletes it, so every target's new pages are pages
freed a moment ago, as on a node whose page cache is full and whose new pages come from
evicting old ones. Without it, which target is measured right after another one's cache
was deleted decided a cold 1 GiB GET's kernel time by a factor of four (1.2 against
4.8 s/GiB, the same code one GET after the other). ``--no-recycle`` measures memory as
found.
"""

from __future__ import annotations

import mmap
import os
import resource
from dataclasses import dataclass
from pathlib import Path

GIB = 1 << 30
BUFFER = 1 << 20
REPORTED = Path("/sys/module/page_reporting/parameters/reported_kib")


def reported_mib() -> float | None:
    try:
        return int(REPORTED.read_text()) / 1024
    except (OSError, ValueError):
        return None


def _sys_seconds() -> float:
    return resource.getrusage(resource.RUSAGE_THREAD).ru_stime


def _write(path: Path, size: int, buffer: mmap.mmap, *, direct: bool) -> float:
    """Kernel CPU seconds per GiB to write ``size`` bytes into a new file and fsync it."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | (os.O_DIRECT if direct else 0)
    view = memoryview(buffer)
    before = _sys_seconds()
    fd = os.open(path, flags, 0o600)
    try:
        _fill(fd, size, view)
        os.fsync(fd)
    finally:
        os.close(fd)
        view.release()
    return (_sys_seconds() - before) * GIB / size


def _fill(fd: int, size: int, view: memoryview) -> None:
    """Write ``view`` to ``fd`` again and again until ``size`` bytes are in."""
    written = 0
    while written < size:
        written += os.write(fd, view)


@dataclass(frozen=True)
class WriteCost:
    buffered: float
    recycled: float
    direct: float | None

    def text(self) -> str:
        direct = "refused" if self.direct is None else f"{self.direct:.2f}"
        return (
            f"{self.buffered:.2f} s/GiB into the page cache as found, {self.recycled:.2f} "
            f"right after freeing as much, {direct} with O_DIRECT (kernel CPU)"
        )


def probe(directory: Path, size: int = 256 << 20) -> WriteCost:
    """Measure as the module docstring says; leaves no file behind."""
    directory.mkdir(parents=True, exist_ok=True)
    first, second, third = (directory / f"pagecache-probe-{n}" for n in range(3))
    buffer = mmap.mmap(-1, BUFFER)  # page-aligned, as O_DIRECT wants
    buffer.write(os.urandom(BUFFER))
    try:
        buffered = _write(first, size, buffer, direct=False)
        first.unlink()
        recycled = _write(second, size, buffer, direct=False)
        second.unlink()
        try:
            direct: float | None = _write(third, size, buffer, direct=True)
        except OSError:
            direct = None
        return WriteCost(buffered, recycled, direct)
    finally:
        buffer.close()
        for path in (first, second, third):
            path.unlink(missing_ok=True)


def recycle(directory: Path, size: int) -> None:
    """Write ``size`` bytes into a new file in ``directory`` and delete it at once (see the
    module docstring). Nothing is fsynced: the pages are freed, not written back."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "recycle"
    view = memoryview(bytes(BUFFER))
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        _fill(fd, size, view)
    finally:
        os.close(fd)
        path.unlink(missing_ok=True)
