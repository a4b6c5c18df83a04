"""The client matrix shared by the engine tests (dockerd, podman, the container image):
the four image kinds pushed into the upstream, what a pulled image must report, and the
README's client configurations with the proxy's address put in.

An engine pulls one platform: for an OCI index or a Docker manifest list, the one of this
machine. Digests are checked as the skopeo tests do, against what the upstream serves:
the engine's repo digest is the digest of the tagged manifest (or index, or list), byte for
byte the upstream's, and its image ID is the digest of the platform's config blob.
"""

from __future__ import annotations

import json
import platform
from dataclasses import dataclass
from pathlib import Path

import aiohttp

from tests.rig.engine import PulledImage
from tests.rig.registry import Registry
from tests.rig.skopeo import Skopeo

from .test_pull import PullCase, Pushed, push_case

ROOT = Path(__file__).resolve().parents[2]
DAEMON_JSON = ROOT / "deploy" / "docker" / "daemon.json"
PODMAN_REGISTRIES_CONF = ROOT / "deploy" / "podman" / "registries.conf"
# The proxy's address in the README and deploy/ client configurations.
DOCUMENTED_PROXY_HOST = "registry-proxy.internal:5000"

MACHINE_ARCH = {"x86_64": "amd64", "aarch64": "arm64"}.get(platform.machine(), "amd64")


@dataclass(frozen=True)
class ImageKind:
    name: str
    case: PullCase


IMAGE_KINDS = [
    ImageKind("oci", PullCase("oci", multi_platform=False, push_format=None)),
    ImageKind("docker-v2s2", PullCase("docker-v2s2", multi_platform=False, push_format="v2s2")),
    ImageKind("oci-index", PullCase("oci-index", multi_platform=True, push_format=None)),
    ImageKind(
        "docker-manifest-list",
        PullCase("docker-manifest-list", multi_platform=True, push_format="v2s2"),
    ),
]
KIND_IDS = [kind.name for kind in IMAGE_KINDS]


async def push_kind(
    kind: ImageKind,
    tmp_path: Path,
    registry: Registry,
    skopeo: Skopeo,
    http: aiohttp.ClientSession,
    repo: str = "team/app",
    tag: str = "v1",
) -> Pushed:
    """Generate the kind's image and push it into the upstream; what the upstream serves."""
    return await push_case(kind.case, tmp_path, registry, skopeo, http, repo=repo, tag=tag)


def platform_manifest(pushed: Pushed) -> dict[str, object]:
    """The single-platform manifest an engine on this machine runs: the tagged one, or
    this architecture's child of an index or list."""
    if pushed.children:
        return dict(pushed.children[MACHINE_ARCH].json())
    return dict(pushed.top.json())


def assert_pulled_as_served(image: PulledImage, pushed: Pushed) -> None:
    """The engine's repo digests are the upstream's digest of the tagged manifest (index,
    list), plus, for podman, that of the platform's manifest; its image ID is the
    platform's config digest."""
    served = {pushed.top.header_digest}
    if pushed.children:
        served.add(pushed.children[MACHINE_ARCH].header_digest)
    assert pushed.top.header_digest in image.digests, image.repo_digests
    assert image.digests <= served, image.repo_digests
    config = platform_manifest(pushed)["config"]
    assert isinstance(config, dict)
    assert image.id == config["digest"], (image.id, config)


def platform_layers(pushed: Pushed) -> list[str]:
    return pushed.layers(MACHINE_ARCH if pushed.children else None)


def readme_daemon_json(proxy_host: str) -> dict[str, object]:
    """deploy/docker/daemon.json (the README's) with the proxy at ``proxy_host``."""
    text = DAEMON_JSON.read_text().replace(DOCUMENTED_PROXY_HOST, proxy_host)
    config: dict[str, object] = json.loads(text)
    return config


def readme_registries_conf(proxy_host: str) -> str:
    """deploy/podman/registries.conf (the README's) with the proxy at ``proxy_host``."""
    return PODMAN_REGISTRIES_CONF.read_text().replace(DOCUMENTED_PROXY_HOST, proxy_host)
