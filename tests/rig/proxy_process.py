"""The proxy under test as a child process: ``python -m proxy serve --config FILE``.

For what the in-loop proxy (``proxy_app``) cannot show: a SIGKILL in the middle of a
write and a restart on the same directory, a lower open-files limit (``open_files``,
set in the child before it starts), the process's own log, RSS and file descriptors.
Stopped by its PID like every child of the rig.
"""

from __future__ import annotations

import os
import resource
import signal
import sys
import urllib.error
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from prometheus_client.parser import text_string_to_metric_families

from .process import ChildProcess, LoopbackAddress, free_port


class ProxyProcess(ChildProcess, LoopbackAddress):
    """``python -m proxy serve`` with the settings ``mapping`` (``listen`` is set here)."""

    name = "registry-proxy"

    def __init__(
        self,
        workdir: Path,
        mapping: Mapping[str, Any],
        *,
        open_files: int | None = None,
    ) -> None:
        super().__init__(workdir, log_name="proxy.log")
        self.port = free_port()
        self.mapping = {**mapping, "listen": self.host}
        self.cache_dir = Path(self.mapping["cache"]["dir"])
        self.config_path = workdir / "config.yaml"
        self.config_path.write_text(yaml.safe_dump(self.mapping))
        if open_files is not None:
            limit = open_files

            def lower_limit() -> None:
                resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))

            self.preexec = lower_limit

    def argv(self) -> list[str]:
        return [sys.executable, "-m", "proxy", "serve", "--config", str(self.config_path)]

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(self.url + "/v2/", timeout=1) as response:
                return bool(response.status == 200)
        except (urllib.error.URLError, OSError):
            return False

    def kill(self) -> None:
        """SIGKILL (no clean-up of any kind), reaped; ``start()`` brings it back."""
        process, self.process = self.process, None
        if process is not None and process.poll() is None:
            process.send_signal(signal.SIGKILL)
            process.wait(10)

    def metrics(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        """The proxy's /metrics: (sample name, sorted labels) -> value."""
        with urllib.request.urlopen(self.url + "/metrics", timeout=5) as response:
            text = response.read().decode()
        samples: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
        return samples

    def metric(self, name: str, **labels: str) -> float:
        return self.metrics().get((name, tuple(sorted(labels.items()))), 0.0)

    def rss_bytes(self) -> int:
        assert self.pid is not None
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        return 0

    def open_fds(self) -> int:
        assert self.pid is not None
        return len(os.listdir(f"/proc/{self.pid}/fd"))

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""
