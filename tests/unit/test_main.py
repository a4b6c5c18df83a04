"""The command line: ``check-config`` prints the effective settings or names the bad key;
``--version``; ``serve`` that cannot start says why in one line (exit 1, no traceback)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from proxy import __version__
from proxy.__main__ import EXIT_CONFIG_ERROR, EXIT_START_ERROR, main
from proxy.settings import ENV_PREFIX, OPTIONS

SECRET = "do-not-print-me"


@pytest.fixture
def config_file(tmp_path: Path) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(
        f"""\
listen: 127.0.0.1:5001
cache:
  dir: {tmp_path / "cache"}
upstreams:
  - name: local
    url: http://127.0.0.1:7001
    aliases: [registry.local]
    tag_ttl: 5m
    username: ci
    password: {SECRET}
""",
        encoding="utf-8",
    )
    return path


def test_check_config_prints_yaml_and_returns_0(
    config_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["check-config", "--config", str(config_file)]) == 0

    out, err = capsys.readouterr()
    assert err == ""
    assert SECRET not in out
    printed = yaml.safe_load(out)
    assert printed["listen"] == "127.0.0.1:5001"
    assert printed["cache"]["dir"] == str(tmp_path / "cache")
    (up,) = printed["upstreams"]
    assert up["name"] == "local"
    assert up["url"] == "http://127.0.0.1:7001"
    assert up["aliases"] == ["registry.local"]
    assert up["tag_ttl"] == 300.0
    assert up["default"] is True
    assert up["password"] == "<redacted>"


def test_check_config_applies_flags(config_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = [
        "check-config",
        "--config",
        str(config_file),
        "--listen",
        "127.0.0.1:6000",
        "--tag-ttl",
        "90s",
        "--log-level",
        "debug",
    ]
    assert main(argv) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["listen"] == "127.0.0.1:6000"
    assert printed["log_level"] == "debug"
    assert printed["upstreams"][0]["tag_ttl"] == 90.0


def test_bad_file_value_returns_2_and_names_the_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "config.yaml"
    path.write_text("upstreams:\n  - name: x\n    url: ftp://example.com\n", encoding="utf-8")

    assert main(["check-config", "--config", str(path)]) == EXIT_CONFIG_ERROR == 2

    out, err = capsys.readouterr()
    assert out == ""
    assert "upstreams[0].url" in err


def test_bad_environment_value_names_the_variable(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("REGISTRY_PROXY_LOG_LEVEL", "loud")
    assert main(["check-config"]) == 2
    assert "REGISTRY_PROXY_LOG_LEVEL" in capsys.readouterr().err


def test_bad_flag_names_the_flag(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check-config", "--tag-ttl", "soon"]) == 2
    assert "--tag-ttl" in capsys.readouterr().err


def test_memory_entries_flag_and_variable(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("REGISTRY_PROXY_MEMORY_ENTRIES", "500")
    assert main(["check-config"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["cache"]["memory_entries"] == 500
    assert main(["check-config", "--memory-entries", "0"]) == 2
    assert "--memory-entries" in capsys.readouterr().err
    monkeypatch.setenv("REGISTRY_PROXY_MEMORY_ENTRIES", "many")
    assert main(["check-config"]) == 2
    assert "REGISTRY_PROXY_MEMORY_ENTRIES" in capsys.readouterr().err


def test_help_lists_a_flag_for_every_option(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    out = capsys.readouterr().out
    for option in OPTIONS:
        assert option.flag in out
        assert option.key.help in " ".join(out.split())


def test_missing_config_file_returns_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check-config", "--config", str(tmp_path / "absent.yaml")]) == 2
    assert "--config" in capsys.readouterr().err


def test_no_command_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main([])
    assert info.value.code == 2
    assert "usage" in capsys.readouterr().err


def _clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith(ENV_PREFIX)}


def test_console_script_entry_point(config_file: Path) -> None:
    script = shutil.which("registry-proxy", path=str(Path(sys.executable).parent))
    assert script is not None, "the registry-proxy console script is not installed"
    result = subprocess.run(
        [script, "check-config", "--config", str(config_file)],
        capture_output=True,
        text=True,
        env=_clean_env(),
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert yaml.safe_load(result.stdout)["upstreams"][0]["name"] == "local"


def test_python_dash_m_proxy_reports_errors_with_exit_2(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text("log_level: loud\n", encoding="utf-8")
    result = subprocess.run(
        [sys.executable, "-m", "proxy", "check-config", "--config", str(path)],
        capture_output=True,
        text=True,
        env=_clean_env(),
        timeout=60,
        check=False,
    )
    assert result.returncode == 2
    assert "log_level" in result.stderr
    assert result.stdout == ""


def test_version_prints_the_package_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out == f"registry-proxy {__version__}\n"


def serve_and_fail(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """``python -m proxy serve ARGS`` as a newcomer runs it; it must exit on its own."""
    return subprocess.run(
        [sys.executable, "-m", "proxy", "serve", *args],
        capture_output=True,
        text=True,
        env=_clean_env(),
        cwd=tmp_path,
        timeout=60,
        check=False,
    )


def assert_one_clean_line(result: subprocess.CompletedProcess[str], *words: str) -> None:
    assert result.returncode == EXIT_START_ERROR == 1, (result.returncode, result.stderr)
    assert "Traceback" not in result.stderr, result.stderr
    (line,) = [line for line in result.stderr.splitlines() if "registry-proxy:" in line]
    assert line.startswith("registry-proxy: "), result.stderr
    for word in words:
        assert word in line, (word, line)


def test_serve_on_a_port_in_use_exits_1_with_one_line(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = serve_and_fail(
            tmp_path, "--listen", f"127.0.0.1:{port}", "--cache-dir", str(tmp_path / "cache")
        )
    assert_one_clean_line(result, "cannot start", str(port), "address already in use")


@pytest.mark.parametrize("where", ["under-a-file", "under-proc"])
def test_serve_with_an_uncreatable_cache_dir_exits_1_with_one_line(
    tmp_path: Path, where: str
) -> None:
    if where == "under-a-file":
        (tmp_path / "a-file").write_text("")
        cache = tmp_path / "a-file" / "cache"
    else:
        cache = Path("/proc/registry-proxy-absent/cache")
    result = serve_and_fail(tmp_path, "--listen", "127.0.0.1:0", "--cache-dir", str(cache))
    assert_one_clean_line(result, "cannot create cache directory", str(cache))
