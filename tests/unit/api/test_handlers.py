"""The HTTP API end to end: create_app(settings) in front of a fake upstream registry."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web_fileresponse
from aiohttp.test_utils import TestClient
from prometheus_client import REGISTRY
from pytest_aiohttp import AiohttpClient, AiohttpServer

from proxy.api.accesslog import AccessLogger
from proxy.api.handlers import REGISTRY_KEY
from proxy.app import create_app
from proxy.model import MEDIA_TYPE_OCI_MANIFEST, Digest
from proxy.settings import Settings, UpstreamSettings
from tests.rig.process import async_wait_until
from tests.unit.fake_registry import Failure, FakeRegistry, manifest_body

REPO = "team/app"
BODY = manifest_body("v1")
DIGEST = Digest.of(BODY)
BLOB = b"0123456789abcdef" * 4096
NS = "registry.example"


@dataclass
class Rig:
    client: TestClient[Any, Any]
    registry: FakeRegistry


async def make_rig(
    aiohttp_server: AiohttpServer,
    aiohttp_client: AiohttpClient,
    tmp_path: Path,
    **upstream_settings: Any,
) -> Rig:
    registry = FakeRegistry()
    server = await aiohttp_server(registry.app())
    upstream = UpstreamSettings(
        name="fake",
        url=f"http://{server.host}:{server.port}",
        aliases=(NS,),
        default=True,
        retries=0,
        **upstream_settings,
    )
    settings = Settings(cache_dir=tmp_path / "cache", upstreams=(upstream,))
    return Rig(await aiohttp_client(create_app(settings)), registry)


@pytest.fixture
async def rig(aiohttp_server: AiohttpServer, aiohttp_client: AiohttpClient, tmp_path: Path) -> Rig:
    return await make_rig(aiohttp_server, aiohttp_client, tmp_path)


def served_bytes(source: str) -> float:
    value = REGISTRY.get_sample_value("registry_proxy_served_bytes_total", {"source": source})
    return value or 0.0


async def fetches_done(rig: Rig) -> None:
    await rig.client.app[REGISTRY_KEY].inflight.wait_idle()


async def error_of(response: aiohttp.ClientResponse) -> dict[str, Any]:
    """The single OCI error of a response, checking the body's shape."""
    assert response.content_type == "application/json"
    body = json.loads(await response.read())
    (error,) = body["errors"]
    assert set(error) >= {"code", "message", "detail"}
    assert isinstance(error["message"], str)
    result: dict[str, Any] = error
    return result


# --- base -----------------------------------------------------------------------------------


async def test_base_endpoint(rig: Rig) -> None:
    response = await rig.client.get("/v2/")
    assert response.status == 200
    assert response.headers["Docker-Distribution-API-Version"] == "registry/2.0"
    assert await response.json() == {}


async def test_errors_carry_the_api_version_header(rig: Rig) -> None:
    response = await rig.client.get("/v2/Bad/manifests/latest")
    assert response.status == 400
    assert response.headers["Docker-Distribution-API-Version"] == "registry/2.0"


# --- writes are refused ---------------------------------------------------------------------


@pytest.mark.parametrize("method", ["POST", "PUT", "PATCH", "DELETE"])
@pytest.mark.parametrize(
    "path",
    [
        f"/v2/{REPO}/manifests/latest",
        f"/v2/{REPO}/blobs/{DIGEST}",
        f"/v2/{REPO}/blobs/uploads/",
        f"/v2/{REPO}/blobs/uploads/some-session-id",
        f"/v2/{REPO}/tags/list",
    ],
)
async def test_write_methods_are_unsupported(rig: Rig, method: str, path: str) -> None:
    response = await rig.client.request(method, path, data=b"{}")
    assert response.status == 405
    assert (await error_of(response))["code"] == "UNSUPPORTED"
    assert rig.registry.requests == []


async def test_post_to_base_is_unsupported(rig: Rig) -> None:
    response = await rig.client.post("/v2/")
    assert response.status == 405
    assert (await error_of(response))["code"] == "UNSUPPORTED"


@pytest.mark.parametrize("path", ["/v2/a/b/blobs/uploads/", "/v2/a/b/blobs/uploads/abc"])
async def test_upload_paths_are_unsupported_even_for_get(rig: Rig, path: str) -> None:
    response = await rig.client.get(path)
    assert response.status == 405
    assert (await error_of(response))["code"] == "UNSUPPORTED"


# --- validation -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "path",
    [
        "/v2/Team/app/manifests/latest",
        "/v2/team/App/blobs/" + str(DIGEST),
        "/v2/team..app/manifests/latest",
        "/v2/team/-app/manifests/latest",
        "/v2/team//app/manifests/latest",
        "/v2/team/app_/tags/list",
        "/v2/" + "a" * 256 + "/manifests/latest",
    ],
)
async def test_bad_names_are_name_invalid(rig: Rig, path: str) -> None:
    response = await rig.client.get(path)
    assert response.status == 400
    assert (await error_of(response))["code"] == "NAME_INVALID"
    assert rig.registry.requests == []


@pytest.mark.parametrize(
    "reference",
    [
        "sha256:abc",
        "sha256:" + "A" * 64,
        "sha256:" + "a" * 65,
        "md5:" + "a" * 32,
        "notadigest",
    ],
)
async def test_bad_blob_digests_are_digest_invalid(rig: Rig, reference: str) -> None:
    response = await rig.client.get(f"/v2/{REPO}/blobs/{reference}")
    assert response.status == 400
    assert (await error_of(response))["code"] == "DIGEST_INVALID"
    assert rig.registry.requests == []


async def test_bad_manifest_digest_is_digest_invalid(rig: Rig) -> None:
    response = await rig.client.get(f"/v2/{REPO}/manifests/sha256:{'G' * 64}")
    assert response.status == 400
    assert (await error_of(response))["code"] == "DIGEST_INVALID"


@pytest.mark.parametrize("tag", ["-bad", ".bad", "a" * 129])
async def test_bad_tags_are_refused(rig: Rig, tag: str) -> None:
    response = await rig.client.get(f"/v2/{REPO}/manifests/{tag}")
    assert response.status == 400
    assert (await error_of(response))["code"] == "MANIFEST_INVALID"
    assert rig.registry.requests == []


async def test_unknown_namespace_is_name_unknown(rig: Rig) -> None:
    response = await rig.client.get(f"/v2/{REPO}/manifests/latest", params={"ns": "quay.io"})
    assert response.status == 404
    error = await error_of(response)
    assert error["code"] == "NAME_UNKNOWN"
    assert "quay.io" in error["message"]
    assert rig.registry.requests == []


async def test_unknown_endpoint_is_404(rig: Rig) -> None:
    response = await rig.client.get(f"/v2/{REPO}/nothing-here")
    assert response.status == 404
    await error_of(response)


async def test_repository_with_blobs_uploads_in_its_name_is_still_pullable(rig: Rig) -> None:
    # "team/blobs/uploads-archive" is a valid repository name; only the upload endpoint
    # (<name>/blobs/uploads/...) is a push.
    repo = "team/blobs/uploads-archive"
    rig.registry.add_manifest(repo, "latest", BODY)
    response = await rig.client.get(f"/v2/{repo}/manifests/latest")
    assert response.status == 200
    assert await response.read() == BODY


# --- manifests ------------------------------------------------------------------------------


async def test_manifest_miss_then_hit(rig: Rig) -> None:
    rig.registry.add_manifest(REPO, "v1", BODY)

    first = await rig.client.get(f"/v2/{REPO}/manifests/v1")
    assert first.status == 200
    assert await first.read() == BODY
    assert first.headers["Docker-Content-Digest"] == str(DIGEST)
    assert first.headers["Content-Type"] == MEDIA_TYPE_OCI_MANIFEST
    assert first.headers["ETag"] == f'"{DIGEST}"'
    assert first.headers["X-Cache"] == "MISS"

    second = await rig.client.get(f"/v2/{REPO}/manifests/v1")
    assert await second.read() == BODY
    assert second.headers["X-Cache"] == "HIT"
    assert len(rig.registry.v2_requests()) == 1


async def test_served_bytes_count_local_manifests_as_cache(
    aiohttp_server: AiohttpServer, aiohttp_client: AiohttpClient, tmp_path: Path
) -> None:
    """Revalidated and stale manifests are local bytes: counted as cache, not upstream."""
    rig = await make_rig(aiohttp_server, aiohttp_client, tmp_path, tag_ttl=0.0)
    rig.registry.add_manifest(REPO, "v1", BODY)
    outcomes = []
    before = served_bytes("cache"), served_bytes("upstream")

    first = await rig.client.get(f"/v2/{REPO}/manifests/v1")
    assert await first.read() == BODY
    outcomes.append(first.headers["X-Cache"])
    revalidated = await rig.client.get(f"/v2/{REPO}/manifests/v1")
    assert await revalidated.read() == BODY
    outcomes.append(revalidated.headers["X-Cache"])
    rig.registry.failure = Failure(503)
    stale = await rig.client.get(f"/v2/{REPO}/manifests/v1")
    assert await stale.read() == BODY
    outcomes.append(stale.headers["X-Cache"])
    assert stale.headers["Warning"] == '110 - "Response is Stale"'

    assert outcomes == ["MISS", "REVALIDATED", "STALE"]
    cache = served_bytes("cache") - before[0]
    upstream = served_bytes("upstream") - before[1]
    assert (cache, upstream) == (2 * len(BODY), len(BODY))


async def test_manifest_head(rig: Rig) -> None:
    rig.registry.add_manifest(REPO, "v1", BODY)
    response = await rig.client.head(f"/v2/{REPO}/manifests/v1")
    assert response.status == 200
    assert response.headers["Content-Length"] == str(len(BODY))
    assert response.headers["Docker-Content-Digest"] == str(DIGEST)


async def test_manifest_if_none_match_is_304(rig: Rig) -> None:
    rig.registry.add_manifest(REPO, "v1", BODY)
    await rig.client.get(f"/v2/{REPO}/manifests/v1")
    response = await rig.client.get(
        f"/v2/{REPO}/manifests/v1", headers={"If-None-Match": f'"{DIGEST}"'}
    )
    assert response.status == 304


async def test_routed_by_namespace_echoes_it(rig: Rig) -> None:
    rig.registry.add_manifest(REPO, "v1", BODY)
    response = await rig.client.get(f"/v2/{REPO}/manifests/v1", params={"ns": NS})
    assert response.status == 200
    assert response.headers["OCI-Namespace"] == NS
    assert rig.registry.v2_requests()[0].query == {}  # ns is never forwarded


async def test_path_prefix_routes_to_the_named_upstream(rig: Rig) -> None:
    rig.registry.add_manifest(REPO, "v1", BODY)
    response = await rig.client.get(f"/v2/fake/{REPO}/manifests/v1")
    assert response.status == 200
    assert rig.registry.v2_requests()[0].path == f"/v2/{REPO}/manifests/v1"


async def test_unknown_manifest_is_manifest_unknown(rig: Rig) -> None:
    response = await rig.client.get(f"/v2/{REPO}/manifests/v1")
    assert response.status == 404
    assert (await error_of(response))["code"] == "MANIFEST_UNKNOWN"


async def test_upstream_429_with_nothing_cached_is_429(rig: Rig) -> None:
    rig.registry.failure = Failure(429, {"Retry-After": "30"})
    response = await rig.client.get(f"/v2/{REPO}/manifests/v1")
    assert response.status == 429
    assert response.headers["Retry-After"] == "30"
    assert (await error_of(response))["code"] == "TOOMANYREQUESTS"


# --- blobs ----------------------------------------------------------------------------------


async def test_blob_miss_then_hit(rig: Rig) -> None:
    digest = rig.registry.add_blob(REPO, BLOB)

    first = await rig.client.get(f"/v2/{REPO}/blobs/{digest}")
    assert first.status == 200
    assert await first.read() == BLOB
    assert first.headers["Docker-Content-Digest"] == str(digest)
    assert first.headers["X-Cache"] == "MISS"
    # The client gets its last byte once the digest is verified; fsync and rename follow.
    await fetches_done(rig)

    second = await rig.client.get(f"/v2/{REPO}/blobs/{digest}")
    assert await second.read() == BLOB
    assert second.headers["X-Cache"] == "HIT"
    assert second.headers["ETag"] == f'"{digest}"'
    assert [r.method for r in rig.registry.v2_requests()] == ["GET"]


async def test_blob_range_from_cache(rig: Rig) -> None:
    digest = rig.registry.add_blob(REPO, BLOB)
    await (await rig.client.get(f"/v2/{REPO}/blobs/{digest}")).read()
    await fetches_done(rig)
    response = await rig.client.get(f"/v2/{REPO}/blobs/{digest}", headers={"Range": "bytes=10-19"})
    assert response.status == 206
    assert await response.read() == BLOB[10:20]


@pytest.mark.parametrize("nosendfile", [False, True], ids=["sendfile", "nosendfile"])
async def test_the_access_log_counts_the_bytes_sent_by_sendfile(
    aiohttp_server: AiohttpServer,
    aiohttp_client: AiohttpClient,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
    nosendfile: bool,
) -> None:
    """A blob goes out by sendfile, cold (from the temp file) and warm (FileResponse):
    its line says the blob's bytes, not only the headers aiohttp's writer sent; where
    aiohttp writes the file through its writer instead, the file is counted once; a
    HEAD counts no body."""
    monkeypatch.setattr(web_fileresponse, "NOSENDFILE", nosendfile)
    registry = FakeRegistry()
    upstream_server = await aiohttp_server(registry.app())
    upstream = UpstreamSettings(
        name="fake", url=f"http://{upstream_server.host}:{upstream_server.port}", default=True
    )
    settings = Settings(cache_dir=tmp_path / "cache", upstreams=(upstream,))
    app = create_app(settings)
    client: TestClient[Any, Any] = await aiohttp_client(
        await aiohttp_server(app, access_log_class=AccessLogger)
    )
    digest = registry.add_blob(REPO, BLOB)
    caplog.set_level(logging.INFO, logger="aiohttp.access")
    path = f"/v2/{REPO}/blobs/{digest}"
    asked = [("GET", {}), ("GET", {}), ("GET", {"Range": "bytes=10-19"}), ("HEAD", {})]
    for method, headers in asked:
        response = await client.request(method, path, headers=headers)
        await response.read()
        await app[REGISTRY_KEY].inflight.wait_idle()
    await async_wait_until(
        lambda: len(access_lines(caplog)) == len(asked), within=10, what="the access-log lines"
    )
    lines = access_lines(caplog)
    # A blob's HEAD is answered with a descriptor: no cache outcome (README, X-Cache).
    assert [line.cache for line in lines] == ["miss", "hit", "hit", "none"]  # type: ignore[attr-defined]
    # What is left once the body is taken away is the status line and headers.
    bodies = [len(BLOB), len(BLOB), 10, 0]
    heads = [line.bytes - body for line, body in zip(lines, bodies, strict=True)]  # type: ignore[attr-defined]
    assert all(100 < head < 1000 for head in heads), heads


def access_lines(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    """The proxy's lines (the fake upstream's own access log has no ``route``)."""
    return [r for r in caplog.records if r.name == "aiohttp.access" and hasattr(r, "route")]


async def test_wrong_blob_bytes_abort_the_response(rig: Rig) -> None:
    digest = rig.registry.add_blob(REPO, BLOB)
    rig.registry.blobs[(REPO, str(digest))] = b"x" * len(BLOB)

    response = await rig.client.get(f"/v2/{REPO}/blobs/{digest}")
    assert response.status == 200  # headers went out before the digest could be checked
    with pytest.raises(aiohttp.ClientError):
        await response.read()

    again = await rig.client.head(f"/v2/{REPO}/blobs/{digest}")
    assert again.headers.get("X-Cache") != "HIT"


async def test_unknown_blob_is_blob_unknown(rig: Rig) -> None:
    response = await rig.client.get(f"/v2/{REPO}/blobs/{DIGEST}")
    assert response.status == 404
    assert (await error_of(response))["code"] == "BLOB_UNKNOWN"


# --- tags/list ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "params", "expected_link"),
    [
        (f"/v2/{REPO}/tags/list", {"n": "2"}, f"</v2/{REPO}/tags/list?last=b&n=2>"),
        (
            f"/v2/fake/{REPO}/tags/list",
            {"n": "2"},
            f"</v2/fake/{REPO}/tags/list?last=b&n=2>",
        ),
        (
            f"/v2/{REPO}/tags/list",
            {"n": "2", "ns": NS},
            f"</v2/{REPO}/tags/list?last=b&n=2&ns={NS}>",
        ),
    ],
    ids=["default", "path-prefix", "ns"],
)
async def test_tags_list_link_points_at_the_proxy(
    rig: Rig, path: str, params: dict[str, str], expected_link: str
) -> None:
    rig.registry.tags[REPO] = ["a", "b"]
    rig.registry.tags_link = f'</v2/{REPO}/tags/list?last=b&n=2>; rel="next"'

    response = await rig.client.get(path, params=params)

    assert response.status == 200
    assert response.headers["Link"] == f'{expected_link}; rel="next"'
    body = await response.json()
    assert body["tags"] == ["a", "b"]
    assert body["name"] == path.removeprefix("/v2/").removesuffix("/tags/list")
    assert rig.registry.v2_requests()[0].query == {"n": "2"}


async def test_tags_list_forwards_only_pagination(rig: Rig) -> None:
    rig.registry.tags[REPO] = ["a"]
    response = await rig.client.get(
        f"/v2/{REPO}/tags/list", params={"n": "x", "last": "a", "evil": "1"}
    )
    assert response.status == 200
    assert rig.registry.v2_requests()[0].query == {"last": "a"}
