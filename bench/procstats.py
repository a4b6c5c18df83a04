"""RSS and CPU of the server processes, read from /proc (Linux only, no dependencies).

- Over the whole run: a sampling thread keeps each process's highest RSS; at the end the
  kernel's own high-water mark (``VmHWM``) is read as well, and the larger one reported.
  CPU seconds are utime + stime from ``/proc/PID/stat``.
- Over one phase (:meth:`Monitor.phase`): the kernel's high-water mark is reset first
  (``echo 5 > /proc/PID/clear_refs``), so ``VmHWM`` at the end is that phase's exact peak,
  and CPU seconds are the difference across the phase.

A server may be several processes (nginx's master and workers, ``registry-proxy`` with
``workers: N``): each named process is measured with its descendants (found by parent PID
in ``/proc``; the list is refreshed at every phase start and about once a second). RSS is
then two figures: the tree's total (summed at each sample; the larger of that and the
largest single peak) and the largest single process's peak (``peak_rss_each``, "per
worker"). CPU seconds are summed over the tree.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

TICKS = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")
MiB = 1 << 20


def cpu_split(pid: int) -> tuple[float, float]:
    """User and kernel CPU seconds of ``pid`` (utime, stime)."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        fields = f.read().rsplit(b")", 1)[1].split()
    # after the comm field: state is fields[0], utime is field 14 overall -> index 11
    return int(fields[11]) / TICKS, int(fields[12]) / TICKS


def cpu_seconds(pid: int) -> float:
    user, kernel = cpu_split(pid)
    return user + kernel


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/statm", "rb") as f:
        return int(f.read().split()[1]) * PAGE


def hwm_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status", "rb") as f:
        for line in f:
            if line.startswith(b"VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def process_tree(pid: int) -> list[int]:
    """``pid`` and its living descendants (by the parent PID in ``/proc/*/stat``)."""
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as f:
                ppid = int(f.read().rsplit(b")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(entry.name))
    tree, todo = [], [pid]
    while todo:
        p = todo.pop()
        tree.append(p)
        todo.extend(children.get(p, ()))
    return tree


def reset_hwm(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


@dataclass
class PhaseStats:
    peak_rss: int = 0
    """The process tree's peak (summed over its processes)."""
    peak_rss_each: int = 0
    """The largest single process's peak (per worker)."""
    cpu: float = 0.0
    cpu_user: float = 0.0
    """Of ``cpu``, what ran in user space (Python, hashing), not in the kernel."""
    processes: int = 1


@dataclass
class ProcessStats:
    pid: int
    peak_rss: int = 0
    peak_rss_each: int = 0
    cpu: float = 0.0
    phases: dict[str, PhaseStats] = field(default_factory=dict)
    pids: list[int] = field(default_factory=list)
    """The tree as last seen (the root first)."""

    def refresh(self) -> list[int]:
        self.pids = process_tree(self.pid)
        return self.pids


def _tree_rss(pids: list[int]) -> dict[int, int]:
    out = {}
    for pid in pids:
        with contextlib.suppress(OSError):
            out[pid] = rss_bytes(pid)
    return out


def _tree_cpu(pids: list[int]) -> float:
    return sum(tree_cpu_split(pids))


def tree_cpu_split(pids: list[int]) -> tuple[float, float]:
    """User and kernel CPU seconds of ``pids`` so far (those gone count nothing)."""
    user = kernel = 0.0
    for pid in pids:
        with contextlib.suppress(OSError):
            u, k = cpu_split(pid)
            user += u
            kernel += k
    return user, kernel


def _tree_hwm(pids: list[int]) -> dict[int, int]:
    out = {}
    for pid in pids:
        with contextlib.suppress(OSError):
            out[pid] = hwm_bytes(pid)
    return out


class Monitor:
    """Samples the RSS of named process trees every ``interval`` seconds in a thread."""

    REFRESH = 1.0
    """Seconds between two looks for new processes in a tree."""

    def __init__(self, interval: float = 0.05) -> None:
        self.interval = interval
        self.procs: dict[str, ProcessStats] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="procstats", daemon=True)

    def add(self, name: str, pid: int) -> None:
        with self._lock:
            self.procs[name] = ProcessStats(pid)
            self.procs[name].refresh()

    def start(self) -> None:
        self._thread.start()

    def tree(self, name: str) -> list[int]:
        """The pids of process tree ``name`` now (looked up under the sampler's lock)."""
        with self._lock:
            return self.procs[name].refresh()

    def _sample(self, *, refresh: bool = False) -> None:
        with self._lock:
            for stats in self.procs.values():
                pids = stats.refresh() if refresh else stats.pids
                rss = _tree_rss(pids)
                if rss:
                    stats.peak_rss = max(stats.peak_rss, sum(rss.values()))
                    stats.peak_rss_each = max(stats.peak_rss_each, max(rss.values()))

    def _run(self) -> None:
        last = time.monotonic()
        while not self._stop.wait(self.interval):
            now = time.monotonic()
            refresh = now - last >= self.REFRESH
            if refresh:
                last = now
            self._sample(refresh=refresh)

    def finish(self) -> None:
        """Stop sampling and take the final CPU and high-water readings (processes alive)."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        self._sample(refresh=True)
        for stats in self.procs.values():
            hwm = _tree_hwm(stats.pids)
            if hwm:
                stats.peak_rss_each = max(stats.peak_rss_each, max(hwm.values()))
                stats.peak_rss = max(stats.peak_rss, stats.peak_rss_each)
            stats.cpu = _tree_cpu(stats.pids)

    @contextmanager
    def phase(self, label: str, name: str) -> Iterator[PhaseStats]:
        """Exact peak RSS and CPU seconds of process tree ``name`` while the block runs."""
        stats = self.procs[name]
        result = PhaseStats()
        with self._lock:
            pids = stats.refresh()
            # keep the run's peak: take the high-water marks before resetting them
            before = _tree_hwm(pids)
            if before:
                stats.peak_rss_each = max(stats.peak_rss_each, max(before.values()))
                stats.peak_rss = max(stats.peak_rss, stats.peak_rss_each)
            reset = all([reset_hwm(pid) for pid in pids])
        start_user, start_kernel = tree_cpu_split(pids)
        peak_sum = 0
        peak_each: dict[int, int] = {}
        stop = threading.Event()

        def sample() -> None:
            nonlocal peak_sum
            while not stop.wait(0.02):
                rss = _tree_rss(pids)
                if not rss:
                    return
                peak_sum = max(peak_sum, sum(rss.values()))
                for pid, value in rss.items():
                    peak_each[pid] = max(peak_each.get(pid, 0), value)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        try:
            yield result
        finally:
            stop.set()
            sampler.join()
            time.sleep(0)
            user, kernel = tree_cpu_split(pids)
            result.cpu_user = user - start_user
            result.cpu = result.cpu_user + kernel - start_kernel
            hwm = _tree_hwm(pids) if reset else {}
            each = {pid: max(peak_each.get(pid, 0), hwm.get(pid, 0)) for pid in pids}
            result.peak_rss_each = max(each.values(), default=0)
            result.peak_rss = max(peak_sum, result.peak_rss_each)
            result.processes = len(pids)
            with self._lock:
                stats.peak_rss = max(stats.peak_rss, result.peak_rss)
                stats.peak_rss_each = max(stats.peak_rss_each, result.peak_rss_each)
            stats.phases[label] = result
