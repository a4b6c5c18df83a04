"""RedisManifestBodies on fakeredis: a body is used only if it has the digest asked for."""

from __future__ import annotations

from collections.abc import AsyncIterator

import fakeredis
import pytest

from proxy.cache.redis import RedisLayer
from proxy.cluster.manifests import MAX_SHARED_MANIFEST, RedisManifestBodies
from proxy.model import MEDIA_TYPE_OCI_MANIFEST, Digest

BODY = b'{"schemaVersion":2,"layers":[]}'


@pytest.fixture
async def layer() -> AsyncIterator[RedisLayer]:
    redis_layer = RedisLayer(fakeredis.FakeAsyncRedis())
    yield redis_layer
    await redis_layer.close()


async def test_a_shared_body_round_trips(layer: RedisLayer) -> None:
    bodies = RedisManifestBodies(layer)
    await bodies.put(Digest.of(BODY), MEDIA_TYPE_OCI_MANIFEST, BODY)
    assert await bodies.get(Digest.of(BODY)) == (MEDIA_TYPE_OCI_MANIFEST, BODY)
    ttl = await layer.client.ttl(f"rp:v1:manifest:sha256:{Digest.of(BODY).hex}")
    assert ttl > 0


async def test_a_body_under_another_digest_is_never_used(layer: RedisLayer) -> None:
    bodies = RedisManifestBodies(layer)
    other = Digest.of(b"something else")
    await bodies.put(other, MEDIA_TYPE_OCI_MANIFEST, BODY)  # a lying writer
    assert await bodies.get(other) is None
    assert await bodies.get(Digest.of(b"never shared")) is None


async def test_bodies_over_the_cap_are_not_shared(layer: RedisLayer) -> None:
    bodies = RedisManifestBodies(layer)
    big = b" " * (MAX_SHARED_MANIFEST + 1)
    await bodies.put(Digest.of(big), MEDIA_TYPE_OCI_MANIFEST, big)
    assert await bodies.get(Digest.of(big)) is None
