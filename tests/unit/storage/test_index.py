"""The cache index: manifests and what they reference, tags, pulls, batched access times,
and the images built from them."""

from __future__ import annotations

import json
from pathlib import Path

from proxy.model import Digest
from proxy.storage.disk import DiskBlobStore
from proxy.storage.index import CacheIndex, build_images
from proxy.storage.manifests import ManifestStore
from tests.unit.clock import Clock

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"


def d(name: str) -> Digest:
    return Digest.of(name.encode())


async def test_images_are_roots_with_their_transitive_references(tmp_path: Path) -> None:
    clock = Clock(1000.0)
    index = CacheIndex(tmp_path, clock=clock)
    index.open_sync()
    try:
        await index.record_manifest(d("amd64"), OCI_MANIFEST, 10, [d("cfg1"), d("layer1")])
        await index.record_manifest(d("arm64"), OCI_MANIFEST, 10, [d("cfg2"), d("layer2")])
        await index.record_manifest(d("top"), OCI_INDEX, 10, [d("amd64"), d("arm64")])
        await index.record_manifest(d("solo"), OCI_MANIFEST, 10, [d("layer1")])
        await index.record_tag("up", "multi", "latest", d("top"))
        clock.advance(50)
        index.times.pulled("up", "multi", d("arm64"))  # a platform pulled by digest
        (top, solo) = sorted(build_images(await index.snapshot()), key=lambda i: str(i.tags))
        assert top.root == d("top") and solo.root == d("solo")
        assert top.members == {
            d(n) for n in ("top", "amd64", "arm64", "cfg1", "layer1", "cfg2", "layer2")
        }
        assert top.manifests == {d("top"), d("amd64"), d("arm64")}
        assert top.names() == ["up/multi:latest"]
        assert top.last_used == 1050.0  # the platform's pull counts for the index
        assert solo.last_used == 1000.0 and solo.tags == []
    finally:
        index.close_sync()


async def test_access_times_are_written_in_batches_and_survive_a_reopen(tmp_path: Path) -> None:
    clock = Clock(2000.0)
    index = CacheIndex(tmp_path, clock=clock)
    index.open_sync()
    await index.record_manifest(d("m"), OCI_MANIFEST, 10, [d("l")])
    for _ in range(100):
        index.times.touch([d("l")])  # a hundred uses: memory only
    index.times.pulled("up", "app", d("m"))
    assert index.times.last_used(d("l")) == 2000.0
    await index.flush()
    assert index.times.last_used(d("l")) is None  # drained into the file
    index.close_sync()
    reopened = CacheIndex(tmp_path)
    reopened.open_sync()
    try:
        snapshot = reopened.snapshot_sync()
        assert snapshot.used[d("l")] == 2000.0
        assert snapshot.pulls[d("m")] == [("up", "app")]
        reopened.forget_sync([d("m"), d("l")])
        after = reopened.snapshot_sync()
        assert d("m") not in after.manifests and d("l") not in after.used and not after.pulls
    finally:
        reopened.close_sync()


async def test_a_cold_read_indexes_a_manifest_stored_before_the_index(tmp_path: Path) -> None:
    store = DiskBlobStore(tmp_path)
    store.open_store()
    body = json.dumps({"mediaType": OCI_MANIFEST, "layers": [{"digest": str(d("l"))}]}).encode()
    await ManifestStore(store).put(Digest.of(body), OCI_MANIFEST, body)  # no index then
    index = CacheIndex(tmp_path)
    index.open_sync()
    try:
        assert Digest.of(body) not in (await index.snapshot()).manifests
        assert await ManifestStore(store, index=index).get(Digest.of(body)) is not None
        assert (await index.snapshot()).manifests[Digest.of(body)] == (d("l"),)
    finally:
        index.close_sync()
