"""Size-bounded eviction of the disk cache.

When committed content exceeds ``max_bytes``, one background pass deletes the least
recently used files until it is under ``LOW_WATERMARK`` of the limit. "Used" is the
file's mtime, which the store's ``stat`` refreshes (at most once per ``TOUCH_INTERVAL``); a file
touched within ``MIN_AGE`` is never evicted, so nothing that is being served or has just
been fetched is deleted under a client. A blob being fetched is not under its final
name yet, so it cannot be evicted either. Deleting an open file is safe on POSIX: a
client already reading it keeps reading. Evicted digests are cleared from the descriptor
caches through ``on_evict``; the next request fetches them again.

Low space: ``maybe_start(low_space=True)`` (the store's ``on_space_needed``: a write
failed, or free space is under ``cache.min_free``) starts a pass whatever the size bound,
which goes on until free space is back over ``LOW_SPACE_HEADROOM`` times ``min_free``,
with the same rule for what may go.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from contextlib import suppress

from proxy import metrics
from proxy.model import Digest
from proxy.storage.disk import DiskBlobStore

log = logging.getLogger(__name__)

LOW_WATERMARK = 0.9
MIN_AGE = 300.0
LOW_SPACE_HEADROOM = 1.5


class Evictor:
    def __init__(
        self,
        store: DiskBlobStore,
        max_bytes: int | None,
        on_evict: Callable[[Digest], Awaitable[None]],
        *,
        min_age: float = MIN_AGE,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._store = store
        self._max = max_bytes
        self._on_evict = on_evict
        self._min_age = min_age
        self._clock = clock
        self._task: asyncio.Task[None] | None = None

    def maybe_start(self, *, low_space: bool = False) -> None:
        """Start a pass if over the limit (or ``low_space``) and none is running. Never
        blocks."""
        over = self._max is not None and self._store.used_bytes > self._max
        if not (over or low_space) or self._task is not None:
            return
        self._task = asyncio.create_task(self._pass(low_space), name="eviction")
        self._task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        self._task = None
        if not task.cancelled() and task.exception() is not None:
            log.error("eviction pass failed", exc_info=task.exception())

    async def wait(self) -> None:
        """Wait for the running pass, if any (tests, shutdown)."""
        if self._task is not None:
            with suppress(asyncio.CancelledError):
                await asyncio.shield(self._task)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with suppress(asyncio.CancelledError):
                await self._task

    def _short_of_space(self) -> bool:
        free, threshold = self._store.space()
        return free < threshold * LOW_SPACE_HEADROOM

    async def _pass(self, low_space: bool = False) -> None:
        target = int(self._max * LOW_WATERMARK) if self._max is not None else None
        candidates = await asyncio.to_thread(self._store.list_committed)
        cutoff = self._clock() - self._min_age
        candidates.sort(key=lambda c: c[1])  # oldest mtime first
        evicted = 0
        for digest, mtime, _size in candidates:
            over = target is not None and self._store.used_bytes > target
            if not over and not (low_space and await asyncio.to_thread(self._short_of_space)):
                break
            if mtime > cutoff:
                break  # everything after this one is younger still
            await self._store.delete(digest)
            await self._on_evict(digest)
            evicted += 1
        metrics.EVICTIONS.inc(evicted)
        if evicted or low_space:
            log.info(
                "evicted %d blobs%s; %d bytes in use (limit %s)",
                evicted,
                " for free space" if low_space else "",
                self._store.used_bytes,
                self._max,
            )
