"""skopeo pulls through the proxy: every manifest kind, cache hits, upstream down."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest
from multidict import CIMultiDict

from tests.rig import oci
from tests.rig.distribution import FetchedManifest, get_manifest, manifest_digest
from tests.rig.proxy_app import ProxyUnderTest
from tests.rig.recording import PassThrough
from tests.rig.registry import Registry
from tests.rig.skopeo import Skopeo

pytestmark = pytest.mark.integration


@dataclass(frozen=True)
class PullCase:
    name: str
    multi_platform: bool
    push_format: str | None  # None: keep OCI; "v2s2": Docker schema2 / manifest list
    pull_all: bool = False
    pull_arch: str | None = None


PULL_CASES = [
    PullCase("oci-image", multi_platform=False, push_format=None),
    PullCase("docker-v2s2-image", multi_platform=False, push_format="v2s2"),
    PullCase("oci-index-all", multi_platform=True, push_format=None, pull_all=True),
    PullCase("oci-index-arm64", multi_platform=True, push_format=None, pull_arch="arm64"),
    PullCase("docker-list-all", multi_platform=True, push_format="v2s2", pull_all=True),
    PullCase("docker-list-arm64", multi_platform=True, push_format="v2s2", pull_arch="arm64"),
]

EXPECTED_TOP_TYPE = {
    (False, None): oci.OCI_MANIFEST,
    (False, "v2s2"): oci.DOCKER_MANIFEST,
    (True, None): oci.OCI_INDEX,
    (True, "v2s2"): oci.DOCKER_MANIFEST_LIST,
}


@dataclass(frozen=True)
class Pushed:
    repo: str
    tag: str
    top: FetchedManifest  # the tagged manifest/index as the upstream serves it
    children: dict[str, FetchedManifest]  # architecture -> child manifest (lists only)

    def layers(self, arch: str | None = None) -> list[str]:
        if not self.children:
            return [layer["digest"] for layer in self.top.json()["layers"]]
        archs = [arch] if arch else list(self.children)
        return [layer["digest"] for a in archs for layer in self.children[a].json()["layers"]]


async def push_case(
    case: PullCase,
    tmp_path: Path,
    registry: Registry,
    skopeo: Skopeo,
    http: aiohttp.ClientSession,
    repo: str = "team/app",
    tag: str = "v1",
) -> Pushed:
    """Generate and push the case's image straight into the registry; read back what the
    registry serves (the ground truth the proxy must reproduce)."""
    if case.multi_platform:
        source: oci.OciImage | oci.OciIndex = oci.make_index(tmp_path / "src")
    else:
        source = oci.make_image(tmp_path / "src")
    await skopeo.push(
        source.oci_ref,
        registry.host,
        repo,
        tag,
        format=case.push_format,
        all_images=case.multi_platform,
    )
    top = await manifest_digest(http, registry.url, repo, tag)
    assert top.content_type == EXPECTED_TOP_TYPE[(case.multi_platform, case.push_format)]
    children: dict[str, FetchedManifest] = {}
    if case.multi_platform:
        for child in top.json()["manifests"]:
            arch = child["platform"]["architecture"]
            children[arch] = await manifest_digest(http, registry.url, repo, child["digest"])
    pushed = Pushed(repo=repo, tag=tag, top=top, children=children)
    # Layers are never converted: the upstream's layer digests are the generated ones.
    assert sorted(pushed.layers()) == sorted(source.layer_digests)
    return pushed


async def assert_proxy_serves_same_manifest(
    http: aiohttp.ClientSession,
    proxy: ProxyUnderTest,
    repo: str,
    reference: str,
    expected: FetchedManifest,
) -> None:
    """Through the proxy, with Accept listing all four types and with exactly the manifest's
    own type, the bytes, type and digest are the upstream's."""
    for accept in (oci.ACCEPT_ALL_MANIFESTS, expected.content_type):
        through = await get_manifest(http, proxy.url, repo, reference, accept=accept)
        assert through.status == 200, (accept, through.status, through.body[:300])
        assert through.header_digest == through.body_digest == expected.header_digest
        assert through.body == expected.body, "a manifest is served byte for byte"
        assert through.content_type == expected.content_type


@pytest.mark.parametrize("case", PULL_CASES, ids=[c.name for c in PULL_CASES])
async def test_skopeo_pull_through_proxy(
    case: PullCase,
    tmp_path: Path,
    registry: Registry,
    passthrough: PassThrough,
    proxy: ProxyUnderTest,
    skopeo: Skopeo,
    http: aiohttp.ClientSession,
) -> None:
    pushed = await push_case(case, tmp_path, registry, skopeo, http)

    dest = tmp_path / "pulled"
    await skopeo.pull(
        proxy.host,
        f"{pushed.repo}:{pushed.tag}",
        dest,
        all_images=case.pull_all,
        arch=case.pull_arch,
    )

    assert oci.layout_layer_digests(dest, "pulled") == pushed.layers(case.pull_arch)
    oci.layout_blob_digests(dest)  # every blob skopeo stored hashes to its name
    await assert_proxy_serves_same_manifest(http, proxy, pushed.repo, pushed.tag, pushed.top)
    for child in pushed.children.values():
        assert child.header_digest is not None
        await assert_proxy_serves_same_manifest(
            http, proxy, pushed.repo, child.header_digest, child
        )
    if case.push_format is None and (case.pull_all or not case.multi_platform):
        # OCI into an oci: layout needs no conversion: the digest is kept end to end.
        digest, _, _ = oci.read_layout_manifest(dest, "pulled")
        assert digest == pushed.top.header_digest
    # Every layer went through the upstream once at most.
    for layer in pushed.layers(case.pull_arch):
        assert len(passthrough.log.blob_gets(layer)) <= 1, passthrough.log.summary()


@pytest.mark.parametrize(
    "case", [PULL_CASES[0], PULL_CASES[4]], ids=[PULL_CASES[0].name, PULL_CASES[4].name]
)
async def test_second_pull_makes_no_upstream_blob_gets(
    case: PullCase,
    tmp_path: Path,
    registry: Registry,
    passthrough: PassThrough,
    proxy: ProxyUnderTest,
    skopeo: Skopeo,
    http: aiohttp.ClientSession,
) -> None:
    pushed = await push_case(case, tmp_path, registry, skopeo, http)
    reference = f"{pushed.repo}:{pushed.tag}"

    await skopeo.pull(proxy.host, reference, tmp_path / "first", all_images=case.pull_all)
    first_gets = passthrough.log.blob_gets()
    assert {g.path.rsplit("/", 1)[1] for g in first_gets} >= set(pushed.layers()), (
        "the first pull fetched the layers from upstream"
    )
    passthrough.log.clear()

    second = tmp_path / "second"
    await skopeo.pull(proxy.host, reference, second, all_images=case.pull_all)
    assert passthrough.log.blob_gets() == [], passthrough.log.summary()
    assert passthrough.log.blob_bytes_served() == 0
    assert oci.layout_layer_digests(second, "pulled") == pushed.layers()


async def test_pull_by_digest_with_upstream_down(
    tmp_path: Path,
    registry: Registry,
    passthrough: PassThrough,
    proxy: ProxyUnderTest,
    skopeo: Skopeo,
    http: aiohttp.ClientSession,
) -> None:
    pushed = await push_case(PULL_CASES[0], tmp_path, registry, skopeo, http)
    await skopeo.pull(proxy.host, f"{pushed.repo}:{pushed.tag}", tmp_path / "warm")

    registry.stop()
    passthrough.log.clear()
    dest = tmp_path / "offline"
    await skopeo.pull(proxy.host, f"{pushed.repo}@{pushed.top.header_digest}", dest)
    assert oci.layout_layer_digests(dest, "pulled") == pushed.layers()
    digest, _, _ = oci.read_layout_manifest(dest, "pulled")
    assert digest == pushed.top.header_digest
    assert passthrough.log.blob_gets() == [], passthrough.log.summary()


@pytest.mark.parametrize("case", [PULL_CASES[1], PULL_CASES[2]], ids=["docker", "oci-index"])
async def test_accept_split_over_several_header_lines(
    case: PullCase,
    tmp_path: Path,
    registry: Registry,
    passthrough: PassThrough,
    proxy: ProxyUnderTest,
    skopeo: Skopeo,
    http: aiohttp.ClientSession,
) -> None:
    """skopeo (containers/image) sends one ``Accept`` line per media type; all of them
    count, not only the first (which is the OCI manifest type)."""
    pushed = await push_case(case, tmp_path, registry, skopeo, http)
    headers: CIMultiDict[str] = CIMultiDict(("Accept", t) for t in oci.MANIFEST_MEDIA_TYPES)
    async with http.get(
        f"{proxy.url}/v2/{pushed.repo}/manifests/{pushed.tag}", headers=headers
    ) as response:
        body = await response.read()
        assert response.status == 200, (response.status, body[:300], passthrough.log.summary())
        assert response.headers["Content-Type"] == pushed.top.content_type
        assert response.headers["Docker-Content-Digest"] == pushed.top.header_digest
    assert body == pushed.top.body
