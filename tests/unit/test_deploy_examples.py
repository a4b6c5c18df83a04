"""The runtime configurations in deploy/ load, and agree with each other and the README.

Every ``deploy/containerd/<registry>/hosts.toml`` (its active host and its commented
``override_path`` variant) must reach the upstream of ``deploy/registry-proxy.multi.yaml``
that serves ``<registry>``: by ``ns`` alone, or by ``ns`` plus a ``/v2/<upstream-name>``
prefix naming the same upstream.

The README's copy-paste client configurations (containerd's hosts.toml, Docker's
daemon.json, podman's registries.conf) are the files in deploy/, which are what the
integration tests run the clients with (the proxy's address put in).
"""

from __future__ import annotations

import json
import re
import tomllib
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from proxy.routing import Router
from proxy.settings import Settings
from tests.rig.containerd import hosts_toml

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
README = ROOT / "README.md"
MULTI = DEPLOY / "registry-proxy.multi.yaml"
REGISTRIES = ("docker.io", "ghcr.io", "quay.io", "registry.example.com")
EXPECTED_UPSTREAM = {
    "docker.io": "dockerhub",
    "ghcr.io": "ghcr",
    "quay.io": "quay",
    "registry.example.com": "private",
}


def load_multi(tmp_path: Path) -> Settings:
    """The multi-upstream example, with its password files pointed at temp files and its
    password variables supplied (both are read at start-up)."""
    data: dict[str, Any] = yaml.safe_load(MULTI.read_text())
    for index, upstream in enumerate(data["upstreams"]):
        if "password_file" in upstream:
            secret = tmp_path / f"secret-{index}"
            secret.write_text("s3cret\n")
            upstream["password_file"] = str(secret)
    environ = {
        upstream["password_env"]: "token"
        for upstream in data["upstreams"]
        if "password_env" in upstream
    }
    return Settings.from_mapping(data, environ=environ)


def commented_host_blocks(text: str) -> list[str]:
    """The commented-out ``[host."..."]`` blocks of a hosts.toml, uncommented."""
    blocks: list[list[str]] = []
    for line in text.splitlines():
        if line.startswith("# [host."):
            blocks.append([line[2:]])
        elif blocks and line.startswith("#   ") and not line[4:].lstrip().startswith("#"):
            blocks[-1].append(line[2:])
    return ["\n".join(block) for block in blocks]


def test_multi_upstream_example_loads_and_routes(tmp_path: Path) -> None:
    settings = load_multi(tmp_path)
    assert [u.name for u in settings.upstreams] == ["dockerhub", "ghcr", "quay", "private"]
    assert settings.default_upstream is not None
    assert settings.default_upstream.name == "dockerhub"
    router = Router(settings.upstreams)
    for registry, name in EXPECTED_UPSTREAM.items():
        assert router.route("team/app", registry).upstream.name == name
    assert router.route("nginx", "docker.io").repo == "library/nginx"
    assert router.route("ghcr/owner/app", None).upstream.name == "ghcr"
    assert router.route("nginx", None).upstream.name == "dockerhub"
    # The private upstream's password came from its file, and is never shown.
    private = next(u for u in settings.upstreams if u.name == "private")
    assert private.password == "s3cret"
    assert "s3cret" not in repr(settings) + repr(settings.to_dict())


@pytest.mark.parametrize("registry", REGISTRIES)
def test_containerd_hosts_toml_reaches_the_right_upstream(registry: str, tmp_path: Path) -> None:
    router = Router(load_multi(tmp_path).upstreams)
    text = (DEPLOY / "containerd" / registry / "hosts.toml").read_text()
    config = tomllib.loads(text)
    assert urlsplit(config["server"]).scheme == "https"
    variants = [config["host"], *(tomllib.loads(b)["host"] for b in commented_host_blocks(text))]
    assert len(variants) >= 2, "expected a host and a commented override_path variant"
    assert any(host.get("override_path") for variant in variants for host in variant.values())
    for variant in variants:
        for url, host in variant.items():
            assert host["capabilities"] == ["pull", "resolve"], url
            path = urlsplit(url).path
            if host.get("override_path"):
                # containerd uses the path as the API root: /v2/<upstream-name>.
                prefix = path.removeprefix("/v2/")
                assert path.startswith("/v2/") and "/" not in prefix, url
                name = f"{prefix}/team/app"
            else:
                assert path in ("", "/"), url
                name = "team/app"
            route = router.route(name, registry)
            assert route.upstream.name == EXPECTED_UPSTREAM[registry], url
            assert route.repo == "team/app", (url, route.repo)


def readme_blocks(language: str) -> list[str]:
    """The README's fenced code blocks in ``language``, de-indented."""
    blocks = re.findall(rf"^( *)```{language}\n(.*?)^\1```", README.read_text(), flags=re.M | re.S)
    return ["\n".join(line[len(indent) :] for line in body.splitlines()) for indent, body in blocks]


def test_readme_daemon_json_is_deploys() -> None:
    (block,) = [b for b in readme_blocks("json") if "registry-mirrors" in b]
    assert json.loads(block) == json.loads((DEPLOY / "docker" / "daemon.json").read_text())


def test_readme_podman_registries_conf_is_deploys() -> None:
    (block,) = [b for b in readme_blocks("toml") if "registry.mirror" in b]
    deployed = tomllib.loads((DEPLOY / "podman" / "registries.conf").read_text())
    assert tomllib.loads(block) == deployed
    assert deployed["registry"][0]["location"] == "docker.io"
    assert deployed["registry"][0]["mirror"] == [
        {"location": "registry-proxy.internal:5000", "insecure": True}
    ]


def test_readme_hosts_toml_is_deploys_and_the_rigs() -> None:
    """The README's docker.io hosts.toml is deploy/'s, and the one the containerd tests
    write (tests/rig/containerd.py), but for the addresses."""
    (block,) = [b for b in readme_blocks("toml") if "capabilities" in b]
    deployed = (DEPLOY / "containerd" / "docker.io" / "hosts.toml").read_text()
    assert tomllib.loads(block) == tomllib.loads(deployed)
    rig = hosts_toml("http://registry-proxy.internal:5000", "https://registry-1.docker.io")
    assert tomllib.loads(rig) == tomllib.loads(block)


def systemd_unit(path: Path) -> dict[str, dict[str, list[str]]]:
    """section -> key -> values (a key may repeat) of a systemd unit file."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] = {}
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), {})
            continue
        key, _, value = line.partition("=")
        current.setdefault(key, []).append(value)
    return sections


def test_systemd_unit_is_hardened_and_agrees_with_the_configuration() -> None:
    service = systemd_unit(DEPLOY / "systemd" / "registry-proxy.service")["Service"]
    argv = service["ExecStart"][0].split()
    assert argv[1:3] == ["serve", "--config"]
    config_path = Path(argv[3])
    assert config_path.parent == Path("/etc") / service["ConfigurationDirectory"][0]
    # The configuration installed there is deploy/registry-proxy.yaml: its cache.dir is
    # the unit's CacheDirectory, the one writable place besides the StateDirectory.
    settings = Settings.from_mapping(
        yaml.safe_load((DEPLOY / "registry-proxy.yaml").read_text()), environ={}
    )
    assert settings.cache_dir == Path("/var/cache") / service["CacheDirectory"][0]
    sysusers = (DEPLOY / "systemd" / "registry-proxy.sysusers").read_text().split("\n")
    (user_line,) = [line for line in sysusers if line.startswith("u ")]
    assert user_line.split()[1] == service["User"][0] == service["Group"][0]
    assert service["StateDirectory"] == service["CacheDirectory"]
    for key, value in {
        "ProtectSystem": "strict",
        "NoNewPrivileges": "yes",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
        "CapabilityBoundingSet": "",
        "RestrictSUIDSGID": "yes",
    }.items():
        assert service[key] == [value], key
    # A configuration error (exit 2) is not restarted.
    assert service["Restart"] == ["on-failure"]
    assert service["RestartPreventExitStatus"] == ["2"]
