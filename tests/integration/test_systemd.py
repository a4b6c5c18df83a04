"""The systemd unit (deploy/systemd/registry-proxy.service) passes ``systemd-analyze
verify`` with nothing to say, and ``systemd-analyze security`` rates its exposure low.

``verify`` checks that ExecStart's program exists, so it runs against a scratch root
holding a stand-in ``/opt/registry-proxy/bin/registry-proxy`` (where the documented
``python3 -m venv /opt/registry-proxy`` puts it) and a copy of this machine's systemd
units (for the targets the unit orders itself after).
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from .binaries import binary_or_skip

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
UNIT = ROOT / "deploy" / "systemd" / "registry-proxy.service"
SYSTEMD_ANALYZE_BINARY = "/usr/bin/systemd-analyze"
SYSTEM_UNITS = Path("/lib/systemd/system")
EXEC_START = "/opt/registry-proxy/bin/registry-proxy"
# systemd-analyze security's scale is 0-10 (printed) and 0-100 (--threshold).
MAX_EXPOSURE = 15  # 1.5, "OK"


def analyze(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [binary_or_skip(SYSTEMD_ANALYZE_BINARY), *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_systemd_analyze_verify_has_nothing_to_say(tmp_path: Path) -> None:
    root = tmp_path / "root"
    program = root / EXEC_START.lstrip("/")
    program.parent.mkdir(parents=True)
    program.write_text("#!/bin/sh\n")
    program.chmod(0o755)
    shutil.copytree(SYSTEM_UNITS, root / "usr" / "lib" / "systemd" / "system", symlinks=True)
    units = root / "etc" / "systemd" / "system"
    units.mkdir(parents=True)
    shutil.copy(UNIT, units / UNIT.name)

    result = analyze(f"--root={root}", "verify", UNIT.name)
    # verify exits 0 on unknown keys and bad values too: it must print nothing.
    assert result.returncode == 0 and result.stdout + result.stderr == "", (
        result.stdout + result.stderr
    )


def test_systemd_analyze_security_rates_the_unit_ok() -> None:
    result = analyze("security", "--offline=yes", f"--threshold={MAX_EXPOSURE}", str(UNIT))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Overall exposure level" in result.stdout + result.stderr
