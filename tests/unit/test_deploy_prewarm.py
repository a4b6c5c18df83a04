"""deploy/kubernetes/prewarm: the pre-warm Job builds, and its command is one the CLI takes,
aimed at the shared proxy's Service with an admin password from a Secret."""

from __future__ import annotations

import yaml

from proxy.__main__ import _parser
from tests.unit.test_deploy_manifests import (
    KUBERNETES,
    by_kind,
    kustomize,
    pod_spec,
)
from tests.unit.test_deploy_manifests import (
    test_kustomization_objects_are_consistent as check_kustomization,
)


def test_the_prewarm_kustomization_is_consistent() -> None:
    check_kustomization("prewarm")


def test_the_prewarm_job_runs_the_cli_against_the_shared_service() -> None:
    objects, generated = kustomize(KUBERNETES / "prewarm")
    (job,) = by_kind(objects, "Job")
    spec = pod_spec(job)
    assert spec is not None
    (container,) = spec["containers"]
    assert container["image"].startswith("registry.example.com/")
    command = container["command"]
    assert command[:2] == ["registry-proxy", "prewarm"]
    args = _parser().parse_args(command[1:])
    assert args.all_platforms and args.user
    service = yaml.safe_load((KUBERNETES / "base" / "service.yaml").read_text())
    port = service["spec"]["ports"][0]["port"]
    assert (
        args.url == f"http://{service['metadata']['name']}.registry-proxy.svc.cluster.local:{port}"
    )
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    folder, _, name = args.file.rpartition("/")
    volume = next(v for v in spec["volumes"] if v["name"] == mounts[folder])
    images = generated[volume["configMap"]["name"]][name]
    refs = [line for line in images.splitlines() if line and not line.startswith("#")]
    assert refs and all(":" in ref for ref in refs)
    (password,) = [e for e in container["env"] if e["name"] == "REGISTRY_PROXY_ADMIN_PASSWORD"]
    assert password["valueFrom"]["secretKeyRef"]["name"] == "registry-proxy-admin"
