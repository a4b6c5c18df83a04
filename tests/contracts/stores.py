"""What the tag and link contract suites build their backends from."""

from __future__ import annotations

import hashlib
from pathlib import Path

import fakeredis

from proxy.cache.redis import RedisLayer
from proxy.model import Digest
from proxy.storage.state import SqliteState


def digest_of(label: str) -> Digest:
    return Digest("sha256", hashlib.sha256(label.encode()).hexdigest())


class Stores:
    """A scratch directory, Redis layers and SQLite state files, all closed at teardown."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self._layers: list[RedisLayer] = []
        self._states: list[SqliteState] = []

    def redis(self) -> RedisLayer:
        layer = RedisLayer(fakeredis.FakeAsyncRedis())
        self._layers.append(layer)
        return layer

    def sqlite(self) -> SqliteState:
        state = SqliteState(self.tmp / f"state{len(self._states)}")
        state.open()
        self._states.append(state)
        return state

    async def close(self) -> None:
        for layer in self._layers:
            await layer.close()
        for state in self._states:
            state.close()
