"""``python -m bench.startup``: start-up of a proxy over a large cache directory.

Makes ``--blobs`` small committed blobs directly on disk (``blobs/sha256/<2>/<hex>``, as
the store lays them out), starts ``registry-proxy serve`` on it (the upstream an unused
port: start-up must not need it), and prints how long after the process was started

- ``/v2/`` first answered 200 (serving does not wait for the directory walk), and
- ``/readyz`` first reported ``cache.indexed: true`` (the walk counted every file),

polling every 10 ms. Run from the repository root in the project's virtual environment.
The scratch directory is removed afterwards unless ``--keep``; the proxy is stopped by
its PID.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

from bench.servers import proxy_binary
from tests.rig.process import free_port

POLL = 0.01
DEADLINE = 120.0


def make_blobs(root: Path, count: int) -> None:
    blobs = root / "blobs" / "sha256"
    for i in range(count):
        data = f"blob {i}\n".encode()
        hex_ = hashlib.sha256(data).hexdigest()
        folder = blobs / hex_[:2]
        if i < 256 * 2:  # the 256 prefixes all appear early on
            folder.mkdir(parents=True, exist_ok=True)
        path = folder / hex_
        try:
            path.write_bytes(data)
        except FileNotFoundError:
            folder.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)


def get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=1) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return 0, b""


def measure(cache: Path) -> dict[str, float | int]:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    argv = [
        proxy_binary(),
        "serve",
        "--listen",
        f"127.0.0.1:{port}",
        "--cache-dir",
        str(cache),
        "--upstream",
        f"http://127.0.0.1:{free_port()}",
        "--log-level",
        "warning",
    ]
    started = time.perf_counter()
    process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        v2 = indexed = None
        files = 0
        while time.perf_counter() - started < DEADLINE and indexed is None:
            if v2 is None and get(base + "/v2/")[0] == 200:
                v2 = time.perf_counter() - started
            if v2 is not None:
                status, body = get(base + "/readyz")
                if status == 200:
                    report = json.loads(body)["cache"]
                    if report.get("indexed"):
                        indexed = time.perf_counter() - started
                        files = int(report["files"])
            time.sleep(POLL)
        if v2 is None or indexed is None:
            raise SystemExit(f"the proxy did not start/index within {DEADLINE:.0f}s")
        return {"v2_seconds": v2, "indexed_seconds": indexed, "files": files}
    finally:
        process.terminate()
        process.wait(timeout=30)


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.startup", description=__doc__)
    parser.add_argument("--blobs", type=int, default=100_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--keep", action="store_true")
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="rp-bench-startup-"))
    try:
        cache = workdir / "cache"
        made = time.perf_counter()
        make_blobs(cache, args.blobs)
        print(f"made {args.blobs} blobs in {time.perf_counter() - made:.1f}s under {cache}")
        print(f"{'run':>4} {'/v2/ 200 (s)':>14} {'indexed (s)':>12} {'files':>8}")
        for run in range(1, args.repeats + 1):
            os.sync()
            result = measure(cache)
            print(
                f"{run:>4} {result['v2_seconds']:>14.2f} {result['indexed_seconds']:>12.2f}"
                f" {result['files']:>8}"
            )
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
