"""Size-bounded eviction of the disk cache, by image, between two watermarks.

When committed content passes ``high_watermark`` of ``max_bytes``, one background pass
removes content until it is under ``low_watermark``:

1. loose blobs (in no indexed image: fetched by digest alone, or older than the index),
   least recently used first;
2. then whole images, least recently *pulled* first: the root manifest and every digest
   it references that no other retained image references (``proxy.storage.index``).

Never removed: anything used within ``min_age`` (a manifest pulled, a blob served, a
file committed: the in-memory access times and the file's mtime), anything ``busy``
(a fetch in progress for it), and pinned images (``cache.pin``). Pins count against the
limit: when pinned images alone exceed it, the pass says so (log, ``pins_over_limit``,
``/readyz``) and keeps them.

Consistency: for one image the pass first forgets its tags in every layer (so no new
pull resolves the tag to it), then removes its manifests (root first) and its blobs,
clearing each from the descriptor caches and the manifest store's memory, then unlinks
the repositories it was pulled through. A tag is therefore either served from cache
with its whole image on disk, or not served from cache at all: it goes upstream, and
with the upstream down it is answered with the upstream's error, never half an image.
Recency is checked again just before each removal, since the plan is made from a
snapshot. Deleting an open file is safe on POSIX: a client already reading it keeps
reading.

``maybe_start()`` is the entry point for anything that learns the disk is short of
room (each commit, start-up). Low space: ``maybe_start(low_space=True)`` (the store's
``on_space_needed``: a write failed, or free space is under ``cache.min_free``) starts a
pass whatever the size bound, which goes on until free space is back over
``LOW_SPACE_HEADROOM`` times ``min_free``, in the same order and with the same rules for
what may go.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable
from contextlib import suppress
from dataclasses import dataclass, field
from typing import Protocol

from proxy import metrics
from proxy.model import Digest
from proxy.storage.disk import DiskBlobStore
from proxy.storage.index import CacheIndex, Image, Snapshot, TagName, build_images

log = logging.getLogger(__name__)

HIGH_WATERMARK = 0.9
LOW_WATERMARK = 0.8
MIN_AGE = 300.0
LOW_SPACE_HEADROOM = 1.5


class CacheLayers(Protocol):
    """What must forget evicted content besides the disk: the tag stores, the descriptor
    caches (memory, Redis), the manifest store's memory and the repository links."""

    async def forget_tag(self, tag: TagName, digest: Digest) -> None:
        """Forget ``tag`` in every layer if it still names ``digest``."""
        ...

    async def forget_content(self, digest: Digest) -> None:
        """Forget that ``digest`` is present (descriptor caches, manifest memory)."""
        ...

    async def unlink(self, upstream: str, repo: str, digests: list[Digest]) -> None:
        """Forget that ``<upstream>/<repo>`` holds ``digests``."""
        ...


@dataclass
class Victim:
    """One unit of eviction: an image, or one loose blob (``image`` None)."""

    digests: list[Digest]
    """What to delete: manifests first, the root first."""
    size: int
    image: Image | None = None

    @property
    def kind(self) -> str:
        return "loose" if self.image is None else "image"

    @property
    def members(self) -> frozenset[Digest]:
        """Everything the victim's image uses, shared or not."""
        return frozenset(self.digests) if self.image is None else self.image.members

    def without(self, kept: set[Digest]) -> Victim:
        """This victim minus digests an image kept in the same pass still uses (the plan
        assumed that image would go too)."""
        if not kept.intersection(self.digests):
            return self
        return Victim([d for d in self.digests if d not in kept], self.size, self.image)


@dataclass
class Plan:
    victims: list[Victim] = field(default_factory=list)
    pinned_bytes: int = 0
    evictable_bytes: int = 0
    recent_bytes: int = 0


def make_plan(
    snapshot: Snapshot,
    committed: dict[Digest, tuple[float, int]],
    *,
    cutoff: float,
    pinned: Callable[[Image], bool],
    busy: Callable[[Digest], bool] = lambda _d: False,
) -> Plan:
    """Everything evictable in eviction order (loose blobs, then images by last pull),
    with the bytes each frees; ``committed`` is digest -> (mtime, size) of the disk."""
    plan = Plan()
    images = build_images(snapshot)

    def last_use(digest: Digest) -> float:
        mtime = committed[digest][0] if digest in committed else 0.0
        return max(mtime, snapshot.used.get(digest, 0.0))

    def recent(digests: Iterable[Digest]) -> bool:
        return any(last_use(d) > cutoff or busy(d) for d in digests)

    holders: dict[Digest, int] = {}
    for image in images:
        for digest in image.members:
            holders[digest] = holders.get(digest, 0) + 1
    pinned_digests: set[Digest] = set()
    recent_digests: set[Digest] = set()
    candidates: list[Image] = []
    for image in images:
        if pinned(image):
            pinned_digests |= image.members
        elif recent(image.members) or image.last_used > cutoff:
            recent_digests |= image.members
        else:
            candidates.append(image)
    # Blobs shared with a kept image are never freed by evicting another image.
    protected = pinned_digests | recent_digests
    plan.pinned_bytes = sum(committed[d][1] for d in pinned_digests if d in committed)
    plan.recent_bytes = sum(
        committed[d][1] for d in recent_digests - pinned_digests if d in committed
    )
    loose = [d for d in committed if d not in holders]
    loose.sort(key=last_use)
    for digest in loose:
        if recent([digest]):
            plan.recent_bytes += committed[digest][1]
            continue
        plan.victims.append(Victim([digest], committed[digest][1]))
    candidates.sort(key=lambda image: image.last_used)
    remaining = dict(holders)
    for image in candidates:
        for digest in image.members:
            remaining[digest] -= 1
        freed = [d for d in image.members if remaining[d] == 0 and d not in protected]
        order = sorted(freed, key=lambda d: (d != image.root, d not in image.manifests, str(d)))
        size = sum(committed[d][1] for d in order if d in committed)
        plan.victims.append(Victim(order, size, image))
    plan.evictable_bytes = sum(v.size for v in plan.victims)
    return plan


def image_victim(
    image: Image, others: Iterable[Image], committed: dict[Digest, tuple[float, int]]
) -> Victim:
    """``image`` as one victim: its members no image in ``others`` references."""
    held = {d for other in others if other.root != image.root for d in other.members}
    freed = [d for d in image.members if d not in held]
    order = sorted(freed, key=lambda d: (d != image.root, d not in image.manifests, str(d)))
    return Victim(order, sum(committed[d][1] for d in order if d in committed), image)


class Evictor:
    """Runs eviction passes (``max_bytes`` None: never on its own; ``remove`` still
    serves ``cache evict``, GC and verify)."""

    def __init__(
        self,
        store: DiskBlobStore,
        max_bytes: int | None,
        index: CacheIndex,
        layers: CacheLayers,
        *,
        high_watermark: float = HIGH_WATERMARK,
        low_watermark: float = LOW_WATERMARK,
        min_age: float = MIN_AGE,
        pinned: Callable[[Image], bool] = lambda _image: False,
        busy: Callable[[Digest], bool] = lambda _digest: False,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._store = store
        self._max = max_bytes
        self._index = index
        self._layers = layers
        self._high = None if max_bytes is None else int(max_bytes * high_watermark)
        self._low = 0 if max_bytes is None else int(max_bytes * low_watermark)
        self._min_age = min_age
        self._pinned = pinned
        self._busy = busy
        self._clock = clock
        self._task: asyncio.Task[None] | None = None
        self._again = False
        self._again_low_space = False
        self._removing: dict[Digest, asyncio.Event] = {}
        self.lock = asyncio.Lock()
        """Held by a pass; operations that remove content (GC, ``cache evict``) take it."""
        self.pins_over_limit = False
        self.last_plan: Plan | None = None

    @property
    def max_bytes(self) -> int | None:
        return self._max

    async def committed(self) -> dict[Digest, tuple[float, int]]:
        """digest -> (mtime, size) of every committed file."""
        listed = await asyncio.to_thread(self._store.list_committed)
        return {digest: (mtime, size) for digest, mtime, size in listed}

    def maybe_start(self, *, low_space: bool = False) -> None:
        """Start a pass if past the high watermark (or ``low_space``) and none is running.
        Never blocks.

        Called during a pass, it asks for one more after it: the running pass planned
        from a snapshot taken before what was committed since."""
        if self._store.counting:
            return  # the start-up count is not done (it calls again when it is)
        over = self._high is not None and self._store.used_bytes > self._high
        if not (over or low_space):
            return
        if self._task is not None:
            self._again = True
            self._again_low_space = self._again_low_space or low_space
            return
        self._again = False
        self._again_low_space = False
        self._task = asyncio.create_task(self._pass(low_space), name="eviction")
        self._task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        self._task = None
        if task.cancelled():
            return
        if task.exception() is not None:
            log.error("eviction pass failed", exc_info=task.exception())
        elif self._again:
            self.maybe_start(low_space=self._again_low_space)

    async def wait(self) -> None:
        """Wait until no pass runs or is due (tests, shutdown)."""
        while self._task is not None:
            with suppress(asyncio.CancelledError):
                await asyncio.shield(self._task)
            # The pass's done callback ran before this resumed (registered first): a
            # pass that was due is ``_task`` by now.

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with suppress(asyncio.CancelledError):
                await self._task

    async def plan(self) -> Plan:
        """The current plan: flush the access times, read the index and the disk."""
        await self._index.flush()
        snapshot = await self._index.snapshot()
        committed = await self.committed()
        plan = make_plan(
            snapshot,
            committed,
            cutoff=self._clock() - self._min_age,
            pinned=self._pinned,
            busy=self._busy,
        )
        metrics.CACHE_STATE_BYTES.labels("pinned").set(plan.pinned_bytes)
        metrics.CACHE_STATE_BYTES.labels("evictable").set(plan.evictable_bytes)
        metrics.CACHE_STATE_BYTES.labels("recent").set(plan.recent_bytes)
        over = self._max is not None and plan.pinned_bytes > self._max
        if over and not self.pins_over_limit:
            log.error(
                "pinned images alone take %d bytes, more than cache.max_size (%d): they are"
                " kept, and little else fits; unpin some or raise cache.max_size",
                plan.pinned_bytes,
                self._max,
            )
        self.pins_over_limit = over
        metrics.PINS_OVER_LIMIT.set(1 if over else 0)
        self.last_plan = plan
        return plan

    def _short_of_space(self) -> bool:
        free, threshold = self._store.space()
        return free < threshold * LOW_SPACE_HEADROOM

    async def _pass(self, low_space: bool = False) -> None:
        async with self.lock:
            plan = await self.plan()
            removed = freed = 0
            kept: set[Digest] = set()
            for victim in plan.victims:
                over = self._high is not None and self._store.used_bytes > self._low
                if not over and not (low_space and await asyncio.to_thread(self._short_of_space)):
                    break
                reason = "size" if over else "space"
                size = await self.remove(victim.without(kept), reason)
                if size is None:
                    kept |= victim.members  # used meanwhile: what it shares stays too
                else:
                    removed += 1
                    freed += size
            if removed or low_space:
                log.info(
                    "evicted %d images and loose blobs (%d bytes)%s; %d bytes in use (limit %s)",
                    removed,
                    freed,
                    " for free space" if low_space else "",
                    self._store.used_bytes,
                    self._max,
                )
            elif self._high is not None and self._store.used_bytes > self._high:
                log.warning(
                    "cache over its high watermark (%d of %d bytes) with nothing evictable:"
                    " everything is pinned or used within cache.min_age",
                    self._store.used_bytes,
                    self._max,
                )

    def _still_idle(self, digests: Iterable[Digest]) -> bool:
        cutoff = self._clock() - self._min_age
        for digest in digests:
            used = self._index.times.last_used(digest)
            if (used is not None and used > cutoff) or self._busy(digest):
                return False
        return True

    async def settled(self, digest: Digest) -> None:
        """Return once no removal of ``digest`` is under way."""
        while (removing := self._removing.get(digest)) is not None:
            await removing.wait()

    async def _forget_tags(self, digests: list[Digest]) -> None:
        for tag, manifest in await self._index.tags_of(digests):
            await self._layers.forget_tag(tag, manifest)

    async def remove(self, victim: Victim, reason: str, *, check: bool = True) -> int | None:
        """Remove one victim from every layer; the bytes freed, or None when it was used
        meanwhile (``check``: the recency check; manual eviction passes False)."""
        image = victim.image
        watched = victim.digests if image is None else [*image.manifests, *victim.digests]
        if check and not self._still_idle(watched):
            return None
        # While it runs, a manifest put or a tag set for these digests waits (``settled``):
        # a client re-pulling the image meanwhile stores it anew after, never half of it
        # before. Tags first, read from the index now (one recorded since the plan counts).
        done = asyncio.Event()
        for digest in victim.digests:
            self._removing[digest] = done
        try:
            await self._forget_tags(victim.digests)
            before = self._store.used_bytes
            await self._index.forget(victim.digests)
            for digest in victim.digests:
                await self._layers.forget_content(digest)
                await self._store.delete(digest)
        finally:
            for digest in victim.digests:
                if self._removing.get(digest) is done:
                    del self._removing[digest]
            done.set()
        if image is not None:
            for upstream, repo in image.repos:
                await self._layers.unlink(upstream, repo, victim.digests)
        freed = max(0, before - self._store.used_bytes)
        metrics.EVICTIONS.inc(len(victim.digests))
        metrics.EVICTED_IMAGES.labels(reason, victim.kind).inc()
        metrics.EVICTED_BYTES.labels(reason).inc(freed)
        return freed
