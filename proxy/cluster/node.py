"""This process as a member of the cluster: identity, secret, leases, peer session.

Built by the registry when ``cluster.advertise``, ``cluster.secret_file`` and
``cache.redis`` are all set; opened (secret read, session created) and closed with it.
``node`` is random per process: a replica restarted at the same address does not take
its former self's leases for its own.
"""

from __future__ import annotations

import asyncio
import secrets
from pathlib import Path

import aiohttp

from proxy import metrics
from proxy.cache.redis import RedisLayer
from proxy.cluster.leases import LeaseHolder, RedisHolders, RedisLeases
from proxy.cluster.peer import PeerSigner
from proxy.model import Digest
from proxy.settings import ClusterSettings

PEER_CONNECT_TIMEOUT = 2.0
PEER_READ_TIMEOUT = 60.0


class ClusterNode:
    def __init__(self, settings: ClusterSettings, layer: RedisLayer) -> None:
        assert settings.advertise is not None and settings.secret_file is not None
        self.address: str = settings.advertise
        self.node = secrets.token_hex(8)
        self.leases = RedisLeases(layer, settings.lease_ttl)
        self.holders = RedisHolders(layer)
        self._secret_file: Path = settings.secret_file
        self._signer: PeerSigner | None = None
        self._session: aiohttp.ClientSession | None = None
        self.closing = False
        """Set on shutdown: no new leases are taken, so others fetch what we would."""

    async def open(self) -> None:
        secret = await asyncio.to_thread(self._secret_file.read_bytes)
        self._signer = PeerSigner(secret.strip())
        self._session = aiohttp.ClientSession(
            auto_decompress=False,
            timeout=aiohttp.ClientTimeout(
                total=None, sock_connect=PEER_CONNECT_TIMEOUT, sock_read=PEER_READ_TIMEOUT
            ),
        )
        _precreate_series()

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    @property
    def signer(self) -> PeerSigner:
        assert self._signer is not None, "open() the cluster node first"
        return self._signer

    @property
    def session(self) -> aiohttp.ClientSession:
        assert self._session is not None, "open() the cluster node first"
        return self._session

    def holder(self, upstream: str, repo: str) -> LeaseHolder:
        """This process's lease value for a fetch for ``upstream``/``repo``."""
        return LeaseHolder(self.node, self.address, upstream, repo)

    async def forget(self, digest: Digest) -> None:
        """The digest was evicted here: no longer a holder."""
        await self.holders.remove(digest, self.address)


def _precreate_series() -> None:
    for direction in ("in", "out"):
        metrics.PEER_BYTES.labels(direction)
    for result in ("ok", "denied", "unknown", "error"):
        metrics.PEER_REQUESTS.labels(result)
    for result in ("acquired", "followed", "takeover", "unavailable"):
        metrics.CLUSTER_LEASES.labels(result)
    for source in ("upstream", "owner", "holder", "mixed"):
        metrics.CLUSTER_FETCHES.labels(source)
    for result in ("checked", "shared", "waited", "unavailable"):
        metrics.CLUSTER_TAG_CHECKS.labels(result)
