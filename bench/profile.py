"""Sampling profiles of the proxy process with py-spy, taken while wrk loads it.

``py-spy record --format raw`` writes collapsed stacks (one line per stack,
``frame;frame;... count``; loadable in speedscope or flamegraph.pl). py-spy samples every
thread; the summary sets apart samples of idle threads (an executor worker waiting for
work, the loop in epoll) and ranks the rest: by self time (the leaf frame, with its line)
and inclusive time (anywhere on the stack), as a share of the busy samples.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import signal
import sys
from collections import Counter
from collections.abc import Awaitable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")
RATE = 250
ATTACH_SECONDS = 0.5

_STDLIB = re.compile(r"^.*/lib/python3\.\d+/")
PACKAGE = "proxy"
# Leaf frames of a thread with nothing to do: an executor worker waiting for work, the
# event loop waiting in epoll. Counted apart, so the tables show where busy time goes.
IDLE_LEAVES = (
    re.compile(r"^_worker \(concurrent/futures/thread\.py"),
    re.compile(r"^\w*Selector\.select \(selectors\.py"),
)
_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^():]+)(?::(?P<line>\d+))?\)$")


def py_spy() -> str | None:
    beside = Path(sys.executable).parent / "py-spy"
    return str(beside) if beside.exists() else shutil.which("py-spy")


@dataclass
class Profile:
    label: str
    path: Path
    samples: int = 0
    idle: int = 0
    self_time: Counter[str] = field(default_factory=Counter)
    inclusive: Counter[str] = field(default_factory=Counter)
    load: str = ""

    @property
    def busy(self) -> int:
        return self.samples - self.idle

    def top(self, counter: Counter[str], n: int = 12) -> list[tuple[str, float]]:
        """The ``n`` largest entries, as percentages of busy samples."""
        busy = max(1, self.busy)
        return [(k, 100.0 * v / busy) for k, v in counter.most_common(n)]


def _short(frame: str, *, with_line: bool) -> str:
    m = _FRAME.match(frame.strip())
    if m is None:
        return frame.strip()
    file = _STDLIB.sub("", m.group("file"))
    if "/site-packages/" in file:
        file = file.split("/site-packages/", 1)[1]
    elif f"/{PACKAGE}/" in file:
        file = PACKAGE + "/" + file.split(f"/{PACKAGE}/", 1)[1]
    line = f":{m.group('line')}" if with_line and m.group("line") else ""
    return f"{m.group('func')} ({file}{line})"


def summarize(label: str, path: Path) -> Profile:
    prof = Profile(label, path)
    for raw in path.read_text(errors="replace").splitlines():
        stack, _, count_text = raw.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [f for f in stack.split(";") if f.strip()]
        if not frames:
            continue
        prof.samples += count
        leaf = _short(frames[-1], with_line=True)
        if any(p.match(leaf) for p in IDLE_LEAVES):
            prof.idle += count
            continue
        prof.self_time[leaf] += count
        for name in {_short(f, with_line=False) for f in frames}:
            prof.inclusive[name] += count
    return prof


def _load(label: str, out: Path, stderr: str) -> Profile:
    if not out.exists():
        raise RuntimeError(f"py-spy wrote no profile: {stderr}")
    return summarize(label, out)


async def record(
    label: str, pid: int, out: Path, load: Awaitable[T], *, idle: bool = False
) -> Profile | None:
    """Profile ``pid`` while ``load`` runs (py-spy is stopped with SIGINT when it ends,
    and writes its stacks then); None if py-spy is not installed."""
    binary = py_spy()
    if binary is None:
        if isinstance(load, Coroutine):
            load.close()
        return None
    process = await asyncio.create_subprocess_exec(
        binary,
        "record",
        "--pid",
        str(pid),
        "--rate",
        str(RATE),
        "--full-filenames",
        *(["--idle"] if idle else []),
        "--format",
        "raw",
        "--output",
        str(out),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        await asyncio.sleep(ATTACH_SECONDS)  # let py-spy attach before the load starts
        result = await load
    finally:
        if process.returncode is None:
            os.kill(process.pid, signal.SIGINT)
        _, stderr = await process.communicate()
    prof = await asyncio.to_thread(_load, label, out, stderr.decode(errors="replace"))
    prof.load = str(result)
    return prof
