"""Cache management with real parts: docker-registry upstream, skopeo clients, the proxy.

Fill past ``cache.max_size`` while skopeo clients pull; pins survive; after the upstream
stops, every cached tag either pulls in full or is answered as not cached.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import bcrypt
import pytest
import yaml

from proxy import metrics
from proxy.api.handlers import PIN_REFRESHER_KEY, REGISTRY_KEY
from proxy.errors import BlobUnknown
from proxy.model import Digest
from proxy.pullthrough.registry import PullThroughRegistry
from tests.rig import oci
from tests.rig.proxy_app import ProxyUnderTest, proxy_settings_mapping, serve_proxy
from tests.rig.registry import Registry
from tests.rig.skopeo import Skopeo, SkopeoError

pytestmark = pytest.mark.integration

LAYER_SIZE = 24 << 10  # small blobs: the whole module stays within CI's minutes
CLIENTS = 8
ACCEPT = ", ".join([oci.OCI_MANIFEST, oci.OCI_INDEX, oci.DOCKER_MANIFEST, oci.DOCKER_MANIFEST_LIST])


@asynccontextmanager
async def cache_proxy(
    upstream_url: str, cache_dir: Path, extra: dict[str, Any] | None = None, **cache: Any
) -> AsyncIterator[ProxyUnderTest]:
    mapping = proxy_settings_mapping(upstream_url, cache_dir)
    mapping["cache"].update(cache)
    mapping.update(extra or {})
    proxy = await serve_proxy(mapping)
    try:
        yield proxy
    finally:
        await proxy.server.stop()


def registry_of(proxy: ProxyUnderTest) -> PullThroughRegistry:
    return proxy.app[REGISTRY_KEY]


async def push_images(
    skopeo: Skopeo, registry: Registry, workdir: Path, repos: list[str]
) -> dict[str, oci.OciImage]:
    """One small two-layer image per repository, tagged ``latest``, pushed four at a time."""
    images = {
        repo: oci.make_image(workdir / repo.replace("/", "_"), layers=2, layer_size=LAYER_SIZE)
        for repo in repos
    }
    gate = asyncio.Semaphore(4)

    async def push(repo: str) -> None:
        async with gate:
            await skopeo.push(images[repo].oci_ref, registry.host, repo, "latest")

    await asyncio.gather(*(push(repo) for repo in repos))
    return images


async def pull_all(skopeo: Skopeo, host: str, refs: list[str], dest: Path) -> list[str]:
    """``CLIENTS`` skopeo clients share ``refs``; returns the references that failed."""
    queue: asyncio.Queue[str] = asyncio.Queue()
    for ref in refs:
        queue.put_nowait(ref)
    failed: list[str] = []

    async def client(n: int) -> None:
        while not queue.empty():
            ref = queue.get_nowait()
            try:
                await skopeo.pull(host, ref, dest / f"c{n}-{ref.replace('/', '_')}")
            except SkopeoError as exc:
                failed.append(f"{ref}: {exc.last_line}")

    await asyncio.gather(*(client(n) for n in range(CLIENTS)))
    return failed


async def offline_answer(http: aiohttp.ClientSession, proxy: ProxyUnderTest, repo: str) -> str:
    """With the upstream stopped: ``full`` when the tag's manifest is served and so is every
    blob it names (bytes checked), ``not cached`` when the manifest is refused. A manifest
    served with a blob missing is ``half``: what must never happen."""
    async with http.get(
        f"{proxy.url}/v2/{repo}/manifests/latest", headers={"Accept": ACCEPT}
    ) as response:
        if response.status != 200:
            return "not cached"
        manifest = json.loads(await response.read())
    digests = [manifest["config"]["digest"], *(layer["digest"] for layer in manifest["layers"])]
    for digest in digests:
        async with http.get(f"{proxy.url}/v2/{repo}/blobs/{digest}") as response:
            body = await response.read() if response.status == 200 else b""
        if response.status != 200 or oci.sha256_digest(body) != digest:
            return "half"
    return "full"


def evicted_images() -> float:
    return sum(
        metrics.EVICTED_IMAGES.labels("size", kind)._value.get() for kind in ("image", "loose")
    )


@pytest.mark.parametrize("shared", ["sqlite", "redis"])
async def test_fill_past_max_size_while_clients_pull_then_every_tag_is_whole_or_absent(
    tmp_path: Path,
    registry: Registry,
    skopeo: Skopeo,
    http: aiohttp.ClientSession,
    request: pytest.FixtureRequest,
    shared: str,
) -> None:
    """With the embedded state (SQLite) and with a real redis-server holding tags, links
    and descriptors: every layer forgets what eviction removed."""
    extra: dict[str, Any] = {}
    if shared == "redis":
        extra["redis"] = request.getfixturevalue("redis_server").url
    repos = [f"fill/app{i}" for i in range(24)]
    images = await push_images(skopeo, registry, tmp_path / "layouts", repos)
    image_bytes = sum(
        len(i.manifest_bytes) + i.config.size + sum(layer.size for layer in i.layers)
        for i in images.values()
    )
    max_size = image_bytes // 3  # the images are three times what the cache may keep
    before = evicted_images()
    async with cache_proxy(
        registry.url, tmp_path / "cache", max_size=max_size, min_age="0s", **extra
    ) as proxy:
        failed = await pull_all(skopeo, proxy.host, [f"{r}:latest" for r in repos], tmp_path)
        reg = registry_of(proxy)
        await reg.evictor.wait()
        used = reg.store.used_bytes
        registry.stop()
        answers = {repo: await offline_answer(http, proxy, repo) for repo in repos}
        # No layer still says "present" for what is gone: the tag stores (memory, and
        # SQLite or Redis) forgot the tags, the descriptor caches the blobs.
        for repo, answer in answers.items():
            if answer != "not cached":
                continue
            assert await reg.tags.get("up", repo, "latest") is None, repo
            for layer in images[repo].layer_digests:
                if not proxy.blob_path(layer).exists():
                    with pytest.raises(BlobUnknown):
                        await reg.descriptors.stat(Digest.parse(layer))
    evictions = evicted_images() - before
    print(
        f"fill-and-evict: {image_bytes} bytes pulled into max_size {max_size};"
        f" {used} bytes after; {evictions:.0f} evictions; {len(failed)} failed pulls;"
        f" offline: {sum(a == 'full' for a in answers.values())} whole,"
        f" {sum(a == 'not cached' for a in answers.values())} not cached"
    )
    assert failed == []
    assert used <= max_size * 0.9
    assert evictions > 0
    assert "half" not in answers.values(), answers
    assert "full" in answers.values() and "not cached" in answers.values()


async def test_pinned_images_survive_a_fill_of_three_times_max_size(
    tmp_path: Path, registry: Registry, skopeo: Skopeo, http: aiohttp.ClientSession
) -> None:
    pinned = ["base/python", "base/debian"]
    filler = [f"fill/app{i}" for i in range(12)]
    images = await push_images(skopeo, registry, tmp_path / "layouts", pinned + filler)
    one = max(len(i.manifest_bytes) + i.config.size + 2 * LAYER_SIZE for i in images.values())
    max_size = one * 4  # the two pins and about two others
    async with cache_proxy(
        registry.url, tmp_path / "cache", max_size=max_size, min_age="0s", pin=["up/base/*:latest"]
    ) as proxy:
        failed = await pull_all(skopeo, proxy.host, [f"{r}:latest" for r in pinned], tmp_path)
        failed += await pull_all(skopeo, proxy.host, [f"{r}:latest" for r in filler], tmp_path)
        reg = registry_of(proxy)
        await reg.evictor.wait()
        assert not reg.evictor.pins_over_limit
        registry.stop()
        for repo in pinned:
            assert await offline_answer(http, proxy, repo) == "full"
            await skopeo.pull(
                proxy.host, f"{repo}:latest", tmp_path / f"offline-{repo.replace('/', '_')}"
            )
        assert sum([await offline_answer(http, proxy, r) == "full" for r in filler]) < 12
    assert failed == []


async def run_cli(*args: str, env: dict[str, str] | None = None) -> tuple[int, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "proxy",
        *args,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), timeout=120)
    assert process.returncode is not None
    return process.returncode, out.decode() + ("\n" + err.decode() if process.returncode else "")


async def test_verify_quarantines_a_flipped_byte_and_the_next_pull_fetches_it_again(
    tmp_path: Path, registry: Registry, skopeo: Skopeo, http: aiohttp.ClientSession
) -> None:
    images = await push_images(skopeo, registry, tmp_path / "layouts", ["app/verify"])
    layer = images["app/verify"].layers[0].digest
    cache = tmp_path / "cache"
    async with cache_proxy(registry.url, cache) as proxy:
        await skopeo.pull(proxy.host, "app/verify:latest", tmp_path / "first")
        path = proxy.blob_path(layer)
        # While it runs, the CLI finds the directory locked and goes to the proxy's admin
        # API (at the configured listen address, where this in-process proxy does not
        # listen): it fails without touching the files.
        status, out = await run_cli("cache", "verify", "--cache-dir", str(cache))
        assert status == 1 and "in use by a running proxy" in out, out
        assert path.exists() and not (cache / "quarantine").exists()
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))

    status, out = await run_cli("cache", "verify", "--cache-dir", str(cache), "--json")
    assert status == 1, out
    report = json.loads(out.split("\n\n")[0] if "\n\n" in out else out)
    assert report["corrupt"] == [layer]
    quarantined = cache / "quarantine" / f"sha256-{layer.removeprefix('sha256:')}"
    assert quarantined.read_bytes() == bytes(data)
    assert not path.exists()
    status, out = await run_cli("cache", "verify", "--cache-dir", str(cache))
    assert status == 0, out  # nothing corrupt is left

    async with cache_proxy(registry.url, cache) as proxy:
        async with http.get(f"{proxy.url}/v2/app/verify/blobs/{layer}") as response:
            assert response.status == 200
            assert oci.sha256_digest(await response.read()) == layer
        await skopeo.pull(proxy.host, "app/verify:latest", tmp_path / "second")
    assert oci.sha256_digest(path.read_bytes()) == layer

    # --repair fetches what it quarantined again at once (the upstream still answers).
    other = images["app/verify"].layers[1].digest
    other_path = cache / "blobs" / "sha256" / other[7:9] / other[7:]
    data = bytearray(other_path.read_bytes())
    data[0] ^= 0x80
    other_path.write_bytes(bytes(data))
    # The same configuration file as the proxy: --repair needs to know the upstream.
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(proxy_settings_mapping(registry.url, cache)))
    status, out = await run_cli("cache", "verify", "--repair", "--config", str(config), "--json")
    assert status == 1, out  # something was corrupt, even though it was repaired
    report = json.loads(out.split("\n\n")[0] if "\n\n" in out else out)
    assert report["corrupt"] == [other] and report["repaired"] == [other], out
    assert oci.sha256_digest(other_path.read_bytes()) == other


async def test_prewarm_of_a_two_platform_index_then_every_platform_pulls_offline(
    tmp_path: Path, registry: Registry, skopeo: Skopeo, http: aiohttp.ClientSession
) -> None:
    index = oci.make_index(tmp_path / "multi", layers=2, layer_size=LAYER_SIZE)
    await skopeo.push(index.oci_ref, registry.host, "team/multi", "latest", all_images=True)
    password = "prewarm-secret"
    htpasswd = tmp_path / "htpasswd"
    hashed = bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds=4)).decode()
    htpasswd.write_text(f"ops:{hashed}\n")
    mapping_extra = {"auth": {"htpasswd": str(htpasswd)}, "access": {"admins": ["ops"]}}
    async with cache_proxy(registry.url, tmp_path / "cache", extra=mapping_extra) as proxy:
        env = {**os.environ, "REGISTRY_PROXY_ADMIN_PASSWORD": password}
        denied, out = await run_cli(
            "prewarm", "up/team/multi:latest", "--all-platforms", "--url", proxy.url, env=env
        )
        assert denied == 1 and "admin credentials" in out, out
        status, out = await run_cli(
            "prewarm",
            "up/team/multi:latest",
            "up/team/absent:latest",
            "--all-platforms",
            "--url",
            proxy.url,
            "--user",
            "ops",
            "--no-progress",
            env=env,
        )
        # The missing image is listed as failed and makes the exit status 1; the index
        # with both platforms was cached all the same.
        assert status == 1, out
        assert "up/team/multi:latest: ok" in out and "up/team/absent:latest" in out, out
        registry.stop()
        for image in index.images:
            arch = image.platform.architecture
            dest = tmp_path / f"offline-{arch}"
            await skopeo.pull(
                proxy.host, "team/multi:latest", dest, arch=arch, creds=f"ops:{password}"
            )
            blobs = dest / "blobs" / "sha256"
            assert {p.name for p in blobs.iterdir()} >= {
                d.removeprefix("sha256:") for d in image.layer_digests
            }


async def test_pin_refresh_caches_a_pinned_tag_nobody_pulled_so_it_pulls_offline(
    tmp_path: Path, registry: Registry, skopeo: Skopeo
) -> None:
    images = await push_images(skopeo, registry, tmp_path / "layouts", ["base/tools"])
    wanted = {images["base/tools"].config.digest, *images["base/tools"].layer_digests}
    async with cache_proxy(
        registry.url, tmp_path / "cache", pin=["up/base/tools:latest"], pin_refresh="1h"
    ) as proxy:
        refresher = proxy.app[PIN_REFRESHER_KEY]
        deadline = time.monotonic() + 60
        while refresher.rounds == 0:  # the first round runs at start
            assert time.monotonic() < deadline, "no pin refresh round within 60 s"
            await asyncio.sleep(0.05)
        assert all(proxy.blob_path(d).exists() for d in wanted)
        registry.stop()
        await skopeo.pull(proxy.host, "base/tools:latest", tmp_path / "offline")
