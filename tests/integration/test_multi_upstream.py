"""Many upstreams behind one proxy: anonymous, htpasswd Basic and token-auth docker-registry.

Clients send no credentials; the proxy authenticates to each upstream with its own
configured ones. Routing by path prefix, by ``?ns=`` (host or alias) and by default;
one repository name on several upstreams; credentials never leaking into logs, metrics or
error bodies; blob redirects to another origin never carrying the upstream's credentials.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import aiohttp
import pytest

from tests.rig import oci
from tests.rig.auth import TOKEN_SERVICE, Credentials
from tests.rig.distribution import blob_sha256, get_manifest
from tests.rig.proxy_app import ProxyUnderTest
from tests.rig.skopeo import Skopeo, SkopeoError
from tests.rig.upstreams import BlobStore, RedirectingUpstream
from tests.rig.world import ANON_ALIAS, BASIC_PASSWORD_ENV, Upstream, World

pytestmark = pytest.mark.integration


async def push_new_image(
    tmp_path: Path, skopeo: Skopeo, upstream: Upstream, repo: str, tag: str = "v1"
) -> oci.OciImage:
    image = oci.make_image(tmp_path / f"src-{upstream.name}-{repo.replace('/', '_')}-{tag}")
    await upstream.push(skopeo, image, repo, tag)
    return image


async def pull_layers(
    skopeo: Skopeo, proxy: ProxyUnderTest, reference: str, dest: Path
) -> list[str]:
    """skopeo pulls ``proxy/reference`` with no credentials; the pulled layer digests."""
    await skopeo.pull(proxy.host, reference, dest)
    oci.layout_blob_digests(dest)  # every blob written hashes to its name
    return oci.layout_layer_digests(dest, "pulled")


def repo_requests(upstream: Upstream, repo: str) -> list[str]:
    return [
        f"{e.method} {e.path}"
        for e in upstream.passthrough.log.exchanges
        if e.path.startswith(f"/v2/{repo}/")
    ]


# --------------------------------------------------------------------------- path prefix


async def test_pull_from_each_upstream_by_path_prefix(
    world: World, skopeo: Skopeo, tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    images = {
        up.name: await push_new_image(tmp_path, skopeo, up, f"apps/{up.name}")
        for up in world.upstreams
    }
    world.clear_logs()

    for up in world.upstreams:
        repo = f"apps/{up.name}"
        layers = await pull_layers(
            skopeo, world.proxy, f"{up.name}/{repo}:v1", tmp_path / f"pulled-{up.name}"
        )
        assert layers == images[up.name].layer_digests, up.name
        fetched = await get_manifest(http, world.proxy.url, f"{up.name}/{repo}", "v1")
        assert fetched.status == 200
        assert fetched.header_digest == images[up.name].manifest.digest
        # The blobs came from this upstream and no other.
        for digest in images[up.name].layer_digests:
            assert up.passthrough.log.blob_gets(digest), (up.name, up.passthrough.log.summary())
        for other in world.upstreams:
            if other is not up:
                assert not repo_requests(other, repo), (other.name, repo_requests(other, repo))

    # The private upstreams were asked with the configured credentials.
    assert world.basic.credentials is not None and world.tok.credentials is not None
    basic_auth = {
        e.headers.get("Authorization")
        for e in world.basic.passthrough.log.exchanges
        if e.status == 200
    }
    assert basic_auth == {"Basic " + world.basic.credentials.basic}
    assert not any("Authorization" in e.headers for e in world.anon.passthrough.log.exchanges)

    # Token flow: one token request for the repository's pull scope, for the whole pull
    # (manifest by tag, config, two layers, and the manifest GET above), with Basic creds.
    scope = "repository:apps/tok:pull"
    requests = world.token_server.for_scope(scope)
    assert len(requests) == 1, [(r.method, r.scopes) for r in world.token_server.requests]
    assert requests[0].granted and requests[0].username == world.tok.credentials.username
    assert requests[0].service == TOKEN_SERVICE
    assert requests[0].authorization == "Basic " + world.tok.credentials.basic
    assert all(r.granted for r in world.token_server.requests)
    token = requests[0].token
    tok_data = [e for e in world.tok.passthrough.log.exchanges if e.status == 200]
    assert tok_data and all(e.headers.get("Authorization") == f"Bearer {token}" for e in tok_data)


async def test_a_second_pull_of_a_private_repository_needs_no_new_token(
    world: World, skopeo: Skopeo, tmp_path: Path
) -> None:
    image = await push_new_image(tmp_path, skopeo, world.tok, "private/app", "v1")
    image2 = await push_new_image(tmp_path, skopeo, world.tok, "private/app", "v2")
    world.clear_logs()
    for tag, source in (("v1", image), ("v2", image2)):
        layers = await pull_layers(
            skopeo, world.proxy, f"tok/private/app:{tag}", tmp_path / f"pulled-{tag}"
        )
        assert layers == source.layer_digests
    # v2 was cold (new manifest and blobs upstream), yet served with the cached token.
    assert world.tok.passthrough.log.blob_gets(image2.layer_digests[0])
    assert len(world.token_server.for_scope("repository:private/app:pull")) == 1


# --------------------------------------------------------------------------- one name, many


async def test_same_repository_on_every_upstream_keeps_its_own_content(
    world: World, skopeo: Skopeo, tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    repo = "shared/app"
    images = {up.name: await push_new_image(tmp_path, skopeo, up, repo) for up in world.upstreams}
    assert len({img.manifest.digest for img in images.values()}) == 3

    for round_ in ("cold", "warm"):
        for up in world.upstreams:
            layers = await pull_layers(
                skopeo, world.proxy, f"{up.name}/{repo}:v1", tmp_path / f"{round_}-{up.name}"
            )
            assert layers == images[up.name].layer_digests, (round_, up.name)
        # Bare names go to the default upstream (anon).
        layers = await pull_layers(skopeo, world.proxy, f"{repo}:v1", tmp_path / f"{round_}-def")
        assert layers == images["anon"].layer_digests

    # By ns, too: each host gets its own manifest.
    for up in world.upstreams:
        async with http.get(
            f"{world.proxy.url}/v2/{repo}/manifests/v1",
            params={"ns": up.host},
            headers={"Accept": oci.ACCEPT_ALL_MANIFESTS},
        ) as response:
            assert response.status == 200
            assert response.headers["Docker-Content-Digest"] == images[up.name].manifest.digest

    # A blob only the token upstream has, cached now, is not served under anon's name:
    # the cache is shared by content, but what a repository holds is per upstream.
    tok_only = images["tok"].layer_digests[0]
    assert world.proxy.blob_path(tok_only).is_file()
    world.clear_logs()
    status, _, _ = await blob_sha256(http, world.proxy.url, f"anon/{repo}", tok_only)
    assert status == 404
    assert world.anon.passthrough.log.matching(path_suffix=f"/blobs/{tok_only}")
    status, digest, _ = await blob_sha256(http, world.proxy.url, f"tok/{repo}", tok_only)
    assert (status, digest) == (200, tok_only)


# --------------------------------------------------------------------------- ?ns= routing


async def test_ns_routes_by_host_and_alias_and_is_echoed(
    world: World, skopeo: Skopeo, tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    repo = "ns/app"
    anon = await push_new_image(tmp_path, skopeo, world.anon, repo)
    tok = await push_new_image(tmp_path, skopeo, world.tok, repo)
    world.clear_logs()
    base = world.proxy.url

    cases = [(world.anon.host, anon), (ANON_ALIAS, anon), (world.tok.host, tok)]
    blob_echoes: list[tuple[str, str | None, bool]] = []  # (method, X-Cache, echoed)
    for ns, image in cases:
        for method in ("HEAD", "GET"):
            async with http.request(
                method,
                f"{base}/v2/{repo}/manifests/v1",
                params={"ns": ns},
                headers={"Accept": oci.ACCEPT_ALL_MANIFESTS},
            ) as response:
                assert response.status == 200, (ns, method, await response.text())
                assert response.headers["OCI-Namespace"] == ns
                assert response.headers["Docker-Content-Digest"] == image.manifest.digest
        digest = image.manifest.digest
        async with http.get(f"{base}/v2/{repo}/manifests/{digest}", params={"ns": ns}) as response:
            assert response.status == 200
            assert oci.sha256_digest(await response.read()) == digest
            assert response.headers["OCI-Namespace"] == ns
        for layer in image.layer_digests:
            for method in ("HEAD", "GET"):
                async with http.request(
                    method, f"{base}/v2/{repo}/blobs/{layer}", params={"ns": ns}
                ) as response:
                    assert response.status == 200
                    if method == "GET":
                        assert oci.sha256_digest(await response.read()) == layer
                    echoed = response.headers.get("OCI-Namespace")
                    blob_echoes.append((method, response.headers.get("X-Cache"), echoed == ns))

    # The ns is the proxy's business: never forwarded upstream.
    for up in world.upstreams:
        assert not [e for e in up.passthrough.log.exchanges if "ns=" in e.query]
    assert world.tok.passthrough.log.blob_gets(tok.layer_digests[0])
    assert world.anon.passthrough.log.blob_gets(anon.layer_digests[0])
    assert not world.basic.passthrough.log.exchanges
    # Blob answers echo the ns too, whether served from disk or streamed from upstream.
    assert {(m, cache) for m, cache, echoed in blob_echoes if not echoed} == set()


async def test_ns_with_a_path_prefix_naming_the_same_upstream(
    world: World, skopeo: Skopeo, tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    """containerd with ``override_path`` and a mirror URL ``http://proxy/v2/tok`` sends
    ``/v2/tok/<repo>/...?ns=<tok host>``: the prefix agrees with the ns, so it is the
    upstream's name, not part of the repository's (the sequence ctr sends, replayed)."""
    image = await push_new_image(tmp_path, skopeo, world.tok, "ovr/app")
    base = f"{world.proxy.url}/v2/tok/ovr/app"
    params = {"ns": world.tok.host}
    async with http.head(
        f"{base}/manifests/v1", params=params, headers={"Accept": oci.ACCEPT_ALL_MANIFESTS}
    ) as response:
        assert response.status == 200
        assert response.headers["Docker-Content-Digest"] == image.manifest.digest
        assert response.headers["OCI-Namespace"] == world.tok.host
    async with http.get(f"{base}/manifests/{image.manifest.digest}", params=params) as response:
        assert response.status == 200
        assert oci.sha256_digest(await response.read()) == image.manifest.digest
    for digest in (image.config.digest, *image.layer_digests):
        async with http.get(f"{base}/blobs/{digest}", params=params) as response:
            assert response.status == 200
            assert oci.sha256_digest(await response.read()) == digest


@pytest.mark.parametrize(
    "path",
    [
        "/v2/ns/app/manifests/v1",
        "/v2/ns/app/blobs/sha256:" + "a" * 64,
        "/v2/ns/app/tags/list",
    ],
)
async def test_unconfigured_ns_is_name_unknown_and_names_it(
    world: World, http: aiohttp.ClientSession, path: str
) -> None:
    ns = "unknown.registry.test:5000"
    for method in ("GET", "HEAD"):
        async with http.request(method, world.proxy.url + path, params={"ns": ns}) as response:
            assert response.status == 404, method
            assert "OCI-Namespace" not in response.headers
            if method == "GET":
                error = (await response.json())["errors"][0]
                assert error["code"] == "NAME_UNKNOWN"
                assert ns in error["message"]
    # The upstream names are path prefixes, not namespaces.
    async with http.get(world.proxy.url + path, params={"ns": "tok"}) as response:
        assert response.status == 404
    for up in world.upstreams:
        assert not up.passthrough.log.exchanges, up.passthrough.log.summary()


# --------------------------------------------------------------------------- credentials


def leaked(secrets: list[str], text: str) -> list[str]:
    return [s[:8] + "..." for s in secrets if s and s in text]


def log_text(records: list[logging.LogRecord]) -> str:
    """Messages, arguments and ``extra`` fields of every record, as one string."""
    parts = []
    for record in records:
        parts.append(record.getMessage())
        parts.append(repr(record.__dict__))
        if record.exc_info:
            parts.append(logging.Formatter().formatException(record.exc_info))
    return "\n".join(parts)


async def test_credentials_never_appear_in_logs_metrics_or_bodies(
    world: World,
    skopeo: Skopeo,
    tmp_path: Path,
    http: aiohttp.ClientSession,
    caplog: pytest.LogCaptureFixture,
) -> None:
    basic = await push_new_image(tmp_path, skopeo, world.basic, "secret/app")
    tok = await push_new_image(tmp_path, skopeo, world.tok, "secret/app")
    world.clear_logs()
    caplog.set_level(logging.DEBUG)

    bodies: list[str] = []
    for name, image in (("basic", basic), ("tok", tok)):
        layers = await pull_layers(
            skopeo, world.proxy, f"{name}/secret/app:v1", tmp_path / f"pulled-{name}"
        )
        assert layers == image.layer_digests
        # Error paths on the private upstreams, too.
        for path in (
            f"/v2/{name}/secret/app/manifests/missing",
            f"/v2/{name}/secret/app/blobs/sha256:{'0' * 64}",
            f"/v2/{name}/nothing/here/tags/list",
            f"/v2/{name}/secret/app/tags/list",
        ):
            async with http.get(world.proxy.url + path) as response:
                bodies.append(f"{response.status} {dict(response.headers)} {await response.text()}")
    for path in ("/metrics", "/readyz", "/healthz"):
        async with http.get(world.proxy.url + path) as response:
            bodies.append(await response.text())

    secrets = world.secrets()
    assert world.token_server.issued, "no token was issued: the token flow was not exercised"
    assert any("registry_proxy_upstream_requests_total" in b for b in bodies)
    assert caplog.records, "nothing was logged at DEBUG: the capture is not working"
    assert not leaked(secrets, log_text(caplog.records))
    assert not leaked(secrets, caplog.text)
    assert not leaked(secrets, "\n".join(bodies))
    # What ends up in tracebacks and in ``check-config``.
    settings = world.proxy.settings
    assert not leaked(secrets, repr(settings) + json.dumps(settings.to_dict()))


async def test_wrong_password_is_an_oci_error_without_the_password(
    world: World,
    skopeo: Skopeo,
    tmp_path: Path,
    http: aiohttp.ClientSession,
    caplog: pytest.LogCaptureFixture,
) -> None:
    await push_new_image(tmp_path, skopeo, world.basic, "secret/app")
    await push_new_image(tmp_path, skopeo, world.tok, "secret/app")
    wrong_basic = "wrong-basic-" + "x1y2z3w4" * 2
    wrong_tok = "wrong-tok-" + "q9r8s7t6" * 2
    proxy = await world.start_proxy(
        tok={"password": wrong_tok}, environ={BASIC_PASSWORD_ENV: wrong_basic}
    )
    world.clear_logs()
    caplog.set_level(logging.DEBUG)
    secrets = [wrong_basic, wrong_tok, *world.secrets()]

    for name in ("basic", "tok"):
        for method in ("GET", "HEAD"):
            async with http.request(
                method, f"{proxy.url}/v2/{name}/secret/app/manifests/v1"
            ) as response:
                body = await response.text()
                assert response.status in (401, 403), (name, method, response.status, body)
                assert not leaked(secrets, f"{dict(response.headers)} {body}")
                if method == "GET":
                    error = json.loads(body)["errors"][0]
                    assert error["code"] in ("DENIED", "UNAUTHORIZED"), error
        with pytest.raises(SkopeoError) as failed:
            await skopeo.pull(proxy.host, f"{name}/secret/app:v1", tmp_path / f"pulled-{name}")
        assert not leaked(secrets, failed.value.stderr)
        assert "denied" in failed.value.stderr.lower() or "unauthorized" in failed.value.stderr

    # The wrong passwords were really used: sent to the registry and the token service.
    sent = {e.headers.get("Authorization") for e in world.basic.passthrough.log.exchanges}
    assert "Basic " + Credentials("basic-user", wrong_basic).basic in sent
    assert world.token_server.requests
    assert all(not r.granted for r in world.token_server.requests)
    assert {r.username for r in world.token_server.requests} == {"tok-user"}
    async with http.get(proxy.url + "/metrics") as response:
        assert not leaked(secrets, await response.text())
    assert not leaked(secrets, log_text(caplog.records))


# --------------------------------------------------------------------------- redirects


@pytest.mark.parametrize("name", ["basic", "tok"])
async def test_blob_redirect_to_another_origin_carries_no_credentials(
    world: World, skopeo: Skopeo, tmp_path: Path, name: str
) -> None:
    upstream = world.basic if name == "basic" else world.tok
    assert upstream.credentials is not None
    image = await push_new_image(tmp_path, skopeo, upstream, "redirected/app")
    blob_store = BlobStore(upstream.registry)
    await blob_store.start()
    redirecting = RedirectingUpstream(upstream.registry.url, blob_store)
    await redirecting.start()
    try:
        entry = {
            "name": "redir",
            "url": redirecting.url,
            "username": upstream.credentials.username,
            "password": upstream.credentials.password,
            "visibility": "public",
        }
        proxy = await world.start_proxy(extra_upstreams=[entry])
        world.clear_logs()
        layers = await pull_layers(
            skopeo, proxy, "redir/redirected/app:v1", tmp_path / "pulled-redirected"
        )
        assert layers == image.layer_digests
        blobs = [image.config.digest, *image.layer_digests]
        redirected = [e for e in redirecting.log.exchanges if e.status == 307]
        assert sorted(e.path.rpartition("/")[2] for e in redirected) == sorted(blobs)
        # The registry's credentials went to the registry ...
        assert all(e.headers.get("Authorization") for e in redirected)
        # ... and never to the other origin.
        fetched = blob_store.log.exchanges
        assert sorted(e.path.rpartition("/")[2] for e in fetched) == sorted(blobs)
        assert [e.path for e in fetched if "Authorization" in e.headers] == []
        assert not leaked(world.secrets(), repr([dict(e.headers) for e in fetched]))
    finally:
        await redirecting.stop()
        await blob_store.stop()
