"""The operator's cache commands on a registry opened the way the CLI opens it."""

from __future__ import annotations

import json
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from proxy.interfaces import TagEntry
from proxy.model import Digest
from proxy.pullthrough.operations import CacheOperations
from proxy.pullthrough.registry import DirectoryBusy, PullThroughRegistry
from proxy.settings import Settings
from proxy.storage.lock import DirectoryLock

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OLD = time.time() - 10 * 86400


def settings(cache_dir: Path, **cache: object) -> Settings:
    mapping = {
        "cache": {"dir": str(cache_dir), **cache},
        "upstreams": [{"name": "up", "url": "http://127.0.0.1:9", "default": True}],
    }
    return Settings.from_mapping(mapping, environ={})


@pytest.fixture
async def registry(tmp_path: Path) -> AsyncIterator[PullThroughRegistry]:
    opened = PullThroughRegistry(settings(tmp_path, gc_grace="1h", max_age="7d", pin=["up/keep:*"]))
    await opened.open(exclusive=True)
    yield opened
    await opened.close()


async def blob(registry: PullThroughRegistry, data: bytes, at: float = OLD) -> Digest:
    digest = Digest.of(data)
    await registry.store.put(digest, data)
    os.utime(registry.store.path(digest), (at, at))
    return digest


async def image(registry: PullThroughRegistry, repo: str, layers: list[Digest]) -> Digest:
    body = json.dumps({"mediaType": OCI_MANIFEST, "layers": [{"digest": str(d)} for d in layers]})
    digest = Digest.of(body.encode())
    await registry.manifest_store.put(digest, OCI_MANIFEST, body.encode())
    await registry.tags.set("up", repo, "v1", TagEntry(digest, OCI_MANIFEST, len(body), OLD))
    await registry.index.flush()
    os.utime(registry.store.path(digest), (OLD, OLD))
    return digest


async def test_gc_removes_old_temp_files_loose_blobs_and_unpulled_images_not_pins(
    registry: PullThroughRegistry, tmp_path: Path
) -> None:
    ops = CacheOperations(registry)
    old_temp = tmp_path / "tmp" / f"{'ab' * 32}.1234.part"
    old_temp.write_bytes(b"x")
    os.utime(old_temp, (OLD, OLD))
    fresh_temp = tmp_path / "tmp" / f"{'cd' * 32}.5678.part"
    fresh_temp.write_bytes(b"y")
    loose_old = await blob(registry, b"loose old")
    loose_new = await blob(registry, b"loose new", at=time.time())
    layer = await blob(registry, b"layer of an old image")
    pinned_layer = await blob(registry, b"layer of a pinned image")
    old_image = await image(registry, "old", [layer])
    pinned = await image(registry, "keep", [pinned_layer])
    # Stored and last used long ago, as the index says of images not pulled for days.
    for sql in ("UPDATE manifests SET stored_at = ?", "UPDATE used SET at = ?"):
        registry.index._locked(lambda db, sql=sql: db.execute(sql, (OLD,)).close(), None)

    dry = await ops.gc(dry_run=True)
    assert dry["temp_files"] == 1 and dry["loose_blobs"] == 1
    assert dry["images"] == ["up/old:v1"]
    assert registry.store.path(loose_old).exists() and old_temp.exists()

    done = await ops.gc()
    assert done["freed_bytes"] > 0
    assert not old_temp.exists() and fresh_temp.exists()
    assert not registry.store.path(loose_old).exists()
    assert registry.store.path(loose_new).exists()
    assert not registry.store.path(old_image).exists() and not registry.store.path(layer).exists()
    assert await registry.tags.get("up", "old", "v1") is None
    assert registry.store.path(pinned).exists() and registry.store.path(pinned_layer).exists()
    listed = await ops.images()
    assert [(i["names"], i["pinned"]) for i in listed] == [(["up/keep:v1"], True)]


async def test_the_directory_lock_keeps_a_proxy_and_the_cli_apart(tmp_path: Path) -> None:
    serving = PullThroughRegistry(settings(tmp_path))
    await serving.open()  # a proxy: shared
    try:
        second_worker = DirectoryLock(tmp_path)
        assert second_worker.acquire(exclusive=False)  # workers share the directory
        second_worker.release()
        cli = PullThroughRegistry(settings(tmp_path))
        with pytest.raises(DirectoryBusy):
            await cli.open(exclusive=True)
        await cli.close()
    finally:
        await serving.close()
    cli = PullThroughRegistry(settings(tmp_path))
    await cli.open(exclusive=True)  # the proxy stopped: the CLI may work on the files
    try:
        with pytest.raises(DirectoryBusy):
            await PullThroughRegistry(settings(tmp_path)).open()
    finally:
        await cli.close()
