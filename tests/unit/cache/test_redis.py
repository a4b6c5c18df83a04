"""The Redis layer's connection: which client each URL gives, and that the errors of a
Redis Cluster reach the breaker like a single server's (no Redis is contacted here: the
client is lazy, and its errors are raised by a stand-in call)."""

from __future__ import annotations

import pytest
from prometheus_client import REGISTRY
from redis.asyncio import Redis, RedisCluster
from redis.exceptions import ClusterDownError, RedisClusterException, SlotNotCoveredError

from proxy.cache.redis import MAX_CONNECTIONS, RedisLayer, connect


def errors(op: str) -> float:
    value = REGISTRY.get_sample_value(
        "registry_proxy_redis_operations_total", {"op": op, "result": "error"}
    )
    return value or 0.0


async def test_a_cluster_url_gives_a_cluster_client_with_its_startup_nodes() -> None:
    client = connect("redis+cluster://:pw@10.0.0.1:7000,10.0.0.2,[fd00::3]:7002/")
    try:
        assert isinstance(client, RedisCluster)
        nodes = {(n.host, n.port) for n in client.startup_nodes}
        assert nodes == {("10.0.0.1", 7000), ("10.0.0.2", 6379), ("fd00::3", 7002)}
        kwargs = client.connection_kwargs
        assert kwargs["password"] == "pw"
        assert kwargs["max_connections"] == MAX_CONNECTIONS  # per node
        assert kwargs["socket_timeout"] == kwargs["socket_connect_timeout"] == 0.25
        assert client.retry.get_retries() == 0  # the breaker decides, not redis-py
    finally:
        await client.aclose()


async def test_a_tls_cluster_url_gives_tls_connections() -> None:
    client = connect("rediss+cluster://user:pw@10.0.0.1:7000/")
    try:
        assert isinstance(client, RedisCluster)
        assert client.connection_kwargs["connection_class"].__name__ == "SSLConnection"
        assert client.connection_kwargs["username"] == "user"
    finally:
        await client.aclose()


async def test_a_plain_url_gives_a_plain_client() -> None:
    client = connect("redis://10.0.0.1:6379/2")
    try:
        assert isinstance(client, Redis)
    finally:
        await client.aclose()


@pytest.mark.parametrize(
    "error",
    [
        RedisClusterException("Redis Cluster cannot be connected"),  # not a RedisError
        SlotNotCoveredError("slot 42 is not covered"),
        ClusterDownError("CLUSTERDOWN The cluster is down"),
    ],
)
async def test_cluster_errors_are_counted_and_trip_the_breaker(error: Exception) -> None:
    client = connect("redis+cluster://127.0.0.1:7000/")
    layer = RedisLayer(client)

    async def fail() -> None:
        raise error

    before = errors("get")
    try:
        for _ in range(3):
            assert await layer.run("get", fail) is None
        assert errors("get") == before + 3
        assert not layer.breaker.allow()  # open: Redis is skipped for a cool-down
    finally:
        await layer.close()


async def test_a_cluster_client_closes_without_a_connection_pool() -> None:
    # A cluster client has no connection_pool (its nodes have one each): close() must
    # not look for the sentinels there.
    layer = RedisLayer(connect("redis+cluster://127.0.0.1:7000,127.0.0.1:7001/"))
    await layer.close()
    await layer.close()  # idempotent
