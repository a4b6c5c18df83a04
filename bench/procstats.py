"""RSS and CPU of the server processes, read from /proc (Linux only, no dependencies).

- Over the whole run: a sampling thread keeps each process's highest RSS; at the end the
  kernel's own high-water mark (``VmHWM``) is read as well, and the larger one reported.
  CPU seconds are utime + stime from ``/proc/PID/stat``.
- Over one phase (:meth:`Monitor.phase`): the kernel's high-water mark is reset first
  (``echo 5 > /proc/PID/clear_refs``), so ``VmHWM`` at the end is that phase's exact peak,
  and CPU seconds are the difference across the phase.
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


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat", "rb") as f:
        fields = f.read().rsplit(b")", 1)[1].split()
    # after the comm field: state is fields[0], utime is field 14 overall -> index 11
    return (int(fields[11]) + int(fields[12])) / TICKS


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/statm", "rb") as f:
        return int(f.read().split()[1]) * PAGE


def hwm_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status", "rb") as f:
        for line in f:
            if line.startswith(b"VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


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
    cpu: float = 0.0


@dataclass
class ProcessStats:
    pid: int
    peak_rss: int = 0
    cpu: float = 0.0
    phases: dict[str, PhaseStats] = field(default_factory=dict)


class Monitor:
    """Samples the RSS of named processes every ``interval`` seconds in a thread."""

    def __init__(self, interval: float = 0.05) -> None:
        self.interval = interval
        self.procs: dict[str, ProcessStats] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="procstats", daemon=True)

    def add(self, name: str, pid: int) -> None:
        with self._lock:
            self.procs[name] = ProcessStats(pid)

    def start(self) -> None:
        self._thread.start()

    def _sample(self) -> None:
        with self._lock:
            for stats in self.procs.values():
                with contextlib.suppress(OSError):
                    stats.peak_rss = max(stats.peak_rss, rss_bytes(stats.pid))

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def finish(self) -> None:
        """Stop sampling and take the final CPU and high-water readings (processes alive)."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        self._sample()
        for stats in self.procs.values():
            try:
                stats.peak_rss = max(stats.peak_rss, hwm_bytes(stats.pid))
                stats.cpu = cpu_seconds(stats.pid)
            except OSError:
                pass

    @contextmanager
    def phase(self, label: str, name: str) -> Iterator[PhaseStats]:
        """Exact peak RSS and CPU seconds of process ``name`` while the block runs."""
        stats = self.procs[name]
        result = PhaseStats()
        with self._lock:
            # keep the run's peak: take the high-water mark before resetting it
            stats.peak_rss = max(stats.peak_rss, hwm_bytes(stats.pid))
            reset = reset_hwm(stats.pid)
        start_cpu = cpu_seconds(stats.pid)
        peak = 0
        stop = threading.Event()

        def sample() -> None:
            nonlocal peak
            while not stop.wait(0.02):
                try:
                    peak = max(peak, rss_bytes(stats.pid))
                except OSError:
                    return

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        try:
            yield result
        finally:
            stop.set()
            sampler.join()
            time.sleep(0)
            result.cpu = cpu_seconds(stats.pid) - start_cpu
            hwm = hwm_bytes(stats.pid) if reset else 0
            result.peak_rss = max(peak, hwm)
            with self._lock:
                stats.peak_rss = max(stats.peak_rss, result.peak_rss)
            stats.phases[label] = result
