"""Hostile and malformed requests: documented OCI error JSON, nothing forwarded, nothing
written anywhere (the request targets are sent byte for byte, ``..`` and escapes intact)."""

from __future__ import annotations

from pathlib import Path

import aiohttp
import pytest

from tests.rig.distribution import RawResponse, push_image, raw_request
from tests.rig.faults import FaultProxy
from tests.rig.proxy_app import ProxyFactory, ProxyUnderTest
from tests.rig.recording import PassThrough
from tests.rig.registry import Registry

pytestmark = pytest.mark.integration

HEX = "a" * 64
DIGEST = f"sha256:{HEX}"

# An encoded slash changes the shape of the path once decoded: such a target may be a bad
# reference (400) or no endpoint at all (404); either way a JSON error, nothing forwarded.
SLASHED = {"DIGEST_INVALID", "MANIFEST_INVALID", "NAME_INVALID", "UNSUPPORTED", "NAME_UNKNOWN"}

# (request target, acceptable statuses, acceptable codes)
BAD_GETS: list[tuple[str, set[int], set[str]]] = [
    # names
    ("/v2/UPPER/manifests/latest", {400}, {"NAME_INVALID"}),
    ("/v2/a//b/manifests/latest", {400}, {"NAME_INVALID"}),
    ("/v2/-a/manifests/latest", {400}, {"NAME_INVALID"}),
    ("/v2/a_/manifests/latest", {400}, {"NAME_INVALID"}),
    ("/v2/a%00b/manifests/latest", {400}, {"NAME_INVALID"}),
    ("/v2/a/../b/manifests/latest", {400}, {"NAME_INVALID"}),
    ("/v2/a/../../../../../../etc/manifests/latest", {400}, {"NAME_INVALID"}),
    ("/v2/a/%2e%2e/%2e%2e/%2e%2e/etc/manifests/latest", {400}, {"NAME_INVALID"}),
    ("/v2/a/%2E%2E/b/blobs/" + DIGEST, {400}, {"NAME_INVALID"}),
    ("/v2/..%2f..%2f..%2ftmp/blobs/" + DIGEST, {400, 404}, SLASHED),
    ("/v2/../../blobs/" + DIGEST, {400}, {"NAME_INVALID"}),
    ("/v2/" + "a" * 300 + "/manifests/latest", {400}, {"NAME_INVALID"}),
    ("/v2/" + "abc/" * 100 + "x/blobs/" + DIGEST, {400}, {"NAME_INVALID"}),
    ("/v2/" + "a" * 300 + "/tags/list", {400}, {"NAME_INVALID"}),
    ("/v2/a/../../tags/list", {400}, {"NAME_INVALID"}),
    # tags
    ("/v2/a/manifests/-bad", {400}, {"MANIFEST_INVALID"}),
    ("/v2/a/manifests/.hidden", {400}, {"MANIFEST_INVALID"}),
    ("/v2/a/manifests/%2e%2e", {400}, {"MANIFEST_INVALID"}),
    ("/v2/a/manifests/..", {400}, {"MANIFEST_INVALID"}),
    ("/v2/a/manifests/t%2f..%2f..%2fx", {400, 404}, SLASHED),
    ("/v2/a/manifests/" + "t" * 129, {400}, {"MANIFEST_INVALID"}),
    ("/v2/a/manifests/tag%00", {400}, {"MANIFEST_INVALID"}),
    # digests
    ("/v2/a/blobs/sha256:abc", {400}, {"DIGEST_INVALID"}),
    ("/v2/a/blobs/sha256:" + "g" * 64, {400}, {"DIGEST_INVALID"}),
    ("/v2/a/blobs/sha256:" + "A" * 64, {400}, {"DIGEST_INVALID"}),
    ("/v2/a/blobs/sha256:" + "a" * 65, {400}, {"DIGEST_INVALID"}),
    ("/v2/a/blobs/sha512:" + "a" * 64, {400}, {"DIGEST_INVALID"}),
    ("/v2/a/blobs/md5:" + "a" * 32, {400}, {"DIGEST_INVALID", "UNSUPPORTED"}),
    ("/v2/a/blobs/" + HEX, {400}, {"DIGEST_INVALID"}),
    ("/v2/a/blobs/sha256:..%2f..%2f..%2fetc%2fpasswd", {400, 404}, SLASHED),
    ("/v2/a/blobs/sha256:%2e%2e", {400}, {"DIGEST_INVALID"}),
    ("/v2/a/blobs/sha256:" + HEX + "%00", {400}, {"DIGEST_INVALID"}),
    ("/v2/a/manifests/sha256:abc", {400}, {"DIGEST_INVALID", "MANIFEST_INVALID"}),
    ("/v2/a/manifests/sha256:..%2f..%2fx", {400, 404}, SLASHED),
]

# (method, request target, body): the push/delete side of the API
WRITES: list[tuple[str, str, bytes]] = [
    ("POST", "/v2/x/blobs/uploads/", b""),
    ("POST", f"/v2/x/blobs/uploads/?mount={DIGEST}&from=y", b""),
    ("POST", f"/v2/x/blobs/uploads/?digest={DIGEST}", b"monolithic"),
    ("PATCH", "/v2/x/blobs/uploads/0f1e2d3c-uuid", b"chunk"),
    ("PUT", f"/v2/x/blobs/uploads/0f1e2d3c-uuid?digest={DIGEST}", b"chunk"),
    ("PUT", "/v2/x/manifests/latest", b'{"schemaVersion":2}'),
    ("DELETE", f"/v2/x/manifests/{DIGEST}", b""),
    ("DELETE", "/v2/x/manifests/latest", b""),
    ("DELETE", f"/v2/x/blobs/{DIGEST}", b""),
]


def snapshot(root: Path, registry: Registry) -> dict[Path, int]:
    """Every file under ``root`` with its size, but the registry's log (which it appends to
    on its own schedule)."""
    return {p: p.stat().st_size for p in root.rglob("*") if p.is_file() and p != registry.log_path}


def assert_error(response: RawResponse, statuses: set[int], codes: set[str]) -> None:
    assert response.status in statuses, (response.status, response.body[:300])
    assert response.headers.get("content-type", "").startswith("application/json"), response.headers
    errors = response.json()["errors"]
    assert errors, response.body
    assert errors[0]["code"] in codes, errors
    assert isinstance(errors[0].get("message"), str)


@pytest.mark.parametrize(
    ("target", "statuses", "codes"), BAD_GETS, ids=[t[:60] for t, _, _ in BAD_GETS]
)
@pytest.mark.parametrize("method", ["GET", "HEAD"])
async def test_bad_reference_is_rejected_without_side_effects(
    tmp_path: Path,
    registry: Registry,
    passthrough: PassThrough,
    proxy: ProxyUnderTest,
    method: str,
    target: str,
    statuses: set[int],
    codes: set[str],
) -> None:
    before = snapshot(tmp_path, registry)
    response = await raw_request(proxy.host, method, target)
    if method == "HEAD":
        assert response.status in statuses, (response.status, response.headers)
        assert response.body == b""
    else:
        assert_error(response, statuses, codes)
    assert snapshot(tmp_path, registry) == before, "a rejected request wrote files"
    assert passthrough.log.exchanges == [], passthrough.log.summary()


@pytest.mark.parametrize(
    ("method", "target", "body"), WRITES, ids=[f"{m} {t}" for m, t, _ in WRITES]
)
async def test_writes_are_unsupported(
    tmp_path: Path,
    registry: Registry,
    passthrough: PassThrough,
    proxy: ProxyUnderTest,
    method: str,
    target: str,
    body: bytes,
) -> None:
    before = snapshot(tmp_path, registry)
    response = await raw_request(
        proxy.host,
        method,
        target,
        body=body,
        headers={"Content-Type": "application/octet-stream"},
    )
    assert_error(response, {405}, {"UNSUPPORTED"})
    assert snapshot(tmp_path, registry) == before
    assert [e for e in passthrough.log.exchanges if e.method not in ("GET", "HEAD")] == []
    assert not (registry.root / "docker/registry/v2/repositories/x").exists()


async def test_base_endpoint_and_unknown_manifest(
    registry: Registry, passthrough: PassThrough, proxy: ProxyUnderTest
) -> None:
    base = await raw_request(proxy.host, "GET", "/v2/")
    assert base.status == 200
    assert base.headers.get("docker-distribution-api-version") == "registry/2.0"
    missing = await raw_request(proxy.host, "GET", "/v2/no/such/manifests/latest")
    assert_error(missing, {404}, {"MANIFEST_UNKNOWN", "NAME_UNKNOWN"})


async def test_requests_the_upstream_chokes_on_do_not_mark_it_down(
    tmp_path: Path,
    registry: Registry,
    fault_proxy: FaultProxy,
    proxy_factory: ProxyFactory,
) -> None:
    """The adversarial run: docker-registry answered 500 for ``/v2/<250 x a>/manifests/tN``
    (the fault proxy answers so here); five of them opened the upstream breaker and a valid
    cold manifest got 503. Only failures that say the upstream is unwell count now."""
    long_name = "a" * 250
    fault_proxy.fail(500, match=lambda e: e.path.startswith(f"/v2/{long_name}/"))
    proxy = await proxy_factory(fault_proxy.url, failure_threshold=5)
    async with aiohttp.ClientSession() as http:
        image = await push_image(http, registry.url, tmp_path / "image", "team/app", "v1")
    for n in range(8):
        choked = await raw_request(proxy.host, "GET", f"/v2/{long_name}/manifests/t{n}")
        assert choked.status == 502, (choked.status, choked.body)
    assert len(fault_proxy.log.manifest_requests()) >= 8, "each one reached the upstream"
    valid = await raw_request(
        proxy.host,
        "GET",
        "/v2/team/app/manifests/v1",
        headers={"Accept": "application/vnd.oci.image.manifest.v1+json"},
    )
    assert valid.status == 200, (valid.status, valid.body)
    assert valid.body == image.manifest_bytes


async def test_a_name_too_long_for_the_upstream_is_refused_locally(
    fault_proxy: FaultProxy, proxy_factory: ProxyFactory
) -> None:
    """Docker Hub normalises ``<250 x a>`` to ``library/<250 x a>``: 258 characters, more
    than any registry accepts; NAME_INVALID without asking the upstream."""
    proxy = await proxy_factory(fault_proxy.url, aliases=["docker.io"])
    response = await raw_request(proxy.host, "GET", f"/v2/{'a' * 250}/manifests/latest")
    assert_error(response, {400}, {"NAME_INVALID"})
    assert fault_proxy.log.exchanges == []
