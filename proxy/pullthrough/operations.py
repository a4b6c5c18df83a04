"""The operator's cache commands: stats, ls, verify, evict, gc.

One implementation serves both ways of running them: the admin API of a running proxy
(``/admin/cache/...``) and the CLI on a stopped proxy's directory (which opens the
registry itself, holding the directory's lock exclusively). Every removal goes through
``Evictor.remove``, so tags, manifests, descriptors and links are forgotten in every
layer exactly as an eviction pass does, and under the evictor's lock, so two removals
never interleave.

- ``verify`` re-hashes every committed file. A corrupt one is moved to
  ``<cache dir>/quarantine/`` (kept for inspection, out of the store), forgotten by every
  layer, and the tags of the images that contained it are forgotten too, so none is
  served from cache half; the next pull fetches it again. With ``repair`` the
  quarantined blobs are fetched again at once through a repository they were pulled
  through.
- ``gc`` removes temp files older than ``gc_grace`` that no fetch is writing, loose blobs
  unused for ``gc_grace``, and (with ``max_age``) images not pulled for ``max_age``;
  pinned images never.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import time
from collections import Counter
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from proxy import metrics
from proxy.errors import RegistryError
from proxy.interfaces import FetchingBlob
from proxy.model import Digest
from proxy.pullthrough.registry import PullThroughRegistry
from proxy.storage.disk import PART_SUFFIX, TMP_DIR
from proxy.storage.eviction import Victim, image_victim
from proxy.storage.index import Image, build_images
from proxy.storage.pins import Pins

log = logging.getLogger(__name__)

QUARANTINE_DIR = "quarantine"
HASH_CHUNK = 1 << 20
TOP_REPOSITORIES = 10


def _iso(at: float) -> str | None:
    return datetime.fromtimestamp(at, UTC).isoformat(timespec="seconds") if at else None


def _hash_file(path: Path, algorithm: str) -> str | None:
    """The file's hex digest; None when it is gone. Blocking."""
    hasher = hashlib.new(algorithm)
    try:
        with open(path, "rb") as f:
            while chunk := f.read(HASH_CHUNK):
                hasher.update(chunk)
    except FileNotFoundError:
        return None
    return hasher.hexdigest()


@dataclass
class Catalog:
    images: list[Image]
    committed: dict[Digest, tuple[float, int]]


class CacheOperations:
    def __init__(self, registry: PullThroughRegistry) -> None:
        self._registry = registry
        self._evictor = registry.evictor
        self._pins = registry.pins
        self._root = registry.settings.cache_dir

    async def _catalog(self) -> Catalog:
        await self._registry.counted()  # removals adjust counts the start-up walk makes
        await self._registry.index.flush()
        snapshot = await self._registry.index.snapshot()
        return Catalog(build_images(snapshot), await self._evictor.committed())

    def _describe(self, image: Image, committed: dict[Digest, tuple[float, int]]) -> dict[str, Any]:
        present = [d for d in image.members if d in committed]
        return {
            "names": image.names(),
            "digest": str(image.root),
            "size": sum(committed[d][1] for d in present),
            "last_pull": _iso(image.last_used),
            "pinned": self._pins.image_pinned(image),
            "present": len(present),
            "referenced": len(image.members),
        }

    async def stats(self) -> dict[str, Any]:
        await self._registry.counted()
        await self._evictor.plan()  # also refreshes the bytes-by-state gauges
        catalog = await self._catalog()
        committed = catalog.committed
        in_images = {d for image in catalog.images for d in image.members}
        by_repo: Counter[str] = Counter()
        for image in catalog.images:
            size = sum(committed[d][1] for d in image.members if d in committed)
            for name in {n.split("@")[0].rsplit(":", 1)[0] for n in image.names()}:
                by_repo[name] += size
        pinned = {d for i in catalog.images if self._pins.image_pinned(i) for d in i.members}
        hits = misses = 0.0
        for metric in metrics.CACHE_RESPONSES.collect():
            for sample in metric.samples:
                if not sample.name.endswith("_total"):
                    continue
                outcome = sample.labels.get("outcome")
                if outcome in ("hit", "revalidated", "stale", "coalesced"):
                    hits += sample.value
                elif outcome == "miss":
                    misses += sample.value
        return {
            "dir": str(self._root),
            "used_bytes": sum(size for _, size in committed.values()),
            "max_size": self._evictor.max_bytes,
            "blobs": len(committed),
            "images": len(catalog.images),
            "pinned_bytes": sum(committed[d][1] for d in pinned if d in committed),
            "loose_blobs": sum(1 for d in committed if d not in in_images),
            "hit_ratio": hits / (hits + misses) if hits + misses else None,
            "top_repositories": [
                {"repository": name, "size": size}
                for name, size in by_repo.most_common(TOP_REPOSITORIES)
            ],
        }

    async def images(self, pattern: str | None = None) -> list[dict[str, Any]]:
        catalog = await self._catalog()
        chosen = self._matching(catalog.images, pattern)
        chosen.sort(key=lambda image: image.last_used, reverse=True)
        return [self._describe(image, catalog.committed) for image in chosen]

    @staticmethod
    def _matching(images: list[Image], pattern: str | None) -> list[Image]:
        if pattern is None:
            return list(images)
        matcher = Pins([pattern])
        return [i for i in images if any(matcher.matches(name) for name in i.names())]

    async def evict(self, pattern: str) -> dict[str, Any]:
        """Remove the images one of whose names matches ``pattern``; pinned ones stay."""
        async with self._evictor.lock:
            catalog = await self._catalog()
            chosen = self._matching(catalog.images, pattern)
            removed, skipped, freed = [], [], 0
            retained = list(catalog.images)
            for image in chosen:
                if self._pins.image_pinned(image):
                    skipped.extend(image.names())
                    continue
                retained = [i for i in retained if i.root != image.root]
                victim = image_victim(image, retained, catalog.committed)
                freed += await self._evictor.remove(victim, "manual", check=False) or 0
                removed.extend(image.names())
        return {"removed": removed, "skipped_pinned": skipped, "freed_bytes": freed}

    async def gc(self, *, dry_run: bool = False) -> dict[str, Any]:
        settings = self._registry.settings
        now = time.time()
        grace_cutoff = now - settings.gc_grace
        temps = await asyncio.to_thread(self._old_temp_files, grace_cutoff)
        await self._registry.counted()
        await self._evictor.plan()  # the bytes-by-state gauges, before
        async with self._evictor.lock:
            catalog = await self._catalog()
            snapshot_used = {
                d: self._registry.index.times.last_used(d) or 0.0 for d in catalog.committed
            }
            in_images = {d for image in catalog.images for d in image.members}
            loose = [
                Victim([d], size)
                for d, (mtime, size) in catalog.committed.items()
                if d not in in_images and max(mtime, snapshot_used[d]) < grace_cutoff
            ]
            old: list[Image] = []
            if settings.max_age is not None:
                age_cutoff = now - settings.max_age
                old = [
                    i
                    for i in catalog.images
                    if i.last_used < age_cutoff and not self._pins.image_pinned(i)
                ]
            result: dict[str, Any] = {
                "dry_run": dry_run,
                "temp_files": len(temps),
                "loose_blobs": len(loose),
                "images": sorted(n for i in old for n in i.names()),
                "freed_bytes": 0,
            }
            if dry_run:
                result["freed_bytes"] = sum(v.size for v in loose) + sum(
                    image_victim(
                        i, [o for o in catalog.images if o not in old], catalog.committed
                    ).size
                    for i in old
                )
                return result
            freed = 0
            for path, temp_size in temps:
                try:
                    path.unlink()
                except FileNotFoundError:
                    continue
                freed += temp_size
                metrics.GC_REMOVED.labels("temp").inc()
            for victim in loose:
                removed = await self._evictor.remove(victim, "gc")
                if removed is not None:
                    freed += removed
                    metrics.GC_REMOVED.labels("blob").inc()
            retained = [i for i in catalog.images if i not in old]
            kept: set[Digest] = set()
            for image in old:
                victim = image_victim(image, retained, catalog.committed)
                removed = await self._evictor.remove(victim.without(kept), "gc")
                if removed is None:
                    kept |= image.members  # used meanwhile: it and what it shares stay
                else:
                    freed += removed
                    metrics.GC_REMOVED.labels("image").inc()
            result["freed_bytes"] = freed
        log.info("gc: %s", result)
        return result

    def _old_temp_files(self, cutoff: float) -> list[tuple[Path, int]]:
        """Temp files no fetch of this process is writing, untouched since ``cutoff``."""
        busy = self._registry.inflight
        found = []
        tmp = self._root / TMP_DIR
        for path in tmp.glob(f"*{PART_SUFFIX}") if tmp.exists() else []:
            try:
                st = path.stat()
                digest = Digest("sha256", path.name.split(".")[0])
            except (FileNotFoundError, RegistryError, ValueError):
                continue
            if st.st_mtime < cutoff and busy.get(digest) is None:
                found.append((path, st.st_size))
        return found

    async def verify(self, *, repair: bool = False) -> dict[str, Any]:
        """Re-hash every committed file; quarantine and forget the corrupt ones."""
        await self._registry.counted()
        committed = await self._evictor.committed()
        store = self._registry.store

        def scan() -> list[Digest]:
            corrupt = []
            for digest in committed:
                actual = _hash_file(store.path(digest), digest.algorithm)
                if actual is not None and actual != digest.hex:
                    corrupt.append(digest)
            return corrupt

        corrupt = await asyncio.to_thread(scan)
        quarantined: list[str] = []
        repaired: list[str] = []
        folder = self._root / QUARANTINE_DIR
        async with self._evictor.lock:
            snapshot = await self._registry.index.snapshot()
            images = build_images(snapshot)
            for digest in corrupt:
                metrics.VERIFY_FAILURES.inc()
                # Tags of every image containing it first: none is served from cache half.
                containing = [i for i in images if digest in i.members]
                for image in containing:
                    for tag, manifest in image.tagged:
                        await self._registry.tags.delete(*tag, manifest)
                dest = await store.quarantine(digest, folder)
                await self._evictor.remove(Victim([digest], 0), "corrupt", check=False)
                log.error(
                    "corrupt blob quarantined",
                    extra={"digest": str(digest), "dest": str(dest)},
                )
                quarantined.append(str(digest))
                if repair and await self._refetch(digest, containing):
                    repaired.append(str(digest))
        return {
            "checked": len(committed),
            "corrupt": quarantined,
            "repaired": repaired,
            "quarantine": str(folder),
        }

    async def _refetch(self, digest: Digest, containing: list[Image]) -> bool:
        """Fetch ``digest`` again through a repository an image holding it was pulled
        through; True once committed."""
        upstreams = {up.name: up for up in self._registry.settings.upstreams}
        for image in containing:
            for upstream, repo in image.repos:
                if upstream not in upstreams:
                    log.warning(
                        "cannot re-fetch %s through %s/%s: no upstream %r is configured",
                        digest,
                        upstream,
                        repo,
                        upstream,
                    )
                    continue
                try:
                    opened = await self._registry.blobs(upstreams[upstream], repo).open(digest)
                    if isinstance(opened, FetchingBlob):
                        async for _ in opened.fetch.read():
                            pass
                except RegistryError as exc:
                    log.warning("re-fetching %s failed: %s", digest, exc.message)
                    continue
                await self._registry.inflight.wait_idle()
                return await asyncio.to_thread(os.path.exists, self._registry.store.path(digest))
        return False
