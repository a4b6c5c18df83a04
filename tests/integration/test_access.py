"""Access control with real clients: who may pull private content through the proxy.

The world's ``basic`` (htpasswd) and ``tok`` (token auth) upstreams are private: the
proxy holds their credentials, and with the secure default (``visibility: auto``) it
serves what it fetched with them only to clients allowed to see it: local users with a
grant, or clients whose own credentials the upstream accepts (pass-through). ``anon``
stays public. Real clients: skopeo, podman (login + pull through a registries.conf
mirror), ctr (``--user`` through hosts.toml) and the Docker daemon (registry-mirrors).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import aiohttp
import bcrypt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from tests.rig import oci
from tests.rig.auth import Credentials
from tests.rig.containerd import Containerd, write_hosts_dir
from tests.rig.dockerd import DockerdFactory
from tests.rig.engine import EngineError
from tests.rig.podman import Podman
from tests.rig.proxy_app import ProxyFactory, ProxyUnderTest
from tests.rig.redis_server import RedisServer
from tests.rig.skopeo import Skopeo, SkopeoError
from tests.rig.world import Upstream, World

ALICE = Credentials.random("alice")
BOB = Credentials.random("bob")


def basic(user: Credentials) -> dict[str, str]:
    return {"Authorization": "Basic " + user.basic}


def htpasswd(path: Path, *users: Credentials) -> Path:
    path.write_text(
        "".join(
            f"{u.username}:{bcrypt.hashpw(u.password.encode(), bcrypt.gensalt(4)).decode()}\n"
            for u in users
        )
    )
    return path


def access_settings(tmp_path: Path, **extra: Any) -> dict[str, Any]:
    return {
        "auth": {"htpasswd": str(htpasswd(tmp_path / "htpasswd", ALICE, BOB))},
        "access": {
            "rules": [
                {"repos": "**", "pull": ["anonymous", "passthrough"]},
                {"repos": "basic/**", "pull": ["alice", "passthrough"]},
                {"repos": "tok/**", "pull": ["alice", "passthrough"]},
            ]
        },
        **extra,
    }


async def secured_proxy(world: World, tmp_path: Path, **extra: Any) -> ProxyUnderTest:
    """The world's proxy with the secure default visibility, local users and rules."""
    return await world.start_proxy(visibility=None, settings=access_settings(tmp_path, **extra))


async def push(tmp_path: Path, skopeo: Skopeo, upstream: Upstream, repo: str) -> oci.OciImage:
    image = oci.make_image(tmp_path / f"src-{upstream.name}-{repo.replace('/', '-')}", layers=2)
    await upstream.push(skopeo, image, repo, "v1")
    return image


async def status_and_body(
    http: aiohttp.ClientSession, method: str, url: str, **kwargs: Any
) -> tuple[int, bytes, dict[str, str]]:
    async with http.request(method, url, **kwargs) as response:
        return response.status, await response.read(), dict(response.headers)


async def test_anonymous_clients_get_nothing_private_and_public_content_as_before(
    world: World, skopeo: Skopeo, tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    proxy = await secured_proxy(world, tmp_path)
    private = await push(tmp_path, skopeo, world.basic, "secret/app")
    public = await push(tmp_path, skopeo, world.anon, "open/app")
    # A client the upstream accepts warms the cache first: the bytes are on the proxy's disk.
    await skopeo.pull(
        proxy.host, "basic/secret/app:v1", tmp_path / "warm", creds=world.basic.credentials.colon
    )
    assert proxy.blob_path(private.layer_digests[0]).exists()

    with pytest.raises(SkopeoError) as failed:
        await skopeo.pull(proxy.host, "basic/secret/app:v1", tmp_path / "anon-pull")
    assert "unauthorized" in failed.value.stderr.lower() or "401" in failed.value.stderr

    base = f"{proxy.url}/v2/basic/secret/app"
    manifest_digest = oci.sha256_digest(private.manifest_bytes)
    for method, path in [
        ("GET", "/manifests/v1"),
        ("HEAD", "/manifests/v1"),
        ("GET", f"/manifests/{manifest_digest}"),
        ("GET", f"/blobs/{private.layer_digests[0]}"),
        ("HEAD", f"/blobs/{private.layer_digests[0]}"),
        ("GET", f"/blobs/{private.config.digest}"),
        ("GET", "/tags/list"),
        ("GET", f"/referrers/{manifest_digest}"),
    ]:
        status, body, headers = await status_and_body(http, method, base + path)
        assert status == 401, (method, path, status)
        assert headers["WWW-Authenticate"].startswith("Bearer realm=")
        if method == "GET":
            assert json.loads(body)["errors"][0]["code"] == "UNAUTHORIZED"
            assert private.manifest_bytes not in body

    # Public content: pulled anonymously, exactly as without access control.
    layout = tmp_path / "public-pull"
    await skopeo.pull(proxy.host, "open/app:v1", layout)
    assert oci.layout_layer_digests(layout, "pulled") == public.layer_digests


async def test_skopeo_with_a_local_user_and_a_user_without_a_grant(
    world: World, skopeo: Skopeo, tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    proxy = await secured_proxy(world, tmp_path)
    image = await push(tmp_path, skopeo, world.tok, "team/app")
    layout = tmp_path / "alice"
    await skopeo.pull(proxy.host, "tok/team/app:v1", layout, creds=ALICE.colon)
    assert oci.layout_layer_digests(layout, "pulled") == image.layer_digests

    with pytest.raises(SkopeoError) as failed:
        await skopeo.pull(proxy.host, "tok/team/app:v1", tmp_path / "bob", creds=BOB.colon)
    assert "denied" in failed.value.stderr.lower(), failed.value.stderr
    status, body, _ = await status_and_body(
        http,
        "GET",
        f"{proxy.url}/v2/tok/team/app/blobs/{image.layer_digests[0]}",
        headers=basic(BOB),
    )
    assert status == 403
    assert json.loads(body)["errors"][0]["code"] == "DENIED"


async def test_podman_login_and_pull_through_a_mirror(
    world: World, skopeo: Skopeo, podman: Podman, tmp_path: Path
) -> None:
    proxy = await secured_proxy(world, tmp_path)
    image = await push(tmp_path, skopeo, world.basic, "team/app")
    # podman asks the mirror for /v2/basic/team/app/...: the path prefix routes it. The
    # mirrored location is a name nothing answers to, so no fallback can succeed.
    conf = podman.write_registries_conf(
        "unqualified-search-registries = []\n\n"
        "[[registry]]\n"
        'location = "private.registry.test"\n\n'
        "[[registry.mirror]]\n"
        f'location = "{proxy.host}/basic"\n'
        "insecure = true\n"
    )
    alice_auth = tmp_path / "alice-auth.json"
    login = await podman.login(proxy.host, ALICE.username, ALICE.password, auth_file=alice_auth)
    assert login.returncode == 0, login.stderr
    pulled = await podman.pull(
        "private.registry.test/team/app:v1", registries_conf=conf, auth_file=alice_auth
    )
    assert pulled.id == image.config.digest

    bob_auth = tmp_path / "bob-auth.json"
    login = await podman.login(proxy.host, BOB.username, BOB.password, auth_file=bob_auth)
    assert login.returncode == 0, login.stderr  # bob is a user; he just may not pull this
    await podman.remove_image("private.registry.test/team/app:v1")
    with pytest.raises(EngineError):
        await podman.pull(
            "private.registry.test/team/app:v1", registries_conf=conf, auth_file=bob_auth
        )
    wrong = await podman.login(
        proxy.host, ALICE.username, "not-her-password", auth_file=tmp_path / "wrong.json"
    )
    assert wrong.returncode != 0


async def test_ctr_user_with_the_upstreams_credentials_passes_through(
    world: World, skopeo: Skopeo, containerd: Containerd, tmp_path: Path
) -> None:
    proxy = await secured_proxy(world, tmp_path)
    image = await push(tmp_path, skopeo, world.basic, "ctr/app")
    hosts = write_hosts_dir(tmp_path / "certs.d", {world.basic.host: proxy.url})
    reference = f"{world.basic.host}/ctr/app:v1"
    assert world.basic.credentials is not None

    wrong = await containerd.ctr(
        "content", "fetch", "--hosts-dir", str(hosts), "--user", "basic-user:wrong", reference
    )
    assert wrong.returncode != 0
    assert "401" in wrong.stderr or "unauthorized" in wrong.stderr.lower(), wrong.stderr

    result = await containerd.ctr(
        "content",
        "fetch",
        "--hosts-dir",
        str(hosts),
        "--user",
        world.basic.credentials.colon,
        reference,
    )
    assert result.returncode == 0, result.stderr
    assert {image.config.digest, *image.layer_digests} <= await containerd.content_digests()


async def test_docker_daemon_pulls_public_content_and_is_refused_private(
    world: World,
    skopeo: Skopeo,
    dockerd_factory: DockerdFactory,
    proxy_factory: ProxyFactory,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    public = await push(tmp_path, skopeo, world.anon, "team/public")
    await push(tmp_path, skopeo, world.basic, "team/private")
    public_proxy = await secured_proxy(world, tmp_path)  # default upstream: anon
    assert world.basic.credentials is not None
    private_proxy = await proxy_factory(
        world.basic.url,
        username=world.basic.credentials.username,
        password=world.basic.credentials.password,
    )
    docker = dockerd_factory(
        registry_mirrors=[public_proxy.url, private_proxy.url],
        insecure_registries=[public_proxy.host, private_proxy.host],
    )
    pulled = await docker.pull("team/public:v1")
    assert pulled.id == public.config.digest
    caplog.clear()
    with pytest.raises(EngineError):
        await docker.pull("team/private:v1")
    # The daemon tried both mirrors (then Docker Hub, which the rig's dead proxy refuses);
    # the proxy holding the private upstream refused it as the anonymous client it is.
    denials = [r.getMessage() for r in caplog.records if r.name == "proxy.audit"]
    assert any("anonymous" in d and "up/team/private: private" in d for d in denials), denials


async def test_cold_fetch_quota_is_shared_by_two_proxies_on_one_redis(
    world: World,
    skopeo: Skopeo,
    redis_server: RedisServer,
    tmp_path: Path,
    http: aiohttp.ClientSession,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    for n in range(3):
        await push(tmp_path, skopeo, world.anon, f"quota/app{n}")
    settings = {"limits": {"cold_fetches": "2/1h"}, "cache": {"redis": redis_server.url}}
    first = await world.start_proxy(settings=access_settings(tmp_path, **settings))
    second = await world.start_proxy(settings=access_settings(tmp_path, **settings))

    async def get(proxy: ProxyUnderTest, repo: str) -> tuple[int, dict[str, str]]:
        status, _, headers = await status_and_body(
            http,
            "GET",
            f"{proxy.url}/v2/{repo}/manifests/v1",
            headers={**basic(ALICE), "Accept": oci.OCI_MANIFEST},
        )
        return status, headers

    assert (await get(first, "quota/app0"))[0] == 200
    assert (await get(second, "quota/app1"))[0] == 200
    status, headers = await get(first, "quota/app2")  # the third cold fetch, on either
    assert status == 429
    assert int(headers["Retry-After"]) > 0
    assert headers["RateLimit-Limit"] == "2;w=3600"
    status, headers = await get(second, "quota/app2")
    assert status == 429
    # Hits never count: what each proxy has cached is still served.
    assert (await get(first, "quota/app0"))[0] == 200
    assert (await get(second, "quota/app1"))[0] == 200
    # Bob's quota is his own.
    status, _, _ = await status_and_body(
        http,
        "GET",
        f"{second.url}/v2/quota/app2/manifests/v1",
        headers={**basic(BOB), "Accept": oci.OCI_MANIFEST},
    )
    assert status == 200


async def test_a_pass_through_verdict_is_shared_by_replicas_through_redis(
    world: World,
    skopeo: Skopeo,
    redis_server: RedisServer,
    tmp_path: Path,
    http: aiohttp.ClientSession,
) -> None:
    await push(tmp_path, skopeo, world.basic, "shared/app")
    assert world.basic.credentials is not None
    # Replicas share the token key (a Secret in Kubernetes): the pass-through verdicts'
    # keys are keyed by a secret derived from it.
    key = ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    (tmp_path / "token.pem").write_bytes(key)
    settings = {"cache": {"redis": redis_server.url}}
    shared = access_settings(tmp_path, **settings)
    shared["auth"]["token"] = {"key": str(tmp_path / "token.pem")}
    first = await world.start_proxy(visibility=None, settings=shared)
    second = await world.start_proxy(visibility=None, settings=shared)
    client = {"Authorization": "Basic " + world.basic.credentials.basic, "Accept": oci.OCI_MANIFEST}

    def checks_with_client_credentials() -> int:
        """Upstream requests made with the client's credentials: pass-through checks (the
        proxy's own requests carry the same credentials here, so count HEADs of the tag)."""
        return sum(
            1
            for e in world.basic.passthrough.log.exchanges
            if e.method == "HEAD" and e.path == "/v2/shared/app/manifests/v1"
        )

    world.clear_logs()
    status, _, _ = await status_and_body(
        http, "GET", f"{first.url}/v2/basic/shared/app/manifests/v1", headers=client
    )
    assert status == 200
    probes = checks_with_client_credentials()
    assert probes >= 1
    status, _, _ = await status_and_body(
        http, "GET", f"{second.url}/v2/basic/shared/app/manifests/v1", headers=client
    )
    assert status == 200
    assert checks_with_client_credentials() == probes  # the second replica asked no one
