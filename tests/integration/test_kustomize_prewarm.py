"""deploy/kubernetes/prewarm rendered by the real ``kubectl kustomize``: the Job lands in
the proxy's namespace with the generated (hash-named) image list mounted, the image
rewritten, and a command the CLI parses."""

from __future__ import annotations

from proxy.__main__ import _parser
from tests.integration.test_kustomize import containers, of_kind, pod_spec, render


def test_the_prewarm_job_renders_with_its_image_list() -> None:
    objects = render("prewarm")
    (job,) = of_kind(objects, "Job")
    (config_map,) = of_kind(objects, "ConfigMap")
    assert job["metadata"]["namespace"] == config_map["metadata"]["namespace"] == "registry-proxy"
    (container,) = containers(job)
    assert container["image"] == "registry.example.com/registry-proxy:0.1.0"
    args = _parser().parse_args(container["command"][1:])
    (volume,) = pod_spec(job)["volumes"]
    assert volume["configMap"]["name"] == config_map["metadata"]["name"]  # renamed alike
    folder, _, name = args.file.rpartition("/")
    (mount,) = container["volumeMounts"]
    assert mount["mountPath"] == folder and name in config_map["data"]
