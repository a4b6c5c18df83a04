"""ProxyManifestService: tag TTL, HEAD revalidation, stale serving, Accept, coalescing.

The upstream is a fake that counts calls; storage is the real ManifestStore over a
DiskBlobStore; time is a clock the test moves.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from proxy.cache.memory import MemoryLinkStore, MemoryTagStore
from proxy.errors import (
    ManifestUnknown,
    NotAcceptable,
    RegistryError,
    TooManyRequests,
    UpstreamError,
    UpstreamUnavailable,
)
from proxy.interfaces import ManifestSource, TagEntry, UpstreamManifest
from proxy.model import (
    MEDIA_TYPE_DOCKER_MANIFEST,
    MEDIA_TYPE_OCI_INDEX,
    MEDIA_TYPE_OCI_MANIFEST,
    Digest,
    Outcome,
    Reference,
)
from proxy.pullthrough.manifests import ManifestResult, ProxyManifestService
from proxy.settings import UpstreamSettings
from proxy.storage.disk import DiskBlobStore
from proxy.storage.manifests import ManifestStore
from proxy.upstream.health import UpstreamHealth
from tests.unit.clock import Clock
from tests.unit.fake_registry import manifest_body

TTL = 300.0
REPO = "team/app"
V1 = manifest_body("v1")
V2 = manifest_body("v2")
INDEX = manifest_body("index", MEDIA_TYPE_OCI_INDEX)
DOCKER = manifest_body("docker", MEDIA_TYPE_DOCKER_MANIFEST)


@dataclass(frozen=True)
class Call:
    method: str
    repo: str
    reference: str
    accept: str | None


class FakeUpstream(ManifestSource):
    """Plays ``UpstreamClient.get_manifest``; tags map to variants chosen by Accept."""

    def __init__(self) -> None:
        self.name = "fake"
        self.health = UpstreamHealth("fake", failures=1000, cooldown=30.0, budget_floor=10)
        self.tags: dict[str, list[tuple[str, bytes]]] = {}
        self.by_digest: dict[str, tuple[str, bytes]] = {}
        self.calls: list[Call] = []
        self.error: RegistryError | None = None
        self.gate: asyncio.Event | None = None
        self.called = asyncio.Event()

    def tag(self, tag: str, *variants: tuple[str, bytes]) -> None:
        self.tags[tag] = list(variants)
        for media_type, body in variants:
            self.by_digest[str(Digest.of(body))] = (media_type, body)

    def methods(self) -> list[str]:
        return [call.method for call in self.calls]

    async def get_manifest(
        self, repo: str, reference: str, accept: str | None, *, head: bool = False
    ) -> UpstreamManifest:
        self.calls.append(Call("HEAD" if head else "GET", repo, reference, accept))
        self.called.set()
        if self.gate is not None:
            await self.gate.wait()
        if self.error is not None:
            raise self.error
        if reference in self.by_digest:
            media_type, body = self.by_digest[reference]
        else:
            chosen = [
                (mt, b) for mt, b in self.tags.get(reference, []) if accept is None or mt in accept
            ]
            if not chosen:
                raise ManifestUnknown(f"{reference} unknown")
            media_type, body = chosen[0]
        return UpstreamManifest(Digest.of(body), media_type, len(body), None if head else body)


@dataclass
class Rig:
    service: ProxyManifestService
    upstream: FakeUpstream
    clock: Clock
    store: ManifestStore

    async def get(self, reference: str, accept: str | None = None) -> ManifestResult:
        return await self.service.get(REPO, Reference.parse(reference), accept)


def make_rig(tmp_path: Path, **settings: Any) -> Rig:
    disk = DiskBlobStore(tmp_path / "cache")
    disk.open_store()
    store = ManifestStore(disk)
    upstream = FakeUpstream()
    clock = Clock()
    service = ProxyManifestService(
        UpstreamSettings(name="fake", url="http://127.0.0.1:1", tag_ttl=TTL, **settings),
        upstream,
        store,
        MemoryTagStore(100),
        MemoryLinkStore(100),
        clock=clock,
    )
    return Rig(service, upstream, clock, store)


@pytest.fixture
async def rig(tmp_path: Path) -> AsyncIterator[Rig]:
    rig = make_rig(tmp_path)
    yield rig
    await rig.service.close()


# --- by tag ------------------------------------------------------------------------------


async def test_first_pull_fetches_and_stores(rig: Rig) -> None:
    rig.upstream.tag("v1", (MEDIA_TYPE_OCI_MANIFEST, V1))

    result = await rig.get("v1")

    assert result.outcome == Outcome.MISS
    assert result.manifest.body == V1
    assert result.manifest.digest == Digest.of(V1)
    assert result.manifest.media_type == MEDIA_TYPE_OCI_MANIFEST
    assert rig.upstream.calls == [Call("GET", REPO, "v1", None)]
    assert await rig.store.get(Digest.of(V1)) is not None


async def test_tag_within_ttl_makes_no_upstream_call(rig: Rig) -> None:
    rig.upstream.tag("v1", (MEDIA_TYPE_OCI_MANIFEST, V1))
    await rig.get("v1")
    rig.upstream.calls.clear()

    rig.clock.now += TTL - 1
    result = await rig.get("v1")

    assert result.outcome == Outcome.HIT
    assert result.manifest.body == V1
    assert rig.upstream.calls == []


async def test_after_ttl_same_digest_is_one_head_and_no_get(rig: Rig) -> None:
    rig.upstream.tag("v1", (MEDIA_TYPE_OCI_MANIFEST, V1))
    await rig.get("v1")
    rig.upstream.calls.clear()

    rig.clock.now += TTL + 1
    result = await rig.get("v1")

    assert result.outcome == Outcome.REVALIDATED
    assert result.manifest.body == V1
    assert rig.upstream.calls == [Call("HEAD", REPO, "v1", None)]

    # Revalidation refreshed the mapping: fresh again for another TTL.
    rig.upstream.calls.clear()
    rig.clock.now += TTL - 1
    assert (await rig.get("v1")).outcome == Outcome.HIT
    assert rig.upstream.calls == []


async def test_after_ttl_new_digest_is_fetched_by_digest(rig: Rig) -> None:
    rig.upstream.tag("v1", (MEDIA_TYPE_OCI_MANIFEST, V1))
    await rig.get("v1")
    rig.upstream.tag("v1", (MEDIA_TYPE_OCI_MANIFEST, V2))  # the tag moved upstream
    rig.upstream.calls.clear()

    rig.clock.now += TTL + 1
    result = await rig.get("v1")

    assert result.outcome == Outcome.MISS
    assert result.manifest.body == V2
    assert rig.upstream.calls == [
        Call("HEAD", REPO, "v1", None),
        Call("GET", REPO, str(Digest.of(V2)), None),
    ]
    rig.upstream.calls.clear()
    assert (await rig.get("v1")).manifest.body == V2
    assert rig.upstream.calls == []


@pytest.mark.parametrize(
    "error",
    [
        UpstreamUnavailable("connection refused"),
        UpstreamError("upstream answered 500"),
        TooManyRequests("slow down", headers={"Retry-After": "60"}),
    ],
    ids=["unavailable", "5xx", "429"],
)
async def test_upstream_failure_after_ttl_serves_stale(rig: Rig, error: RegistryError) -> None:
    rig.upstream.tag("v1", (MEDIA_TYPE_OCI_MANIFEST, V1))
    await rig.get("v1")
    rig.upstream.error = error
    rig.upstream.calls.clear()

    rig.clock.now += TTL + 1
    result = await rig.get("v1")

    assert result.outcome == Outcome.STALE
    assert result.manifest.body == V1
    assert rig.upstream.methods() == ["HEAD"]


async def test_stale_is_not_served_beyond_max_stale(tmp_path: Path) -> None:
    rig = make_rig(tmp_path, max_stale=3600.0)
    try:
        rig.upstream.tag("v1", (MEDIA_TYPE_OCI_MANIFEST, V1))
        await rig.get("v1")
        rig.upstream.error = UpstreamUnavailable("down")

        rig.clock.now += TTL + 3600 - 1
        assert (await rig.get("v1")).outcome == Outcome.STALE
        rig.clock.now += 2
        with pytest.raises(UpstreamUnavailable):
            await rig.get("v1")
    finally:
        await rig.service.close()


async def test_tag_gone_upstream_is_not_served_stale_by_default(rig: Rig) -> None:
    rig.upstream.tag("v1", (MEDIA_TYPE_OCI_MANIFEST, V1))
    await rig.get("v1")
    del rig.upstream.tags["v1"]

    rig.clock.now += TTL + 1
    with pytest.raises(ManifestUnknown):
        await rig.get("v1")


@pytest.mark.parametrize(
    "error",
    [UpstreamUnavailable("connection refused"), UpstreamError("upstream answered 502")],
    ids=["unavailable", "5xx"],
)
async def test_nothing_cached_and_failure_propagates(rig: Rig, error: RegistryError) -> None:
    rig.upstream.error = error
    with pytest.raises(type(error)):
        await rig.get("v1")


async def test_too_many_requests_with_nothing_cached_stays_429(rig: Rig) -> None:
    rig.upstream.error = TooManyRequests("slow down", headers={"Retry-After": "17"})

    with pytest.raises(TooManyRequests) as info:
        await rig.get("v1")

    assert info.value.status == 429
    assert info.value.headers["Retry-After"] == "17"


async def test_unknown_tag_is_manifest_unknown(rig: Rig) -> None:
    with pytest.raises(ManifestUnknown):
        await rig.get("nope")


async def test_accept_refusing_the_cached_type_asks_upstream(rig: Rig) -> None:
    rig.upstream.tag("v1", (MEDIA_TYPE_OCI_MANIFEST, V1), (MEDIA_TYPE_DOCKER_MANIFEST, DOCKER))
    await rig.get("v1", MEDIA_TYPE_OCI_MANIFEST)
    rig.upstream.calls.clear()

    result = await rig.get("v1", MEDIA_TYPE_DOCKER_MANIFEST)

    assert result.manifest.body == DOCKER
    assert result.manifest.media_type == MEDIA_TYPE_DOCKER_MANIFEST
    assert rig.upstream.calls == [Call("GET", REPO, "v1", MEDIA_TYPE_DOCKER_MANIFEST)]


async def test_a_narrow_accept_does_not_repoint_the_tag_for_everyone(rig: Rig) -> None:
    # A multi-arch tag: clients that accept indexes get the index; an old client that
    # accepts only single-image manifests gets one platform's manifest. The old client
    # must not make the tag mean that single manifest for every client that follows.
    rig.upstream.tag("v1", (MEDIA_TYPE_OCI_INDEX, INDEX), (MEDIA_TYPE_DOCKER_MANIFEST, DOCKER))
    assert (await rig.get("v1")).manifest.body == INDEX
    assert (await rig.get("v1", MEDIA_TYPE_DOCKER_MANIFEST)).manifest.body == DOCKER

    result = await rig.get("v1")

    assert result.manifest.body == INDEX


async def test_concurrent_tag_misses_are_one_upstream_get(rig: Rig) -> None:
    rig.upstream.tag("v1", (MEDIA_TYPE_OCI_MANIFEST, V1))
    rig.upstream.gate = asyncio.Event()
    pulls = [asyncio.create_task(rig.get("v1")) for _ in range(8)]
    # Pulls run in creation order and none suspends before joining the coalescer, so
    # when the shared call starts every pull has joined it.
    await rig.upstream.called.wait()
    rig.upstream.gate.set()

    results = await asyncio.gather(*pulls)

    assert [r.manifest.body for r in results] == [V1] * 8
    assert rig.upstream.calls == [Call("GET", REPO, "v1", None)]
    # One started the fetch; the others joined it and say so.
    assert [r.outcome for r in results] == [Outcome.MISS] + [Outcome.COALESCED] * 7


async def test_only_the_request_that_starts_a_fetch_passes_the_gate(rig: Rig) -> None:
    """Quotas count cold fetches: joining one in flight costs the upstream nothing."""

    class CountingGate:
        admitted = 0

        async def admit(self) -> None:
            self.admitted += 1

        async def charge(self, size: int) -> None:
            return None

    gate = CountingGate()
    rig.upstream.tag("v1", (MEDIA_TYPE_OCI_MANIFEST, V1))
    rig.upstream.gate = asyncio.Event()
    pulls = [
        asyncio.create_task(rig.service.get(REPO, Reference.parse("v1"), None, gate))
        for _ in range(4)
    ]
    await rig.upstream.called.wait()
    rig.upstream.gate.set()
    await asyncio.gather(*pulls)
    assert gate.admitted == 1


async def test_concurrent_revalidations_are_one_head(rig: Rig) -> None:
    rig.upstream.tag("v1", (MEDIA_TYPE_OCI_MANIFEST, V1))
    await rig.get("v1")
    rig.upstream.calls.clear()
    rig.clock.now += TTL + 1
    rig.upstream.gate = asyncio.Event()
    pulls = [asyncio.create_task(rig.get("v1")) for _ in range(5)]
    await rig.upstream.called.wait()
    rig.upstream.gate.set()

    results = await asyncio.gather(*pulls)

    assert {r.outcome for r in results} == {Outcome.REVALIDATED}
    assert rig.upstream.methods() == ["HEAD"]


async def test_low_pull_budget_serves_tags_without_revalidating(rig: Rig) -> None:
    rig.upstream.tag("v1", (MEDIA_TYPE_OCI_MANIFEST, V1))
    await rig.get("v1")
    rig.upstream.health.observe({"ratelimit-remaining": "3;w=21600"})
    rig.upstream.calls.clear()

    rig.clock.now += TTL + 1
    assert (await rig.get("v1")).outcome == Outcome.HIT
    with pytest.raises(TooManyRequests):
        await rig.get("v2")  # a cold pull is refused to keep the last pulls
    assert rig.upstream.calls == []


# --- by digest ------------------------------------------------------------------------------


async def test_by_digest_miss_then_hit(rig: Rig) -> None:
    rig.upstream.tag("v1", (MEDIA_TYPE_OCI_MANIFEST, V1))
    digest = str(Digest.of(V1))

    first = await rig.get(digest)
    second = await rig.get(digest)

    assert (first.outcome, second.outcome) == (Outcome.MISS, Outcome.HIT)
    assert first.manifest.body == second.manifest.body == V1
    assert rig.upstream.calls == [Call("GET", REPO, digest, None)]


async def test_by_digest_after_tag_pull_is_a_hit(rig: Rig) -> None:
    rig.upstream.tag("v1", (MEDIA_TYPE_OCI_MANIFEST, V1))
    await rig.get("v1")
    rig.upstream.calls.clear()
    assert (await rig.get(str(Digest.of(V1)))).outcome == Outcome.HIT
    assert rig.upstream.calls == []


async def test_by_digest_cached_with_refusing_accept_is_not_acceptable(rig: Rig) -> None:
    rig.upstream.tag("v1", (MEDIA_TYPE_OCI_MANIFEST, V1))
    digest = str(Digest.of(V1))
    await rig.get(digest)
    rig.upstream.calls.clear()

    with pytest.raises(NotAcceptable):
        await rig.get(digest, MEDIA_TYPE_DOCKER_MANIFEST)
    assert rig.upstream.calls == []


async def test_by_digest_cached_for_another_repository_is_confirmed_upstream(rig: Rig) -> None:
    rig.upstream.tag("v1", (MEDIA_TYPE_OCI_MANIFEST, V1))
    digest = str(Digest.of(V1))
    await rig.service.get("other/repo", Reference.parse(digest), None)
    rig.upstream.calls.clear()

    result = await rig.get(digest)

    assert result.outcome == Outcome.HIT
    assert rig.upstream.calls == [Call("HEAD", REPO, digest, None)]
    rig.upstream.calls.clear()
    await rig.get(digest)
    assert rig.upstream.calls == []


# --- coordination with other processes (proxy.cluster's hooks) ---------------------------


class FakeRevalidations:
    """A ``TagRevalidations`` that answers what the test says and records each turn."""

    def __init__(self, answer: TagEntry | None) -> None:
        self.answer = answer
        self.turns: list[tuple[str, str, str]] = []
        self.inside = False

    @contextlib.asynccontextmanager
    async def turn(
        self, upstream: str, repo: str, tag: str, seen: TagEntry
    ) -> AsyncIterator[TagEntry | None]:
        self.turns.append((upstream, repo, tag))
        self.inside = True
        try:
            yield self.answer
        finally:
            self.inside = False


class FakeBodies:
    def __init__(self) -> None:
        self.bodies: dict[Digest, tuple[str, bytes]] = {}

    async def get(self, digest: Digest) -> tuple[str, bytes] | None:
        return self.bodies.get(digest)

    async def put(self, digest: Digest, media_type: str, body: bytes) -> None:
        self.bodies[digest] = (media_type, body)


def coordinated_rig(
    tmp_path: Path, revalidations: FakeRevalidations | None, bodies: FakeBodies | None
) -> tuple[Rig, MemoryTagStore, MemoryLinkStore]:
    disk = DiskBlobStore(tmp_path / "cache")
    disk.open_store()
    store = ManifestStore(disk)
    tags, links = MemoryTagStore(100), MemoryLinkStore(100)
    upstream, clock = FakeUpstream(), Clock()
    service = ProxyManifestService(
        UpstreamSettings(name="fake", url="http://127.0.0.1:1", tag_ttl=TTL),
        upstream,
        store,
        tags,
        links,
        clock=clock,
        revalidations=revalidations,
        bodies=bodies,
    )
    return Rig(service, upstream, clock, store), tags, links


async def test_a_tag_another_process_revalidated_costs_no_head(tmp_path: Path) -> None:
    turns = FakeRevalidations(None)
    rig, _, _ = coordinated_rig(tmp_path, turns, None)
    rig.upstream.tag("v1", (MEDIA_TYPE_OCI_MANIFEST, V1))
    await rig.get("v1")
    rig.upstream.calls.clear()
    rig.clock.now += TTL + 1
    # The other process found the tag unchanged: its entry is what the turn yields.
    turns.answer = TagEntry(Digest.of(V1), MEDIA_TYPE_OCI_MANIFEST, len(V1), rig.clock.now)
    result = await rig.get("v1")
    assert result.manifest.body == V1
    assert result.outcome == Outcome.REVALIDATED
    assert rig.upstream.calls == []
    assert turns.turns == [("fake", REPO, "v1")]
    await rig.service.close()


async def test_holding_the_turn_the_process_sends_the_head_inside_it(tmp_path: Path) -> None:
    turns = FakeRevalidations(None)
    rig, _, _ = coordinated_rig(tmp_path, turns, None)
    rig.upstream.tag("v1", (MEDIA_TYPE_OCI_MANIFEST, V1))
    await rig.get("v1")
    rig.upstream.calls.clear()
    rig.clock.now += TTL + 1
    seen_inside: list[bool] = []
    original = rig.upstream.get_manifest

    async def spying(repo: str, ref: str, accept: str | None, *, head: bool = False) -> Any:
        seen_inside.append(turns.inside)
        return await original(repo, ref, accept, head=head)

    rig.upstream.get_manifest = spying  # type: ignore[method-assign]
    result = await rig.get("v1")
    assert result.outcome == Outcome.REVALIDATED
    assert rig.upstream.methods() == ["HEAD"]
    assert seen_inside == [True]  # the others wait until the result is recorded
    await rig.service.close()


async def test_a_new_digest_from_another_process_comes_from_the_shared_bodies(
    tmp_path: Path,
) -> None:
    turns, bodies = FakeRevalidations(None), FakeBodies()
    rig, _, links = coordinated_rig(tmp_path, turns, bodies)
    rig.upstream.tag("v1", (MEDIA_TYPE_OCI_MANIFEST, V1))
    await rig.get("v1")
    assert Digest.of(V1) in bodies.bodies  # what this process fetched, it shares
    # Another process revalidated: the tag moved to V2, whose body it shared, and the
    # repository's link to it is known.
    rig.upstream.calls.clear()
    rig.clock.now += TTL + 1
    await bodies.put(Digest.of(V2), MEDIA_TYPE_OCI_MANIFEST, V2)
    await links.link("fake", REPO, [Digest.of(V2)])
    turns.answer = TagEntry(Digest.of(V2), MEDIA_TYPE_OCI_MANIFEST, len(V2), rig.clock.now)
    result = await rig.get("v1")
    assert result.manifest.body == V2
    assert rig.upstream.calls == []
    await rig.service.close()


async def test_a_shared_body_is_not_used_for_a_repository_not_known_to_hold_it(
    tmp_path: Path,
) -> None:
    bodies = FakeBodies()
    rig, _, _ = coordinated_rig(tmp_path, None, bodies)
    rig.upstream.tag("v2", (MEDIA_TYPE_OCI_MANIFEST, V2))
    await bodies.put(Digest.of(V2), MEDIA_TYPE_OCI_MANIFEST, V2)
    result = await rig.get(str(Digest.of(V2)))
    assert result.manifest.body == V2
    assert rig.upstream.calls == [Call("GET", REPO, str(Digest.of(V2)), None)]
    await rig.service.close()
