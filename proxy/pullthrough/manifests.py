"""Manifests of one upstream: by digest (immutable) and by tag (revalidated after a TTL).

By digest: a local hit is served byte for byte; a miss is fetched by digest, verified
and stored.

By tag: the tag maps to (digest, media type, fetched-at). Within the upstream's
``tag_ttl`` it is served with no upstream request. After the TTL it is revalidated with
a HEAD (which Docker Hub does not count as a pull): same digest refreshes the mapping;
a new digest is fetched by digest. If the upstream cannot answer (unreachable, 5xx,
429) the cached mapping is served stale, counted and marked; with nothing cached the
real error goes to the client.

Policy when the upstream is not well: a tag whose revalidation fails (unreachable,
breaker open, 5xx, 429) is served stale up to ``max_stale`` past its TTL; one the upstream
no longer has (404) only with ``stale_on_404``. While the upstream's pull budget is under
its floor, tags are served from cache without revalidation and cold manifests are refused
with 429.

A cached manifest is served only when the client's Accept admits its media type;
otherwise the upstream is asked with the client's Accept. Concurrent misses for one
(repository, reference, Accept) share one upstream request.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from proxy import metrics
from proxy.errors import ManifestUnknown, NotAcceptable, TooManyRequests, UpstreamError
from proxy.interfaces import (
    ColdFetchGate,
    LinkService,
    ManifestBodies,
    ManifestSource,
    TagEntry,
    TagRevalidations,
    TagService,
)
from proxy.model import (
    ACCEPT_CACHE,
    MANIFEST_MEDIA_TYPES,
    MAX_CACHED_ACCEPT,
    Digest,
    Outcome,
    Reference,
    accepts,
    references,
)
from proxy.pullthrough.blobs import RepositoryScope
from proxy.pullthrough.coalesce import Coalescer
from proxy.settings import UpstreamSettings
from proxy.storage.manifests import ManifestStore, StoredManifest

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class ManifestResult:
    manifest: StoredManifest
    outcome: Outcome


class ProxyManifestService:
    def __init__(
        self,
        settings: UpstreamSettings,
        upstream: ManifestSource,
        store: ManifestStore,
        tags: TagService,
        links: LinkService,
        *,
        clock: Callable[[], float] = time.time,
        on_pull: Callable[[str, str, Digest], None] | None = None,
        revalidations: TagRevalidations | None = None,
        bodies: ManifestBodies | None = None,
    ) -> None:
        """``revalidations`` and ``bodies``: coordination with other processes sharing
        the cache (``proxy.cluster``): who sends a tag's HEAD, and manifest bodies one
        of them fetched already."""
        self._settings = settings
        self._on_pull = on_pull
        self._revalidations = revalidations
        self._bodies = bodies
        self._upstream = upstream
        self._store = store
        self._tags = tags
        self._links = links
        self._clock = clock
        self._coalescer: Coalescer[StoredManifest] = Coalescer("manifest")

    async def close(self) -> None:
        await self._coalescer.close()

    async def get(
        self,
        repo: str,
        reference: Reference,
        accept: str | None,
        gate: ColdFetchGate | None = None,
    ) -> ManifestResult:
        """The manifest for ``reference``; raises ManifestUnknown and upstream errors.
        Each answer is reported to ``on_pull`` (eviction's least recently pulled).

        ``gate`` is asked before a manifest is fetched from upstream (not before a HEAD
        that revalidates a tag): per-identity quotas."""
        if reference.digest is not None:
            result = await self._get_by_digest(repo, reference.digest, accept, gate)
        else:
            assert reference.tag is not None
            result = await self._get_by_tag(repo, reference.tag, accept, gate)
        if self._on_pull is not None:
            # (upstream, repo, digest): the image's last pull, kept in memory (index).
            self._on_pull(self._settings.name, repo, result.manifest.digest)
        return result

    async def _admit(self, gate: ColdFetchGate | None) -> None:
        """A cold fetch: refused while the upstream's pull budget is under its floor (or
        its breaker is open), then by the identity's quota."""
        self._upstream.health.refuse_cold_pull()
        if gate is not None:
            await gate.admit()

    async def _get_by_digest(
        self, repo: str, digest: Digest, accept: str | None, gate: ColdFetchGate | None
    ) -> ManifestResult:
        local = self._store.cached(digest) or await self._store.get(digest)
        scope = self._scope(repo)
        if local is not None and not scope.known(digest) and not await scope.holds(digest):
            # Cached for another repository: only the upstream can say this one has it.
            await self._upstream.get_manifest(repo, str(digest), accept, head=True)
            await scope.record([digest])
        if local is not None and accepts(accept, local.media_type):
            return ManifestResult(local, Outcome.HIT)
        if local is not None:
            raise NotAcceptable(
                f"manifest {digest} is {local.media_type}, which the Accept header refuses"
            )
        key = ("digest", repo, str(digest))
        joined = self._coalescer.running(key)
        if not joined:  # joining a fetch in flight costs the upstream nothing
            await self._admit(gate)
        manifest = await self._coalescer.run(key, lambda: self._fetch_digest(repo, digest, accept))
        return ManifestResult(manifest, Outcome.COALESCED if joined else Outcome.MISS)

    async def _get_by_tag(
        self, repo: str, tag: str, accept: str | None, gate: ColdFetchGate | None
    ) -> ManifestResult:
        entry = await self._tags.get(self._settings.name, repo, tag_key(tag, accept))
        if entry is not None and accepts(accept, entry.media_type):
            local = await self._store.get(entry.digest)
            age = self._clock() - entry.fetched_at
            fresh = age < self._settings.tag_ttl or self._upstream.health.budget_low()
            if local is not None and fresh:
                return ManifestResult(local, Outcome.HIT)
            if local is not None:
                return await self._revalidate(repo, tag, accept, entry, local, age)
            if fresh:
                # Another replica resolved the tag (shared Redis) but this disk lacks the
                # manifest: fetch what the tag points to by digest, so the replicas agree.
                return await self._get_by_digest(repo, entry.digest, accept, gate)
        key = ("tag", repo, tag, _accept_key(accept))
        joined = self._coalescer.running(key)
        if not joined:
            await self._admit(gate)
        manifest = await self._coalescer.run(key, lambda: self._fetch_tag(repo, tag, accept))
        return ManifestResult(manifest, Outcome.COALESCED if joined else Outcome.MISS)

    async def _revalidate(
        self,
        repo: str,
        tag: str,
        accept: str | None,
        entry: TagEntry,
        local: StoredManifest,
        age: float,
    ) -> ManifestResult:
        """HEAD the tag upstream; when that fails, serve the cached mapping stale if the
        policy allows (within ``max_stale`` past the TTL; a 404 only with ``stale_on_404``)."""
        key = ("head", repo, tag, _accept_key(accept))
        try:
            head = await self._coalescer.run(key, lambda: self._check_tag(repo, tag, accept, entry))
        except (UpstreamError, TooManyRequests, ManifestUnknown) as exc:
            within = age - self._settings.tag_ttl <= self._settings.max_stale
            if not within or (isinstance(exc, ManifestUnknown) and not self._settings.stale_on_404):
                raise
            metrics.STALE_SERVES.labels(self._settings.name).inc()
            log.warning(
                "serving stale tag (%.0fs old): upstream could not revalidate it: %s",
                age,
                exc.message,
                extra={"upstream": self._settings.name, "repo": repo, "tag": tag},
            )
            return ManifestResult(local, Outcome.STALE)
        outcome = Outcome.REVALIDATED if head.digest == local.digest else Outcome.MISS
        return ManifestResult(head, outcome)

    async def _check_tag(
        self, repo: str, tag: str, accept: str | None, entry: TagEntry
    ) -> StoredManifest:
        """Revalidate with a HEAD, unless another process sharing the cache does it (or
        just did): then what it found."""
        if self._revalidations is None:
            return await self._head_tag(repo, tag, accept, entry)
        name = self._settings.name
        async with self._revalidations.turn(name, repo, tag_key(tag, accept), entry) as other:
            if other is None:
                return await self._head_tag(repo, tag, accept, entry)
        manifest = await self._store.get(other.digest)
        if manifest is None:
            manifest = await self._fetch_digest(repo, other.digest, accept)
        return manifest

    async def _head_tag(
        self, repo: str, tag: str, accept: str | None, entry: TagEntry
    ) -> StoredManifest:
        head = await self._upstream.get_manifest(repo, tag, accept, head=True)
        manifest = await self._store.get(head.digest) if head.digest == entry.digest else None
        if manifest is None:
            manifest = await self._fetch_digest(repo, head.digest, accept)
        await self._record_tag(repo, tag, accept, manifest)
        return manifest

    async def _fetch_tag(self, repo: str, tag: str, accept: str | None) -> StoredManifest:
        manifest = await self._fetch(repo, tag, accept)
        await self._record_tag(repo, tag, accept, manifest)
        return manifest

    async def _fetch_digest(self, repo: str, digest: Digest, accept: str | None) -> StoredManifest:
        """By digest: from a body another process shared, if this repository is known
        to hold it and the client accepts its type; else from the upstream."""
        if self._bodies is not None and await self._scope(repo).holds(digest):
            shared = await self._bodies.get(digest)  # its digest is checked there
            if shared is not None and accepts(accept, shared[0]):
                manifest = await self._store.put(digest, shared[0], shared[1])
                await self._scope(repo).record([digest, *references(manifest.body)])
                metrics.CLUSTER_MANIFESTS_SHARED.inc()
                return manifest
        return await self._fetch(repo, str(digest), accept)

    async def _fetch(self, repo: str, reference: str, accept: str | None) -> StoredManifest:
        fetched = await self._upstream.get_manifest(repo, reference, accept)
        assert fetched.body is not None
        manifest = await self._store.put(fetched.digest, fetched.media_type, fetched.body)
        # The repository holds the manifest and everything it references.
        await self._scope(repo).record([manifest.digest, *references(manifest.body)])
        if self._bodies is not None:
            await self._bodies.put(manifest.digest, manifest.media_type, manifest.body)
        return manifest

    def _scope(self, repo: str) -> RepositoryScope:
        return RepositoryScope(self._links, self._settings.name, repo)

    async def _record_tag(
        self, repo: str, tag: str, accept: str | None, manifest: StoredManifest
    ) -> None:
        entry = TagEntry(manifest.digest, manifest.media_type, len(manifest.body), self._clock())
        await self._tags.set(self._settings.name, repo, tag_key(tag, accept), entry)


def tag_key(tag: str, accept: str | None) -> str:
    """The tag as a cache key. A client whose Accept admits every manifest type sees what
    the upstream offers everyone; one with a narrower Accept (an old client that knows no
    indexes) may get another manifest for the same tag, so its answer is cached under its
    own key (``#`` cannot occur in a tag) and never repoints the tag for everyone else."""
    if accept is not None and len(accept) > MAX_CACHED_ACCEPT:
        return _tag_key.__wrapped__(tag, accept)
    return _tag_key(tag, accept)


@functools.lru_cache(maxsize=ACCEPT_CACHE)
def _tag_key(tag: str, accept: str | None) -> str:
    """``tag_key``, remembered (a warm pull by tag asks it on every request)."""
    if all(accepts(accept, mt) for mt in MANIFEST_MEDIA_TYPES):
        return tag
    return tag + "#" + ",".join(_accept_key(accept))


def _accept_key(accept: str | None) -> tuple[str, ...]:
    if not accept:
        return ()
    return tuple(sorted({item.split(";")[0].strip().lower() for item in accept.split(",")}))
