"""Every kustomization under deploy/kubernetes rendered by the real ``kubectl kustomize``,
and the rendered objects checked: references resolve (generated ConfigMaps with their
hashed names), ports agree with the proxy's configuration, every HTTP probe asks a path
that a proxy running that very configuration answers 200, and the per-node overlay's
containerd hosts.toml files are the README's (deploy/containerd/) with the node-local
proxy address.

tests/unit/test_deploy_manifests.py checks the same files without kubectl; this is what
``kubectl apply -k`` would send.
"""

from __future__ import annotations

import subprocess
import tomllib
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from proxy.settings import Settings
from tests.rig.process import free_port
from tests.rig.proxy_app import serve_proxy

from .binaries import binary_or_skip

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
KUBERNETES = ROOT / "deploy" / "kubernetes"
CONTAINERD = ROOT / "deploy" / "containerd"
KUBECTL_BINARY = "/usr/bin/kubectl"
KUSTOMIZATIONS = ("base", "overlays/shared", "overlays/per-node", "sidecar")
NAMESPACED = {"ConfigMap", "Service", "Deployment", "DaemonSet", "Job", "PodDisruptionBudget"}
WORKLOADS = ("Deployment", "DaemonSet", "StatefulSet", "Job")
DOCUMENTED_MIRROR = "http://registry-proxy.internal:5000"
NODE_LOCAL_MIRROR = "http://127.0.0.1:5000"


def render(name: str) -> list[dict[str, Any]]:
    result = subprocess.run(
        [binary_or_skip(KUBECTL_BINARY), "kustomize", str(KUBERNETES / name)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def of_kind(objects: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [o for o in objects if o["kind"] == kind]


def pod_spec(obj: dict[str, Any]) -> dict[str, Any]:
    spec: dict[str, Any] = obj["spec"]["template"]["spec"]
    return spec


def containers(obj: dict[str, Any]) -> list[dict[str, Any]]:
    spec = pod_spec(obj)
    return [*spec.get("initContainers", []), *spec["containers"]]


def is_proxy(container: dict[str, Any]) -> bool:
    return bool(container.get("command", [])[:2] == ["registry-proxy", "serve"])


def proxy_settings(
    objects: list[dict[str, Any]], workload: dict[str, Any], container: dict[str, Any]
) -> tuple[dict[str, Any], Settings]:
    """The configuration file the container's ``--config`` names, read from the rendered
    ConfigMap mounted there, and the settings it gives with the container's env."""
    command = container["command"]
    config_path = Path(command[command.index("--config") + 1])
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod_spec(workload)["volumes"]}
    config_map_name = volumes[mounts[str(config_path.parent)]]["configMap"]["name"]
    (config_map,) = [
        c for c in of_kind(objects, "ConfigMap") if c["metadata"]["name"] == (config_map_name)
    ]
    mapping: dict[str, Any] = yaml.safe_load(config_map["data"][config_path.name])
    environ = {e["name"]: e["value"] for e in container.get("env", []) if "value" in e}
    return mapping, Settings.from_mapping(mapping, environ=environ)


@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_kustomization_renders_with_resolved_references(name: str) -> None:
    objects = render(name)
    assert objects
    config_maps = {c["metadata"]["name"] for c in of_kind(objects, "ConfigMap")}
    # A kustomization that names a namespace puts everything in it (the sidecar Job
    # names none: it goes where the CI's jobs go).
    namespace = yaml.safe_load((KUBERNETES / name / "kustomization.yaml").read_text()).get(
        "namespace"
    )
    assert (namespace is None) == (name == "sidecar")
    for obj in objects:
        if obj["kind"] in NAMESPACED:
            assert obj["metadata"].get("namespace") == namespace, obj["metadata"]
    for workload in (o for o in objects if o["kind"] in WORKLOADS):
        for volume in pod_spec(workload).get("volumes", []):
            if "configMap" in volume:
                # kustomize renamed the generated ConfigMap (content hash) everywhere.
                assert volume["configMap"]["name"] in config_maps, volume
        for container in containers(workload):
            if is_proxy(container) or container["image"].endswith("registry-proxy:0.1.0"):
                assert container["image"] == "registry.example.com/registry-proxy:0.1.0"


@pytest.mark.parametrize("name", ["overlays/shared", "overlays/per-node", "sidecar"])
async def test_probes_and_ports_agree_with_a_running_proxy(
    name: str, tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    """Each proxy container's configuration, served for real (cache in a temp dir, an
    unreachable upstream), answers 200 on every HTTP probe path, on the port the probes,
    the container port, the Service and the scrape annotation all name."""
    objects = render(name)
    proxies = [
        (workload, container)
        for workload in objects
        if workload["kind"] in WORKLOADS
        for container in containers(workload)
        if is_proxy(container)
    ]
    assert proxies
    for workload, container in proxies:
        where = f"{name} {workload['kind']}/{workload['metadata']['name']}"
        mapping, settings = proxy_settings(objects, workload, container)
        ports = {p["name"]: p for p in container.get("ports", [])}
        for port in ports.values():
            assert port["containerPort"] == settings.listen_port, where
            if "hostPort" in port:
                assert port["hostPort"] == settings.listen_port, where
        annotations = workload["spec"]["template"]["metadata"].get("annotations", {})
        if "prometheus.io/port" in annotations:
            assert annotations["prometheus.io/port"] == str(settings.listen_port), where
        probes: list[str] = []
        for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
            probe = container.get(kind, {}).get("httpGet")
            if probe is not None:
                port = probe["port"]
                assert (ports[port]["containerPort"] if port in ports else port) == (
                    settings.listen_port
                ), f"{where}: {kind}"
                probes.append(probe["path"])
        if container.get("readinessProbe", {}).get("httpGet"):
            assert container["readinessProbe"]["httpGet"]["path"] == "/readyz", where

        served = {
            **mapping,
            "listen": "127.0.0.1:0",
            "cache": {**mapping["cache"], "dir": str(tmp_path / "cache"), "redis": None},
            "upstreams": [
                {**up, "url": f"http://127.0.0.1:{free_port()}"} for up in mapping["upstreams"]
            ],
        }
        served["cache"] = {k: v for k, v in served["cache"].items() if v is not None}
        proxy = await serve_proxy(served)
        try:
            for path in probes:
                async with http.get(proxy.url + path) as response:
                    assert response.status == 200, f"{where}: {path} -> {response.status}"
        finally:
            await proxy.server.stop()

    for service in of_kind(objects, "Service"):
        selector = service["spec"]["selector"]
        backends = [
            (w, c)
            for w, c in proxies
            if selector.items() <= w["spec"]["template"]["metadata"]["labels"].items()
        ]
        for _, container in backends:
            names = {p["name"]: p["containerPort"] for p in container["ports"]}
            for port in service["spec"]["ports"]:
                assert port["targetPort"] in names, service["metadata"]["name"]


def active_hosts_toml(path: Path) -> dict[str, Any]:
    """A deploy/containerd hosts.toml without its comments (the active block)."""
    return tomllib.loads(path.read_text())


def test_per_node_hosts_toml_are_the_readmes_with_the_node_local_proxy() -> None:
    objects = render("overlays/per-node")
    (hosts,) = [
        c for c in of_kind(objects, "ConfigMap") if "containerd-hosts" in (c["metadata"]["name"])
    ]
    assert set(hosts["data"]) == {"docker.io", "ghcr.io", "quay.io"}
    for registry, text in hosts["data"].items():
        documented = (CONTAINERD / registry / "hosts.toml").read_text()
        expected = tomllib.loads(documented.replace(DOCUMENTED_MIRROR, NODE_LOCAL_MIRROR))
        assert tomllib.loads(text) == expected, registry
    # The DaemonSet's init container installs exactly these, from the rendered ConfigMap.
    (daemonset,) = of_kind(objects, "DaemonSet")
    volumes = {v["name"]: v for v in pod_spec(daemonset)["volumes"]}
    assert volumes["containerd-hosts"]["configMap"]["name"] == hosts["metadata"]["name"]
