"""The README's two front-door commands, ``./run`` and ``./test``, are what the README
shows, ``.ci/run`` is ``./test``, and ``./test`` makes sure of every binary a test asks
for (``*_BINARY`` in tests/), so that a fresh machine gets them all."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"


def sh_array(script: str, name: str) -> list[str]:
    """The words of every ``name=( ... )`` and ``name+=( ... )`` in a bash script."""
    words: list[str] = []
    for body in re.findall(rf"^{name}\+?=\(\s*(.*?)\)", script, flags=re.M | re.S):
        words += body.split()
    return words


def readme_section(title: str) -> str:
    text = README.read_text()
    start = text.index(f"## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start:end]


def test_readme_front_doors_are_run_and_test() -> None:
    assert readme_section("Run").split("```sh\n")[1].startswith("./run\n```")
    assert readme_section("Test").split("```sh\n")[1].startswith("./test\n```")
    for script in ("run", "test"):
        path = ROOT / script
        assert path.stat().st_mode & 0o111, f"{script} is not executable"


def test_ci_runs_the_readmes_test_command() -> None:
    lines = [
        line.strip()
        for line in (ROOT / ".ci" / "run").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert lines[-1] == "exec ./test"


def test_test_script_checks_every_binary_the_tests_use() -> None:
    script = (ROOT / "test").read_text()
    checked = set(sh_array(script, "binaries"))
    used = {
        Path(path).name
        for source in (ROOT / "tests").rglob("*.py")
        for path in re.findall(r'^[A-Z_]+_BINARY = "([^"]+)"', source.read_text(), flags=re.M)
    }
    assert len(used) >= 10, used
    assert used <= checked, used - checked
    assert {"mmdebstrap", "docker.io", "podman", "systemd"} <= set(sh_array(script, "packages"))


def test_run_serves_the_embedded_defaults() -> None:
    """./run passes its arguments to ``serve`` and nothing else: no --config."""
    script = (ROOT / "run").read_text()
    assert 'exec .venv/bin/registry-proxy serve "$@"' in script
    assert "--config" not in script.split("exec", 1)[1]
