"""``./run``, the README's first command, as a newcomer runs it: it serves on the
embedded defaults (Docker Hub as the default upstream) and stops on SIGTERM; on a port
that is taken it says so in one line and exits 1.

The listen address and cache directory are given (5000 and the working directory are
not the test's to take); everything else is the built-in configuration.
"""

from __future__ import annotations

import json
import socket
import subprocess
import urllib.request
from pathlib import Path

import pytest

from tests.rig.process import ChildProcess, free_port

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]


class RunScript(ChildProcess):
    name = "run"
    start_timeout = 120.0  # a first ./run installs into .venv

    def __init__(self, workdir: Path, port: int) -> None:
        super().__init__(workdir)
        self.port = port

    def argv(self) -> list[str]:
        cache = self.workdir / "cache"
        return [
            "sh",
            str(ROOT / "run"),
            "--listen",
            f"127.0.0.1:{self.port}",
            "--cache-dir",
            str(cache),
        ]

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/healthz", timeout=1) as r:
                return bool(r.status == 200)
        except OSError:
            return False


def test_run_serves_on_the_embedded_defaults(tmp_path: Path) -> None:
    with RunScript(tmp_path, free_port()) as served:
        with urllib.request.urlopen(f"http://127.0.0.1:{served.port}/readyz", timeout=5) as r:
            ready = json.loads(r.read())
        assert (tmp_path / "cache").is_dir()
        assert "dockerhub" in json.dumps(ready), ready
        process = served.process
        assert process is not None
    # Stopped by SIGTERM (``exec``: the PID is the proxy's), with status 0.
    assert process.returncode == 0, served.log_tail()


def test_run_on_a_port_in_use_says_so_in_one_line(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run(
            [
                "sh",
                str(ROOT / "run"),
                "--listen",
                f"127.0.0.1:{port}",
                "--cache-dir",
                str(tmp_path),
            ],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert "registry-proxy: cannot start:" in result.stderr
    assert "address already in use" in result.stderr
