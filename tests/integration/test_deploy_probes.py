"""The ``python -c`` health probes of the deployment files work against a real proxy:
the Dockerfile's HEALTHCHECK and the sidecar Job's exec probes (the slim image has no
curl). Each must exit 0 while the proxy serves and non-zero when nothing listens."""

from __future__ import annotations

import asyncio
import json
import re
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.rig.process import free_port
from tests.rig.proxy_app import ProxyFactory

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "deploy" / "Dockerfile"
SIDECAR_JOB = ROOT / "deploy" / "kubernetes" / "sidecar" / "ci-job.yaml"
PROBED_ADDRESS = "127.0.0.1:5000"
PROBE_TIMEOUT = 30.0


def dockerfile_probe() -> str:
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    (line,) = [line for line in text.splitlines() if line.startswith("HEALTHCHECK")]
    argv: list[str] = json.loads(line[line.index("CMD") + len("CMD") :])
    assert argv[:2] == ["/opt/registry-proxy/bin/python", "-c"]
    return argv[2]


def sidecar_probes() -> list[str]:
    probes: list[str] = []
    for document in yaml.safe_load_all(SIDECAR_JOB.read_text()):
        if document["kind"] != "Job":
            continue
        spec: dict[str, Any] = document["spec"]["template"]["spec"]
        for container in spec.get("initContainers", []) + spec["containers"]:
            for name in ("startupProbe", "readinessProbe", "livenessProbe"):
                command = container.get(name, {}).get("exec", {}).get("command")
                if command is not None:
                    assert command[:2] == ["python", "-c"], command
                    probes.append(command[2])
    return probes


PROBES = [("Dockerfile HEALTHCHECK", dockerfile_probe())] + [
    (f"sidecar probe {i}", code) for i, code in enumerate(sidecar_probes())
]


async def run_probe(code: str, address: str) -> int:
    assert PROBED_ADDRESS in code
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        code.replace(PROBED_ADDRESS, address),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    try:
        async with asyncio.timeout(PROBE_TIMEOUT):
            return await process.wait()
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


@pytest.mark.parametrize(("name", "code"), PROBES, ids=[name for name, _ in PROBES])
async def test_probe_passes_on_a_serving_proxy_and_fails_without_one(
    name: str, code: str, proxy_factory: ProxyFactory
) -> None:
    # /healthz and /readyz answer without asking the upstream: none needs to exist.
    proxy = await proxy_factory(f"http://127.0.0.1:{free_port()}")
    assert await run_probe(code, proxy.host) == 0, name
    assert await run_probe(code, f"127.0.0.1:{free_port()}") != 0, name
