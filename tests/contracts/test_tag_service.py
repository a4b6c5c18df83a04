"""TagService contract suite, run against every implementation (after Distribution's
``cache/cachecheck``).

The contract, from ``proxy.interfaces``: ``get`` of an unknown tag is None; ``set`` then
``get`` returns what was set, whatever its age (a mapping past its TTL is what a stale
serve needs); a later ``set`` replaces; entries are keyed by upstream, repository and tag.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

from proxy.cache.memory import MemoryTagStore
from proxy.cache.redis import RedisTagStore
from proxy.cache.tiered import TieredTagStore
from proxy.interfaces import TagEntry, TagService
from proxy.model import Digest
from tests.contracts.stores import Stores, digest_of

TagFactory = Callable[[Stores], TagService]
TAG_TTL = 300.0

TAG_SERVICES: dict[str, TagFactory] = {
    "MemoryTagStore": lambda s: MemoryTagStore(100),
    "RedisTagStore": lambda s: RedisTagStore(s.redis()),
    "SqliteState": lambda s: s.sqlite(),
    "TieredTagStore(Memory,Redis)": lambda s: TieredTagStore(
        MemoryTagStore(100), RedisTagStore(s.redis()), lambda _name: TAG_TTL, l2_layer="redis"
    ),
    # The embedded defaults (no Redis configured), as PullThroughRegistry wires them.
    "TieredTagStore(Memory,Sqlite)": lambda s: TieredTagStore(
        MemoryTagStore(100), s.sqlite(), lambda _name: TAG_TTL, l2_layer="disk"
    ),
}


@pytest.fixture(params=list(TAG_SERVICES.values()), ids=list(TAG_SERVICES))
def tags(request: pytest.FixtureRequest, stores: Stores) -> TagService:
    factory: TagFactory = request.param
    return factory(stores)


DIGEST = digest_of("one")
ENTRY = TagEntry(DIGEST, "application/vnd.oci.image.manifest.v1+json", 512, 1000.25)


async def test_tag_get_of_unknown_is_none(tags: TagService) -> None:
    assert await tags.get("hub", "library/nginx", "latest") is None


async def test_tag_set_then_get(tags: TagService) -> None:
    await tags.set("hub", "library/nginx", "latest", ENTRY)
    assert await tags.get("hub", "library/nginx", "latest") == ENTRY


async def test_tag_set_replaces_and_is_idempotent(tags: TagService) -> None:
    await tags.set("hub", "library/nginx", "latest", ENTRY)
    newer = TagEntry(digest_of("newer"), ENTRY.media_type, 600, 2000.5)
    await tags.set("hub", "library/nginx", "latest", newer)
    await tags.set("hub", "library/nginx", "latest", newer)
    assert await tags.get("hub", "library/nginx", "latest") == newer


async def test_tags_are_keyed_by_upstream_repo_and_tag(tags: TagService) -> None:
    await tags.set("hub", "library/nginx", "latest", ENTRY)
    assert await tags.get("ghcr", "library/nginx", "latest") is None
    assert await tags.get("hub", "library/redis", "latest") is None
    assert await tags.get("hub", "library/nginx", "stable") is None
    assert await tags.get("hub", "library", "nginx/latest") is None


async def test_tag_entries_are_kept_past_any_ttl(tags: TagService) -> None:
    # A mapping past its TTL is what a stale serve needs: stores never expire it early.
    ancient = TagEntry(DIGEST, ENTRY.media_type, 512, 1.0)
    await tags.set("hub", "library/nginx", "old", ancient)
    assert await tags.get("hub", "library/nginx", "old") == ancient


async def test_tag_entry_round_trips_exactly(tags: TagService) -> None:
    # A wall-clock fetched_at with sub-millisecond digits, a size past 32 bits, a sha512
    # digest and the key ProxyManifestService uses for a narrow Accept (tag_key).
    entry = TagEntry(
        Digest("sha512", "ab" * 64),
        "application/vnd.docker.distribution.manifest.v2+json",
        2**40 + 3,
        1764650000.123457,
    )
    key = "v1.2#application/vnd.docker.distribution.manifest.v2+json"
    await tags.set("hub", "team/app", key, entry)
    got = await tags.get("hub", "team/app", key)
    assert got == entry
    assert got is not None and got.fetched_at == entry.fetched_at
    assert await tags.get("hub", "team/app", "v1.2") is None


async def test_tag_delete_forgets_a_mapping_to_the_digest(tags: TagService) -> None:
    await tags.set("hub", "library/nginx", "latest", ENTRY)
    await tags.set("hub", "library/nginx", "stable", ENTRY)
    await tags.delete("hub", "library/nginx", "latest", DIGEST)
    await tags.delete("hub", "library/nginx", "latest", DIGEST)  # idempotent
    await tags.delete("hub", "library/nginx", "never-set", DIGEST)
    assert await tags.get("hub", "library/nginx", "latest") is None
    assert await tags.get("hub", "library/nginx", "stable") == ENTRY


async def test_tag_delete_keeps_a_mapping_repointed_meanwhile(tags: TagService) -> None:
    # Eviction forgets the tag of what it removed; a replica that repointed the tag to
    # other content keeps its mapping.
    newer = TagEntry(digest_of("newer"), ENTRY.media_type, 600, 2000.5)
    await tags.set("hub", "library/nginx", "latest", newer)
    await tags.delete("hub", "library/nginx", "latest", DIGEST)
    assert await tags.get("hub", "library/nginx", "latest") == newer
