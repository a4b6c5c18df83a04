"""LinkService contract suite, run against every implementation (after Distribution's
``cache/cachecheck``).

The contract, from ``proxy.interfaces``: ``linked`` is False for what was never linked and
never raises; ``link`` then ``linked`` is True for each digest given; ``link`` is
idempotent and an empty list is fine; links are keyed by upstream, repository and digest.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

from proxy.cache.memory import MemoryLinkStore
from proxy.cache.redis import RedisLinkStore
from proxy.cache.tiered import TieredLinkStore
from proxy.interfaces import LinkService
from tests.contracts.stores import Stores, digest_of

LinkFactory = Callable[[Stores], LinkService]

LINK_SERVICES: dict[str, LinkFactory] = {
    "MemoryLinkStore": lambda s: MemoryLinkStore(100),
    "RedisLinkStore": lambda s: RedisLinkStore(s.redis()),
    "SqliteState": lambda s: s.sqlite(),
    "TieredLinkStore(Memory,Redis)": lambda s: TieredLinkStore(
        MemoryLinkStore(100), RedisLinkStore(s.redis())
    ),
    # The embedded defaults (no Redis configured), as PullThroughRegistry wires them.
    "TieredLinkStore(Memory,Sqlite)": lambda s: TieredLinkStore(MemoryLinkStore(100), s.sqlite()),
}


@pytest.fixture(params=list(LINK_SERVICES.values()), ids=list(LINK_SERVICES))
def links(request: pytest.FixtureRequest, stores: Stores) -> LinkService:
    factory: LinkFactory = request.param
    return factory(stores)


DIGEST = digest_of("one")


async def test_unknown_link_is_false(links: LinkService) -> None:
    assert await links.linked("hub", "library/nginx", DIGEST) is False


async def test_link_then_linked(links: LinkService) -> None:
    other = digest_of("other")
    await links.link("hub", "library/nginx", [DIGEST, other])
    assert await links.linked("hub", "library/nginx", DIGEST) is True
    assert await links.linked("hub", "library/nginx", other) is True


async def test_link_is_idempotent_and_empty_is_fine(links: LinkService) -> None:
    await links.link("hub", "library/nginx", [])
    await links.link("hub", "library/nginx", [DIGEST])
    await links.link("hub", "library/nginx", [DIGEST])
    assert await links.linked("hub", "library/nginx", DIGEST) is True


async def test_links_are_keyed_by_upstream_repo_and_digest(links: LinkService) -> None:
    await links.link("hub", "library/nginx", [DIGEST])
    assert await links.linked("ghcr", "library/nginx", DIGEST) is False
    assert await links.linked("hub", "library/redis", DIGEST) is False
    assert await links.linked("hub", "library/nginx", digest_of("other")) is False


async def test_a_manifest_and_its_references_link_in_one_call(links: LinkService) -> None:
    # What ProxyManifestService does on a fetch: the manifest and every digest it names.
    digests = [digest_of(f"layer {i}") for i in range(40)]
    await links.link("hub", "team/app", digests)
    assert [await links.linked("hub", "team/app", d) for d in digests] == [True] * 40
    assert await links.linked("hub", "team/app", digest_of("layer 40")) is False


async def test_unlink_forgets_only_what_it_names(links: LinkService) -> None:
    other = digest_of("other")
    await links.link("hub", "library/nginx", [DIGEST, other])
    await links.link("hub", "library/redis", [DIGEST])
    await links.unlink("hub", "library/nginx", [DIGEST])
    await links.unlink("hub", "library/nginx", [DIGEST])  # idempotent
    await links.unlink("hub", "library/nginx", [])
    assert await links.linked("hub", "library/nginx", DIGEST) is False
    assert await links.linked("hub", "library/nginx", other) is True
    assert await links.linked("hub", "library/redis", DIGEST) is True


async def test_known_is_never_a_wrong_yes(links: LinkService) -> None:
    """``known`` may say False for a link (then ``linked`` answers), never True for a
    digest the repository was not linked to or had unlinked."""
    assert links.known("hub", "library/nginx", DIGEST) is False
    await links.link("hub", "library/nginx", [DIGEST])
    # The memory layer (alone or as L1) knows what it linked; the others always ask.
    in_memory = isinstance(links, (MemoryLinkStore, TieredLinkStore))
    assert links.known("hub", "library/nginx", DIGEST) is in_memory
    assert links.known("hub", "library/redis", DIGEST) is False
    await links.unlink("hub", "library/nginx", [DIGEST])
    assert links.known("hub", "library/nginx", DIGEST) is False


async def test_what_the_memory_layer_holds_is_known_without_an_await() -> None:
    l1 = MemoryLinkStore(100)
    l2 = MemoryLinkStore(100)
    tiered = TieredLinkStore(l1, l2)
    await l2.link("hub", "library/nginx", [DIGEST])  # another process linked it
    assert tiered.known("hub", "library/nginx", DIGEST) is False  # not in this memory yet
    assert await tiered.linked("hub", "library/nginx", DIGEST) is True  # asks, keeps it
    assert tiered.known("hub", "library/nginx", DIGEST) is True
