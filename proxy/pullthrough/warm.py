"""Pre-warming: pull an image into the cache the way a client's pull would.

``Warmer.warm`` resolves the reference through the upstream's manifest service (a tag is
served or revalidated exactly as for a client, so the upstream's pull budget and breaker
apply: a cold manifest is refused with 429 while the budget is under its floor), picks
the platforms asked for from an index, and opens every config and layer through the
repository's blob chain (the one in-flight fetch per digest; a cached blob costs nothing),
reading each fetch to its end so it is committed. What is cached already is not fetched
again: running it twice resumes.

Progress goes to ``on_event`` as small dicts (``image``, ``progress``, ``done``), which
the admin API streams as JSON lines and the CLI draws as progress bars. Used by
``registry-proxy prewarm`` and by ``cache.pin_refresh``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from proxy import metrics
from proxy.errors import CacheWriteFailed, RegistryError
from proxy.interfaces import FetchingBlob
from proxy.model import (
    MANIFEST_MEDIA_TYPES,
    MEDIA_TYPE_DOCKER_MANIFEST_LIST,
    MEDIA_TYPE_OCI_INDEX,
    Digest,
    Reference,
)
from proxy.pullthrough.registry import PullThroughRegistry
from proxy.routing import Router
from proxy.settings import UpstreamSettings

log = logging.getLogger(__name__)

ACCEPT_ALL = ", ".join(MANIFEST_MEDIA_TYPES)
INDEX_TYPES = (MEDIA_TYPE_OCI_INDEX, MEDIA_TYPE_DOCKER_MANIFEST_LIST)
BLOB_CONCURRENCY = 4
PROGRESS_INTERVAL = 0.2

Event = dict[str, Any]


@dataclass
class Warmed:
    name: str
    platforms: list[str] = field(default_factory=list)
    blobs: int = 0
    bytes: int = 0
    error: str | None = None


def _platform(entry: dict[str, Any]) -> str:
    platform = entry.get("platform") or {}
    text = f"{platform.get('os', '?')}/{platform.get('architecture', '?')}"
    return text + (f"/{platform['variant']}" if platform.get("variant") else "")


def _wanted(platform: str, platforms: set[str] | None) -> bool:
    """``platforms`` None means every one; ``linux/arm64`` also matches ``linux/arm64/v8``."""
    if platforms is None:
        return True
    return platform in platforms or "/".join(platform.split("/")[:2]) in platforms


class Warmer:
    def __init__(self, registry: PullThroughRegistry) -> None:
        self._registry = registry

    async def warm(
        self,
        upstream: UpstreamSettings,
        repo: str,
        reference: str,
        *,
        name: str,
        platforms: set[str] | None = None,
        on_event: Callable[[Event], None] = lambda _event: None,
    ) -> Warmed:
        """Pull ``<upstream>/<repo>`` at ``reference`` into the cache; never raises for
        what the upstream or the cache answers (the result carries the error)."""
        warmed = Warmed(name)
        try:
            await self._warm(upstream, repo, reference, platforms, warmed, on_event)
        except RegistryError as exc:
            warmed.error = f"{exc.code}: {exc.message}"
        except CacheWriteFailed as exc:  # the disk is full: fetched, but not kept
            warmed.error = f"not cached ({exc.reason}): {exc.message}"
        except (OSError, ValueError) as exc:
            warmed.error = f"{type(exc).__name__}: {exc}"
        metrics.PREWARM_IMAGES.labels("failed" if warmed.error else "ok").inc()
        on_event({"event": "done", "name": name, "error": warmed.error, "bytes": warmed.bytes})
        return warmed

    async def _warm(
        self,
        upstream: UpstreamSettings,
        repo: str,
        reference: str,
        platforms: set[str] | None,
        warmed: Warmed,
        on_event: Callable[[Event], None],
    ) -> None:
        manifests = self._registry.services(upstream).manifests
        top = (await manifests.get(repo, Reference.parse(reference), ACCEPT_ALL)).manifest
        images = [top]
        if top.media_type in INDEX_TYPES:
            data = json.loads(top.body)
            chosen = [m for m in data.get("manifests", []) if _wanted(_platform(m), platforms)]
            if not chosen:
                raise ValueError(f"no platform of {sorted(platforms or [])} in the index")
            images = []
            for entry in chosen:
                digest = Reference.parse(entry["digest"])
                images.append((await manifests.get(repo, digest, ACCEPT_ALL)).manifest)
                warmed.platforms.append(_platform(entry))
        sizes: dict[Digest, int] = {}
        for image in images:
            data = json.loads(image.body)
            for item in [data.get("config"), *data.get("layers", [])]:
                if isinstance(item, dict) and isinstance(item.get("digest"), str):
                    sizes[Digest.parse(item["digest"])] = int(item.get("size", 0))
        total = sum(sizes.values())
        on_event({"event": "image", "name": warmed.name, "total": total, "blobs": len(sizes)})
        done = 0
        last = time.monotonic()
        gate = asyncio.Semaphore(BLOB_CONCURRENCY)
        blobs = self._registry.blobs(upstream, repo)

        def advance(n: int) -> None:
            nonlocal done, last
            done += n
            now = time.monotonic()
            if now - last >= PROGRESS_INTERVAL or done >= total:
                last = now
                on_event({"event": "progress", "name": warmed.name, "done": done})

        async def fetch(digest: Digest) -> None:
            async with gate:
                opened = await blobs.open(digest)
                if isinstance(opened, FetchingBlob):
                    async for chunk in opened.fetch.read():
                        advance(len(chunk))
                    await opened.fetch.wait_done()  # committed, not only read
                else:
                    advance(opened.descriptor.size)

        await asyncio.gather(*(fetch(digest) for digest in sizes))
        warmed.blobs = len(sizes)
        warmed.bytes = done


def split_reference(text: str) -> tuple[str, str]:
    """``name[:tag]`` or ``name@digest`` -> (name, reference); the tag defaults to latest."""
    name, at, digest = text.partition("@")
    if at:
        return name, digest
    head, colon, tag = name.rpartition(":")
    if colon and "/" not in tag:
        return head, tag
    return name, "latest"


async def warm_refs(
    warmer: Warmer,
    router: Router,
    refs: list[str],
    platforms: set[str] | None,
    on_event: Callable[[dict[str, Any]], None],
) -> list[str]:
    """Warm each of ``refs`` (client-side names, routed as a pull would be), telling
    ``on_event`` as it goes; the refs that failed. The admin endpoint and the CLI on a
    stopped directory both run this."""
    failed = []
    for ref in refs:
        name, reference = split_reference(ref)
        try:
            route = router.route(name, None)
        except RegistryError as exc:
            on_event({"event": "done", "name": ref, "error": exc.message})
            failed.append(ref)
            continue
        warmed = await warmer.warm(
            route.upstream, route.repo, reference, name=ref, platforms=platforms, on_event=on_event
        )
        if warmed.error is not None:
            failed.append(ref)
    return failed


class PinRefresher:
    """``cache.pin_refresh``: every interval (the first round at start), warm each pinned
    tag — the cached tags a pin matches and every pin naming one tag outright
    (``<upstream>/<repository>:<tag>`` without globs) — with every platform, so pinned
    images are fresh and whole when the upstream goes away. A tag is resolved as a
    client's pull would be (revalidated with HEAD once its ``tag_ttl`` has passed)."""

    def __init__(self, registry: PullThroughRegistry, interval: float) -> None:
        self._registry = registry
        self._interval = interval
        self._warmer = Warmer(registry)
        self._task: asyncio.Task[None] | None = None
        self.rounds = 0

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="pin-refresh")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def targets(self) -> list[tuple[str, str, str]]:
        pins = self._registry.pins
        found: set[tuple[str, str, str]] = set()
        snapshot = await self._registry.index.snapshot()
        for tags in snapshot.tags.values():
            for upstream, repo, key in tags:
                if pins.tag_pinned((upstream, repo, key)):
                    found.add((upstream, repo, key.split("#")[0]))
        for pattern in pins.patterns:
            if "*" in pattern:
                continue
            name, colon, tag = pattern.rpartition(":")
            upstream, slash, repo = name.partition("/")
            if colon and slash and "/" not in tag:
                found.add((upstream, repo, tag))
        return sorted(found)

    async def refresh(self) -> list[Warmed]:
        """One round; returns what each pinned tag gave."""
        await self._registry.counted()
        upstreams = {up.name: up for up in self._registry.settings.upstreams}
        results = []
        for upstream, repo, tag in await self.targets():
            if upstream not in upstreams:
                log.warning("cache.pin names an unknown upstream: %s", upstream)
                continue
            name = f"{upstream}/{repo}:{tag}"
            warmed = await self._warmer.warm(upstreams[upstream], repo, tag, name=name)
            if warmed.error is not None:
                log.warning("pin refresh of %s failed: %s", name, warmed.error)
            results.append(warmed)
        self.rounds += 1
        return results

    async def _run(self) -> None:
        while True:
            await self.refresh()
            await asyncio.sleep(self._interval)
