"""The deployment files load and agree with each other and with the proxy.

Every YAML under deploy/ and grafana/ and every JSON under grafana/ parses. Beyond that:
the Grafana provisioning and dashboard refer to each other and to the compose stack; the
compose stack's mounts, scrape target and environment are right; the Dockerfile's paths
and health check hold; and each kustomization builds (resolved here, as kustomize would:
resources, generators, images) into objects whose selectors, volumes, probes, config
paths and references match, with a proxy configuration that validates.
"""

from __future__ import annotations

import json
import re
import shlex
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

from proxy.routing import Router
from proxy.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
GRAFANA = ROOT / "grafana"
KUBERNETES = DEPLOY / "kubernetes"
DASHBOARD = GRAFANA / "dashboards" / "registry-proxy.json"
DATASOURCES = GRAFANA / "provisioning" / "datasources" / "prometheus.yaml"
DASHBOARD_PROVIDERS = GRAFANA / "provisioning" / "dashboards" / "registry-proxy.yaml"
COMPOSE = DEPLOY / "docker-compose.yml"
COMPOSE_PROMETHEUS = DEPLOY / "prometheus" / "prometheus.yml"
ALERTS = DEPLOY / "prometheus" / "alerts.yml"
DOCKERFILE = DEPLOY / "Dockerfile"
VENV = "/opt/registry-proxy"
KUSTOMIZATIONS = ("overlays/shared", "overlays/per-node", "sidecar")
PROXY_IMAGE = "registry-proxy"
PROXY_PORT = 5000
GRID_COLUMNS = 24

YAML_FILES = sorted(
    p for root in (DEPLOY, GRAFANA) for ext in ("yaml", "yml") for p in root.rglob(f"*.{ext}")
)
JSON_FILES = sorted(GRAFANA.rglob("*.json"))


def rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


# --------------------------------------------------------------------------- every file


def test_there_are_files_to_check() -> None:
    assert DASHBOARD in JSON_FILES
    assert {COMPOSE, COMPOSE_PROMETHEUS, DATASOURCES, DASHBOARD_PROVIDERS} <= set(YAML_FILES)


@pytest.mark.parametrize("path", YAML_FILES, ids=rel)
def test_yaml_file_loads(path: Path) -> None:
    documents = list(yaml.safe_load_all(path.read_text()))
    assert documents, f"{rel(path)} is empty"
    for document in documents:
        assert isinstance(document, dict), f"{rel(path)}: a document is not a mapping"


@pytest.mark.parametrize("path", JSON_FILES, ids=rel)
def test_json_file_loads(path: Path) -> None:
    assert isinstance(json.loads(path.read_text()), dict)


# --------------------------------------------------------------------------- grafana


def all_panels(panels: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for panel in panels:
        out.append(panel)
        out.extend(all_panels(panel.get("panels", [])))
    return out


def provisioned_datasource() -> dict[str, Any]:
    datasources = load_yaml(DATASOURCES)["datasources"]
    prometheus = [d for d in datasources if d["type"] == "prometheus"]
    assert len(prometheus) == 1
    return dict(prometheus[0])


def test_dashboard_datasources_are_the_provisioned_one() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    uid = provisioned_datasource()["uid"]
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    selector = variables["datasource"]
    assert selector["type"] == "datasource"
    assert selector["query"] == "prometheus"
    assert selector["current"]["value"] == uid
    allowed = {"${datasource}", uid}
    refs = [
        ("templating " + v["name"], v["datasource"])
        for v in dashboard["templating"]["list"]
        if "datasource" in v
    ]
    for panel in all_panels(dashboard["panels"]):
        if panel["type"] == "row":
            continue
        refs.append((panel["title"], panel["datasource"]))
        refs.extend((panel["title"], t["datasource"]) for t in panel["targets"])
    for where, ref in refs:
        assert ref == {"type": "prometheus", "uid": ref["uid"]}, where
        assert ref["uid"] in allowed, f"{where}: datasource uid {ref['uid']!r}"


def test_dashboard_panels_are_well_formed() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] and dashboard["title"]
    panels = all_panels(dashboard["panels"])
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "duplicate panel ids"
    cells: dict[tuple[int, int], str] = {}
    for panel in panels:
        grid = panel["gridPos"]
        assert grid["x"] >= 0 and grid["x"] + grid["w"] <= GRID_COLUMNS, panel["title"]
        for x in range(grid["x"], grid["x"] + grid["w"]):
            for y in range(grid["y"], grid["y"] + grid["h"]):
                other = cells.setdefault((x, y), panel["title"])
                assert other == panel["title"], f"{panel['title']!r} overlaps {other!r}"
        if panel["type"] == "row":
            continue
        assert panel.get("description"), f"{panel['title']!r} has no description"
        refs = [t["refId"] for t in panel["targets"]]
        assert refs and len(refs) == len(set(refs)), panel["title"]
        for target in panel["targets"]:
            assert "registry_proxy_" in target["expr"], panel["title"]


def test_dashboard_provider_reads_the_directory_compose_mounts() -> None:
    providers = load_yaml(DASHBOARD_PROVIDERS)["providers"]
    assert [p["type"] for p in providers] == ["file"]
    grafana = load_yaml(COMPOSE)["services"]["grafana"]
    mounts = dict(bind_mounts(grafana))
    assert mounts[GRAFANA / "dashboards"] == providers[0]["options"]["path"]
    assert mounts[GRAFANA / "provisioning"] == "/etc/grafana/provisioning"
    home = grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home == f"{providers[0]['options']['path']}/{DASHBOARD.name}"


# --------------------------------------------------------------------------- compose


def bind_mounts(service: dict[str, Any]) -> list[tuple[Path, str]]:
    """(host path resolved against deploy/, container path) of relative bind mounts."""
    out: list[tuple[Path, str]] = []
    for volume in service.get("volumes", []):
        source, target = volume.split(":")[:2]
        if source.startswith("."):
            out.append(((DEPLOY / source).resolve(), target))
    return out


def test_compose_stack_is_wired() -> None:
    compose = load_yaml(COMPOSE)
    services = compose["services"]
    assert set(services) >= {"registry-proxy", "redis", "prometheus", "grafana"}
    build = services["registry-proxy"]["build"]
    assert (DEPLOY / build["context"] / build["dockerfile"]).resolve() == DOCKERFILE
    for name, service in services.items():
        for source, _ in bind_mounts(service):
            assert source.exists(), f"{name}: {source} does not exist"
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if not source.startswith((".", "/")):
                assert source in compose["volumes"], f"{name}: volume {source} not declared"
    prometheus_mounts = dict(bind_mounts(services["prometheus"]))
    assert prometheus_mounts[COMPOSE_PROMETHEUS] == "/etc/prometheus/prometheus.yml"
    # The rule files, relative to prometheus.yml, are mounted beside it.
    for rule_file in load_yaml(COMPOSE_PROMETHEUS)["rule_files"]:
        assert prometheus_mounts[COMPOSE_PROMETHEUS.parent / rule_file] == (
            f"/etc/prometheus/{rule_file}"
        )
    # The datasource points at the prometheus service, the scrape at the proxy service.
    datasource = provisioned_datasource()
    assert datasource["url"] == "http://prometheus:9090"
    scrape = load_yaml(COMPOSE_PROMETHEUS)
    targets = [
        t for job in scrape["scrape_configs"] for s in job["static_configs"] for t in s["targets"]
    ]
    assert f"registry-proxy:{PROXY_PORT}" in targets
    assert datasource["jsonData"]["timeInterval"] == scrape["global"]["scrape_interval"]


def test_compose_environment_overrides_the_image_configuration() -> None:
    environment = load_yaml(COMPOSE)["services"]["registry-proxy"]["environment"]
    settings = Settings.from_mapping(
        load_yaml(DEPLOY / "registry-proxy.yaml"),
        environ={k: str(v) for k, v in environment.items()},
    )
    assert settings.redis_url == "redis://redis:6379/0"
    assert settings.listen_port == PROXY_PORT


def proxy_metric_names() -> set[str]:
    """Every sample name the proxy's metrics expose (counters with ``_total``,
    histograms with ``_bucket``/``_sum``/``_count``...)."""
    from prometheus_client import REGISTRY

    import proxy.metrics  # noqa: F401  # registers them

    return {
        sample.name
        for family in REGISTRY.collect()
        for sample in family.samples
        if sample.name.startswith("registry_proxy_")
    } | {
        family.name + suffix
        for family in REGISTRY.collect()
        if family.name.startswith("registry_proxy_")
        for suffix in ("", "_total", "_bucket", "_sum", "_count", "_info")
    }


def test_alert_rules_use_only_metrics_the_proxy_exposes() -> None:
    rules = load_yaml(ALERTS)
    names = proxy_metric_names()
    alerts = [rule for group in rules["groups"] for rule in group["rules"]]
    assert len(alerts) == 7
    for rule in alerts:
        used = set(re.findall(r"registry_proxy_[a-z_]+", rule["expr"]))
        assert used, rule["alert"]
        assert used <= names, (rule["alert"], used - names)
        assert rule["labels"]["severity"] in ("warning", "critical"), rule["alert"]
        assert rule["annotations"]["summary"] and rule["annotations"]["description"]
    tests = load_yaml(ALERTS.parent / "alerts.test.yml")
    tested = {
        case["alertname"]
        for test in tests["tests"]
        for case in test["alert_rule_test"]
        if case["exp_alerts"]
    }
    assert tested == {rule["alert"] for rule in alerts}, "every alert has a firing test"


# --------------------------------------------------------------------------- Dockerfile


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    out: list[tuple[str, str]] = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def test_dockerfile_paths_user_and_healthcheck() -> None:
    instructions = dockerfile_instructions()
    # COPY from the build context (a COPY --from=<stage> copies between stages).
    copies = [
        shlex.split(args)
        for word, args in instructions
        if word == "COPY" and not args.startswith("--from")
    ]
    for *sources, _ in copies:
        for source in sources:
            if not source.startswith("--"):
                assert (ROOT / source).exists(), f"COPY {source}: not in the repository"
    config = next(dest for *sources, dest in copies if "deploy/registry-proxy.yaml" in sources)
    cmd = json.loads(next(args for word, args in instructions if word == "CMD"))
    assert cmd[:2] == ["registry-proxy", "serve"]
    assert cmd[cmd.index("--config") + 1] == config
    settings = Settings.from_mapping(load_yaml(DEPLOY / "registry-proxy.yaml"), environ={})
    volume = json.loads(next(args for word, args in instructions if word == "VOLUME"))
    assert volume == [str(settings.cache_dir)]
    assert ("EXPOSE", str(settings.listen_port)) in instructions
    user = next(args for word, args in reversed(instructions) if word == "USER")
    assert user.split(":")[0] not in ("root", "0")
    health = next(args for word, args in instructions if word == "HEALTHCHECK")
    probe = json.loads(health[health.index("CMD") + len("CMD") :])
    assert probe[:2] == [f"{VENV}/bin/python", "-c"]
    compile(probe[2], "HEALTHCHECK", "exec")
    assert f"'127.0.0.1:{settings.listen_port}'" in probe[2] and "/healthz" in probe[2]
    assert "REGISTRY_PROXY_LISTEN" in probe[2]
    env = " ".join(args for word, args in instructions if word == "ENV")
    assert f"PATH={VENV}/bin:" in env
    # Both builders get the same allow-list: the classic one reads .dockerignore,
    # BuildKit deploy/Dockerfile.dockerignore.
    ignores = [
        [line for line in path.read_text().splitlines() if not line.startswith("#")]
        for path in (ROOT / ".dockerignore", DEPLOY / "Dockerfile.dockerignore")
    ]
    assert ignores[0] == ignores[1]
    for *sources, _ in copies:
        for source in sources:
            if not source.startswith("--"):
                assert f"!{source.rstrip('/')}" in {line.rstrip("/") for line in ignores[0]}


def test_dockerfile_needs_no_registry_but_its_base() -> None:
    """No ``# syntax=`` directive (BuildKit would fetch a frontend from Docker Hub), no
    BuildKit-only ``RUN --mount``; every stage starts from ``BASE_IMAGE`` (a build arg
    with the official slim image as its default)."""
    text = DOCKERFILE.read_text()
    assert not re.search(r"^#\s*syntax\s*=", text, flags=re.M | re.I)
    instructions = dockerfile_instructions()
    assert not any(word == "RUN" and "--mount" in args for word, args in instructions)
    args = [args for word, args in instructions if word == "ARG"]
    assert "BASE_IMAGE=python:3.12-slim" in args
    froms = [args.split()[0] for word, args in instructions if word == "FROM"]
    assert froms and set(froms) == {"${BASE_IMAGE}"}


# --------------------------------------------------------------------------- kubernetes


def kustomize(directory: Path) -> tuple[list[dict[str, Any]], dict[str, dict[str, str]]]:
    """The objects a kustomization produces, resolved the way kustomize does for what
    these files use (resources, directories, configMapGenerator, images); generated
    ConfigMaps keep their plain names. Also returns the generated ConfigMaps' files."""
    kustomization = load_yaml(directory / "kustomization.yaml")
    objects: list[dict[str, Any]] = []
    generated: dict[str, dict[str, str]] = {}
    for entry in kustomization.get("resources", []):
        path = (directory / entry).resolve()
        assert path.exists(), f"{rel(directory)}: resource {entry} does not exist"
        if path.is_dir():
            more, more_generated = kustomize(path)
            objects += more
            generated.update(more_generated)
        else:
            objects += [d for d in yaml.safe_load_all(path.read_text()) if d]
    for generator in kustomization.get("configMapGenerator", []):
        files = {Path(f).name: (directory / f).read_text() for f in generator["files"]}
        generated[generator["name"]] = files
        objects.append(
            {
                "apiVersion": "v1",
                "kind": "ConfigMap",
                "metadata": {"name": generator["name"]},
                "data": files,
            }
        )
    images = {i["name"]: f"{i['newName']}:{i['newTag']}" for i in kustomization.get("images", [])}
    for obj in objects:
        for container in pod_containers(obj):
            container["image"] = images.get(container["image"], container["image"])
        if "namespace" in kustomization and obj["kind"] != "Namespace":
            obj["metadata"]["namespace"] = kustomization["namespace"]
    return objects, generated


def pod_spec(obj: dict[str, Any]) -> dict[str, Any] | None:
    if obj["kind"] in ("Deployment", "DaemonSet", "StatefulSet", "Job"):
        spec: dict[str, Any] = obj["spec"]["template"]["spec"]
        return spec
    return None


def pod_containers(obj: dict[str, Any]) -> list[dict[str, Any]]:
    spec = pod_spec(obj)
    if spec is None:
        return []
    return [*spec.get("initContainers", []), *spec["containers"]]


def by_kind(objects: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [o for o in objects if o["kind"] == kind]


def proxy_containers(obj: dict[str, Any]) -> list[dict[str, Any]]:
    return [
        c for c in pod_containers(obj) if c.get("command", [])[:2] == ["registry-proxy", "serve"]
    ]


@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_kustomization_objects_are_consistent(name: str) -> None:
    objects, generated = kustomize(KUBERNETES / name)
    assert objects
    config_maps = {o["metadata"]["name"] for o in by_kind(objects, "ConfigMap")}
    workloads = [o for o in objects if pod_spec(o) is not None]
    assert workloads
    for obj in objects:
        assert obj["apiVersion"] and obj["kind"] and obj["metadata"]["name"], obj
    for workload in workloads:
        where = f"{name} {workload['kind']}/{workload['metadata']['name']}"
        spec = pod_spec(workload)
        assert spec is not None
        template_labels = workload["spec"]["template"]["metadata"].get("labels", {})
        if workload["kind"] != "Job":
            selector = workload["spec"]["selector"]["matchLabels"]
            assert selector.items() <= template_labels.items(), where
        volumes = {v["name"]: v for v in spec.get("volumes", [])}
        for container in pod_containers(workload):
            for mount in container.get("volumeMounts", []):
                assert mount["name"] in volumes, f"{where}: no volume {mount['name']}"
            ports = {p.get("name") for p in container.get("ports", [])}
            for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
                http = container.get(probe, {}).get("httpGet")
                if http is not None:
                    assert http["port"] in ports, f"{where}: {probe} port {http['port']}"
        for volume in volumes.values():
            if "configMap" in volume:
                assert volume["configMap"]["name"] in config_maps, f"{where}: {volume}"
        for container in proxy_containers(workload):
            assert container["image"].startswith("registry.example.com/"), f"{where}: image"
            check_proxy_container(where, container, volumes, generated)
    # Services and disruption budgets select the proxy pods.
    pod_labels = [o["spec"]["template"]["metadata"]["labels"] for o in workloads]
    for obj in by_kind(objects, "Service") + by_kind(objects, "PodDisruptionBudget"):
        selector = obj["spec"]["selector"]
        selector = selector.get("matchLabels", selector)
        assert any(selector.items() <= labels.items() for labels in pod_labels), obj


def check_proxy_container(
    where: str,
    container: dict[str, Any],
    volumes: dict[str, dict[str, Any]],
    generated: dict[str, dict[str, str]],
) -> None:
    """--config names a file of the mounted ConfigMap; that file is a valid configuration
    (with the container's REGISTRY_PROXY_* environment); the cache directory is mounted;
    HTTP probes ask /readyz (readiness) and /healthz (liveness)."""
    command = container["command"]
    config_path = Path(command[command.index("--config") + 1])
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    volume = volumes[mounts[str(config_path.parent)]]
    files = generated[volume["configMap"]["name"]]
    assert config_path.name in files, f"{where}: {config_path} not in the ConfigMap"
    environ = {e["name"]: e["value"] for e in container.get("env", []) if "value" in e}
    settings = Settings.from_mapping(yaml.safe_load(files[config_path.name]), environ=environ)
    assert str(settings.cache_dir) in mounts, f"{where}: cache dir not on a volume"
    assert settings.listen_port == PROXY_PORT
    for probe, path in (("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")):
        http = container.get(probe, {}).get("httpGet")
        if http is not None:
            assert http["path"] == path, f"{where}: {probe}"


def test_shared_overlay_replicas_share_redis() -> None:
    objects, _ = kustomize(KUBERNETES / "overlays" / "shared")
    (deployment,) = [o for o in by_kind(objects, "Deployment") if proxy_containers(o)]
    # The autoscaler owns the replica count (a replicas field would fight it).
    assert "replicas" not in deployment["spec"]
    (hpa,) = by_kind(objects, "HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": deployment["metadata"]["name"],
    }
    assert 2 <= hpa["spec"]["minReplicas"] < hpa["spec"]["maxReplicas"]
    (pdb,) = by_kind(objects, "PodDisruptionBudget")
    assert pdb["spec"]["maxUnavailable"] < hpa["spec"]["minReplicas"]
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    spread = deployment["spec"]["template"]["spec"]["topologySpreadConstraints"]
    assert {c["topologyKey"] for c in spread} == {
        "topology.kubernetes.io/zone",
        "kubernetes.io/hostname",
    }
    for constraint in spread:
        assert constraint["labelSelector"]["matchLabels"].items() <= labels.items()
    assert deployment["spec"]["template"]["metadata"]["annotations"]["prometheus.io/scrape"] == (
        "true"
    )
    (container,) = proxy_containers(deployment)
    env = {e["name"]: e.get("value") for e in container["env"]}
    redis_services = [s for s in by_kind(objects, "Service") if "redis" in s["metadata"]["name"]]
    (service,) = redis_services
    port = service["spec"]["ports"][0]["port"]
    assert env["REGISTRY_PROXY_REDIS"] == f"redis://{service['metadata']['name']}:{port}/0"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["resources"]["requests"] and container["resources"]["limits"]
    assert by_kind(objects, "PodDisruptionBudget")


def test_shared_overlay_replicas_form_a_cluster_and_restart_without_losing_pulls() -> None:
    """Each replica advertises its pod IP, reads the shared secret from a mounted Secret,
    and gets a preStop pause plus its shutdown_grace before the kubelet's SIGKILL."""
    objects, generated = kustomize(KUBERNETES / "overlays" / "shared")
    (deployment,) = [o for o in by_kind(objects, "Deployment") if proxy_containers(o)]
    spec = pod_spec(deployment)
    assert spec is not None
    (container,) = proxy_containers(deployment)
    env = {e["name"]: e for e in container["env"]}
    assert env["POD_IP"]["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP"
    # Kubernetes expands $(POD_IP) in a later variable's value.
    names = [e["name"] for e in container["env"]]
    assert names.index("POD_IP") < names.index("REGISTRY_PROXY_CLUSTER_ADVERTISE")
    assert env["REGISTRY_PROXY_CLUSTER_ADVERTISE"]["value"] == f"$(POD_IP):{PROXY_PORT}"
    environ = {name: e["value"] for name, e in env.items() if "value" in e}
    environ["REGISTRY_PROXY_CLUSTER_ADVERTISE"] = f"10.0.0.7:{PROXY_PORT}"
    command = container["command"]
    config = Path(command[command.index("--config") + 1])
    settings = Settings.from_mapping(
        yaml.safe_load(generated["registry-proxy"][config.name]), environ=environ
    )
    assert settings.cluster.enabled and settings.redis_url
    assert settings.cluster.advertise == f"http://10.0.0.7:{PROXY_PORT}"
    volumes = {v["name"]: v for v in spec["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    secret_file = settings.cluster.secret_file
    assert secret_file is not None
    assert "secret" in volumes[mounts[str(secret_file.parent)]]
    pause = container["lifecycle"]["preStop"]["exec"]["command"]
    assert pause[0] == "sleep"
    assert spec["terminationGracePeriodSeconds"] > int(pause[1]) + settings.shutdown_grace
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"


def test_per_node_overlay_serves_containerd_on_each_node() -> None:
    objects, generated = kustomize(KUBERNETES / "overlays" / "per-node")
    (daemonset,) = by_kind(objects, "DaemonSet")
    (container,) = proxy_containers(daemonset)
    host_ports = [p.get("hostPort") for p in container["ports"]]
    assert host_ports == [PROXY_PORT]
    (hosts,) = [
        c for c in by_kind(objects, "ConfigMap") if c["metadata"]["name"] == "containerd-hosts"
    ]
    settings = Settings.from_mapping(
        yaml.safe_load(generated["registry-proxy"]["registry-proxy.yaml"])
    )
    router = Router(settings.upstreams)
    for registry, text in hosts["data"].items():
        config = tomllib.loads(text)
        assert list(config["host"]) == [f"http://127.0.0.1:{PROXY_PORT}"], registry
        assert config["host"][f"http://127.0.0.1:{PROXY_PORT}"]["capabilities"] == [
            "pull",
            "resolve",
        ]
        # containerd sends ?ns=<registry>: the proxy must have an upstream for it.
        route = router.route("team/app", registry)
        assert route.upstream.host in config["server"], registry


def test_sidecar_job_pulls_through_its_own_proxy() -> None:
    objects, generated = kustomize(KUBERNETES / "sidecar")
    (job,) = by_kind(objects, "Job")
    spec = pod_spec(job)
    assert spec is not None
    (sidecar,) = proxy_containers(job)
    assert sidecar in spec["initContainers"] and sidecar["restartPolicy"] == "Always"
    settings = Settings.from_mapping(
        yaml.safe_load(generated["ci-registry-proxy"]["registry-proxy.yaml"])
    )
    assert settings.listen_host == "127.0.0.1"
    build = " ".join(" ".join(c.get("command", [])) for c in spec["containers"])
    assert f"docker://127.0.0.1:{settings.listen_port}/" in build
