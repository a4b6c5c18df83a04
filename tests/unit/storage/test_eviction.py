"""Eviction by image between watermarks: loose blobs first, then least recently pulled
images; never the recently used, the busy or the pinned; every layer forgets."""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from proxy.cache.memory import MemoryTagStore
from proxy.interfaces import TagEntry
from proxy.model import Digest
from proxy.storage.disk import DiskBlobStore
from proxy.storage.eviction import Evictor, Plan
from proxy.storage.index import CacheIndex, IndexedTagStore, TagName
from proxy.storage.manifests import ManifestStore
from proxy.storage.pins import Pins
from tests.unit.clock import Clock

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
MIN_AGE = 100.0


@dataclass
class RecordingLayers:
    """The CacheLayers eviction talks to, over a real memory tag store; counts calls."""

    tags: IndexedTagStore
    forgotten: list[Digest] = field(default_factory=list)
    unlinked: list[tuple[str, str, list[Digest]]] = field(default_factory=list)

    async def forget_tag(self, tag: TagName, digest: Digest) -> None:
        await self.tags.delete(*tag, digest)

    async def forget_content(self, digest: Digest) -> None:
        self.forgotten.append(digest)

    async def unlink(self, upstream: str, repo: str, digests: list[Digest]) -> None:
        self.unlinked.append((upstream, repo, digests))


@dataclass
class Cache:
    store: DiskBlobStore
    index: CacheIndex
    manifests: ManifestStore
    tags: IndexedTagStore
    layers: RecordingLayers
    clock: Clock

    def evictor(self, max_bytes: int, **kwargs: object) -> Evictor:
        return Evictor(
            self.store,
            max_bytes,
            self.index,
            self.layers,
            min_age=MIN_AGE,
            clock=self.clock,
            **kwargs,  # type: ignore[arg-type]
        )

    async def blob(self, data: bytes, age: float) -> Digest:
        digest = Digest.of(data)
        await self.store.put(digest, data)
        when = self.clock() - age
        os.utime(self.store.path(digest), (when, when))
        return digest

    async def image(
        self, repo: str, tag: str, layers: list[Digest], age: float, media_type: str = OCI_MANIFEST
    ) -> Digest:
        """A manifest over ``layers`` pulled ``age`` seconds ago through ``up/<repo>:<tag>``."""
        key = "manifests" if media_type == OCI_INDEX else "layers"
        body = json.dumps(
            {"schemaVersion": 2, "mediaType": media_type, key: [{"digest": str(d)} for d in layers]}
        ).encode()
        digest = Digest.of(body)
        self.clock.advance(-age)
        await self.manifests.put(digest, media_type, body)
        self.index.times.pulled("up", repo, digest)
        await self.tags.set("up", repo, tag, TagEntry(digest, media_type, len(body), self.clock()))
        self.clock.advance(age)
        os.utime(self.store.path(digest), (self.clock() - age, self.clock() - age))
        return digest

    def on_disk(self, digest: Digest) -> bool:
        return self.store.path(digest).exists()


@pytest.fixture
async def cache(tmp_path: Path) -> AsyncIterator[Cache]:
    clock = Clock(1_000_000.0)
    store = DiskBlobStore(tmp_path)
    store.open_store()
    index = CacheIndex(tmp_path, clock=clock)
    index.open_sync()
    tags = IndexedTagStore(MemoryTagStore(100), index)
    yield Cache(store, index, ManifestStore(store, index=index), tags, RecordingLayers(tags), clock)
    index.close_sync()


async def test_loose_blobs_go_oldest_first_until_under_the_low_watermark(cache: Cache) -> None:
    old = [await cache.blob(os.urandom(1000), 1000 - i) for i in range(3)]
    recent = await cache.blob(os.urandom(1000), 10)
    evictor = cache.evictor(4000, high_watermark=0.9, low_watermark=0.6)
    assert cache.store.used_bytes == 4000  # past 90% of 4000
    evictor.maybe_start()
    await evictor.wait()
    # Under 60% of 4000 (2400) takes the two oldest; the recent one is never a candidate.
    assert [cache.on_disk(d) for d in old] == [False, False, True]
    assert cache.on_disk(recent)
    assert cache.store.used_bytes == 2000
    assert cache.layers.forgotten == old[:2]


async def test_nothing_happens_under_the_high_watermark(cache: Cache) -> None:
    blobs = [await cache.blob(os.urandom(1000), 1000) for _ in range(3)]
    evictor = cache.evictor(3500)  # 3000 is under 90% of 3500
    evictor.maybe_start()
    await evictor.wait()
    assert all(cache.on_disk(d) for d in blobs)


async def test_whole_images_go_least_recently_pulled_first_keeping_shared_layers(
    cache: Cache,
) -> None:
    shared = await cache.blob(os.urandom(1000), 5000)
    a_only = await cache.blob(os.urandom(1000), 5000)
    b_only = await cache.blob(os.urandom(1000), 5000)
    a = await cache.image("app/a", "v1", [shared, a_only], age=3000)
    b = await cache.image("app/b", "v1", [shared, b_only], age=2000)
    evictor = cache.evictor(3000, high_watermark=0.9, low_watermark=0.8)
    evictor.maybe_start()
    await evictor.wait()
    # a (pulled longest ago) is gone with the layer only it used; b is whole.
    assert not cache.on_disk(a) and not cache.on_disk(a_only)
    assert cache.on_disk(shared) and cache.on_disk(b) and cache.on_disk(b_only)
    assert await cache.tags.get("up", "app/a", "v1") is None
    assert await cache.tags.get("up", "app/b", "v1") is not None
    assert ("up", "app/a", [a, a_only]) in cache.layers.unlinked
    # The index forgot a and kept b.
    snapshot = await cache.index.snapshot()
    assert a not in snapshot.manifests and b in snapshot.manifests


async def test_an_index_goes_with_its_platform_manifests_and_their_blobs(cache: Cache) -> None:
    amd = await cache.blob(os.urandom(1000), 5000)
    arm = await cache.blob(os.urandom(1000), 5000)
    amd_manifest = await cache.image("multi", "amd64-only", [amd], age=4000)
    arm_manifest = await cache.image("multi", "arm64-only", [arm], age=4000)
    top = await cache.image("multi", "latest", [amd_manifest, arm_manifest], 4000, OCI_INDEX)
    evictor = cache.evictor(2000, low_watermark=0.1, high_watermark=0.5)
    evictor.maybe_start()
    await evictor.wait()
    assert not any(cache.on_disk(d) for d in (top, amd_manifest, arm_manifest, amd, arm))
    for tag in ("latest", "amd64-only", "arm64-only"):
        assert await cache.tags.get("up", "multi", tag) is None
    assert cache.store.used_bytes == 0


async def test_recently_pulled_images_survive_even_over_the_limit(cache: Cache) -> None:
    layer = await cache.blob(os.urandom(1000), 5000)
    image = await cache.image("app", "v1", [layer], age=5000)
    cache.index.times.pulled("up", "app", image)  # pulled just now (in memory, unflushed)
    evictor = cache.evictor(500)
    evictor.maybe_start()
    await evictor.wait()
    assert cache.on_disk(image) and cache.on_disk(layer)
    assert await cache.tags.get("up", "app", "v1") is not None


async def test_a_busy_blob_is_never_evicted(cache: Cache) -> None:
    busy = await cache.blob(os.urandom(1000), 5000)
    idle = await cache.blob(os.urandom(1000), 5000)
    evictor = cache.evictor(1000, busy=lambda d: d == busy)
    evictor.maybe_start()
    await evictor.wait()
    assert cache.on_disk(busy) and not cache.on_disk(idle)


async def test_pinned_images_survive_and_pins_over_the_limit_are_reported(cache: Cache) -> None:
    layer = await cache.blob(os.urandom(2000), 5000)
    await cache.image("library/base", "latest", [layer], age=5000)
    other = await cache.blob(os.urandom(500), 5000)
    evictor = cache.evictor(1000, pinned=Pins(["up/library/*:latest"]).image_pinned)
    evictor.maybe_start()
    await evictor.wait()
    assert cache.on_disk(layer) and not cache.on_disk(other)
    assert evictor.pins_over_limit
    assert evictor.last_plan is not None and evictor.last_plan.pinned_bytes > 2000


async def test_a_use_after_the_plan_saves_the_victim(cache: Cache) -> None:
    layer = await cache.blob(os.urandom(1000), 5000)
    image = await cache.image("app", "v1", [layer], age=5000)
    evictor = cache.evictor(500)
    plan = await evictor.plan()
    (victim,) = plan.victims
    cache.index.times.pulled("up", "app", image)  # a pull between plan and removal
    assert await evictor.remove(victim, "size") is None
    assert cache.on_disk(image) and cache.on_disk(layer)


def test_pin_patterns() -> None:
    pins = Pins(["dockerhub/library/*:latest", "ghcr/acme/**", "up/team/app:v*"])
    assert pins.matches("dockerhub/library/nginx:latest")
    assert not pins.matches("dockerhub/library/nginx:1.25")
    assert not pins.matches("dockerhub/library/x/nginx:latest")
    assert pins.matches("ghcr/acme/tools/builder:2024")
    assert pins.matches("up/team/app:v1.2")
    assert not pins.matches("up/team/app:latest")
    assert pins.tag_pinned(("up", "team/app", "v1#application/vnd.oci.image.manifest.v1+json"))


async def test_a_tag_set_while_its_manifest_is_removed_does_not_outlive_it(cache: Cache) -> None:
    layer = await cache.blob(os.urandom(1000), 5000)
    image = await cache.image("app", "v1", [layer], age=5000)
    evictor = cache.evictor(500)

    async def present(digest: Digest) -> bool:
        await evictor.settled(digest)
        return cache.on_disk(digest)

    # What a client's pull does meanwhile: record the tag again (memory store of its own).
    client_tags = IndexedTagStore(MemoryTagStore(10), cache.index, present)
    started: list[asyncio.Task[None]] = []
    forget = cache.layers.forget_content

    async def forget_and_race(digest: Digest) -> None:
        if not started:
            entry = TagEntry(image, OCI_MANIFEST, 100, cache.clock())
            task = asyncio.create_task(client_tags.set("up", "app", "v1", entry))
            started.append(task)
            # Given ample time while the manifest is still on disk, the set cannot end:
            # it waits for this removal before it looks whether its manifest is there.
            await asyncio.wait({task}, timeout=0.5)
            assert not task.done()
        await forget(digest)

    cache.layers.forget_content = forget_and_race  # type: ignore[method-assign]
    evictor.maybe_start()
    await evictor.wait()
    await started[0]
    assert not cache.on_disk(image)
    assert await client_tags.get("up", "app", "v1") is None
    assert (await cache.index.tags_of([image])) == []


async def test_an_image_used_after_the_plan_keeps_what_it_shares_with_the_next_victim(
    cache: Cache,
) -> None:
    shared = await cache.blob(os.urandom(1000), 5000)
    a_only = await cache.blob(os.urandom(1000), 5000)
    b_only = await cache.blob(os.urandom(1000), 5000)
    a = await cache.image("app/a", "v1", [shared, a_only], age=3000)  # the older: first victim
    b = await cache.image("app/b", "v1", [shared, b_only], age=2000)
    after_plan = {"yes": False}
    # a becomes busy once the plan is made (a client started pulling it again).
    evictor = cache.evictor(600, low_watermark=0.1, busy=lambda d: after_plan["yes"] and d == a)
    plan = evictor.plan

    async def plan_then_a_is_used() -> Plan:
        made = await plan()
        after_plan["yes"] = True
        return made

    evictor.plan = plan_then_a_is_used  # type: ignore[method-assign]
    evictor.maybe_start()
    await evictor.wait()
    # b went; the layer it shared with a (which the plan had counted as a's to free
    # first) stayed with a, which is whole.
    assert not cache.on_disk(b) and not cache.on_disk(b_only)
    assert cache.on_disk(a) and cache.on_disk(a_only) and cache.on_disk(shared)


async def test_low_space_evicts_without_a_size_bound_in_the_same_order(cache: Cache) -> None:
    old = await cache.blob(os.urandom(1000), 5000)
    layer = await cache.blob(os.urandom(1000), 5000)
    image = await cache.image("app", "v1", [layer], age=4000)
    recent = await cache.blob(os.urandom(1000), 10)
    cache.store.min_free = 1 << 60  # from now on the filesystem is short of space
    evictor = cache.evictor(None)  # no cache.max_size
    evictor.maybe_start()
    await evictor.wait()
    assert cache.on_disk(old)  # nothing to do without a bound or a lack of space
    evictor.maybe_start(low_space=True)
    await evictor.wait()
    assert not cache.on_disk(old) and not cache.on_disk(image) and not cache.on_disk(layer)
    assert await cache.tags.get("up", "app", "v1") is None
    assert cache.on_disk(recent)  # used within min_age: kept however short the space
