"""The alerting rules (deploy/prometheus/alerts.yml) pass ``promtool check rules`` and
their unit tests (alerts.test.yml) pass ``promtool test rules``; the compose stack's
Prometheus loads them (``promtool check config`` follows ``rule_files``)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.rig.prometheus import PROMTOOL_BINARY

from .binaries import binary_or_skip

pytestmark = pytest.mark.integration

PROMETHEUS_DIR = Path(__file__).resolve().parents[2] / "deploy" / "prometheus"


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [binary_or_skip(PROMTOOL_BINARY), *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        cwd=PROMETHEUS_DIR,
    )


def test_promtool_checks_the_alert_rules() -> None:
    result = promtool("check", "rules", "alerts.yml")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: 7 rules found" in result.stdout, result.stdout


def test_promtool_runs_the_alert_unit_tests() -> None:
    result = promtool("test", "rules", "alerts.test.yml")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout, result.stdout


def test_compose_prometheus_config_loads_the_rules() -> None:
    result = promtool("check", "config", "prometheus.yml")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "alerts.yml" in result.stdout and "SUCCESS: 7 rules found" in result.stdout
