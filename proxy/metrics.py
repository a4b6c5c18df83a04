"""Every Prometheus metric of the proxy, defined once (prefix ``registry_proxy_``).

Labels come only from fixed sets: route, method, status class, kind, layer, result and
the configured upstream names. Never digests, tags or repository names.
"""

from __future__ import annotations

from collections.abc import Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info
from prometheus_client.metrics_core import Metric
from prometheus_client.multiprocess import MultiProcessCollector

PREFIX = "registry_proxy_"
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)

BUILD_INFO = Info(PREFIX + "build", "Version of the running proxy")

REQUESTS = Counter(
    PREFIX + "http_requests_total",
    "Client requests answered, by route, method and status class",
    ["route", "method", "status"],
)
REQUEST_SECONDS = Histogram(
    PREFIX + "http_request_duration_seconds",
    "Time to answer a client request (headers and body), by route",
    ["route"],
    buckets=LATENCY_BUCKETS,
)
CACHE_RESPONSES = Counter(
    PREFIX + "cache_responses_total",
    "Client responses by route and cache outcome (hit, miss, coalesced, revalidated, stale, "
    "denied, error, none): the per-request view of the cache",
    ["route", "outcome"],
)
CACHE_LOOKUPS = Counter(
    PREFIX + "cache_lookups_total",
    "Cache look-ups by kind (blob|manifest|tag), layer (memory|redis|disk) and result "
    "(hit|miss|error)",
    ["kind", "layer", "result"],
)
SERVED_BYTES = Counter(
    PREFIX + "served_bytes_total",
    "Body bytes sent to clients, by source (cache|upstream)",
    ["source"],
)
UPSTREAM_BYTES = Counter(
    PREFIX + "upstream_fetched_bytes_total",
    "Body bytes received from upstream registries",
    ["upstream"],
)
UPSTREAM_REQUESTS = Counter(
    PREFIX + "upstream_requests_total",
    "Requests sent to upstream registries, by method and status class (or 'error')",
    ["upstream", "method", "status"],
)
UPSTREAM_SECONDS = Histogram(
    PREFIX + "upstream_request_duration_seconds",
    "Time to the response headers of an upstream request",
    ["upstream", "method"],
    buckets=LATENCY_BUCKETS,
)
INFLIGHT_FETCHES = Gauge(
    PREFIX + "inflight_fetches",
    "Upstream blob fetches in progress",
    multiprocess_mode="livesum",
)
WORKER_FETCHES = Counter(
    PREFIX + "worker_fetches_total",
    "Blob fetches by how this worker took part (workers > 1): owned (it fetched from the "
    "upstream), followed (another worker's file was followed), takeover (a dead worker's "
    "fetch continued here)",
    ["result"],
)
INFLIGHT_READERS = Gauge(
    PREFIX + "inflight_readers",
    "Client responses currently following a blob fetch in progress (the coalesced waiters "
    "and the client that started it)",
    multiprocess_mode="livesum",
)
DISK_BYTES = Gauge(
    PREFIX + "disk_bytes",
    "Bytes of committed content in the cache directory",
    multiprocess_mode="mostrecent",
)
DISK_BLOBS = Gauge(
    PREFIX + "disk_blobs",
    "Committed blobs and manifests in the cache directory",
    multiprocess_mode="mostrecent",
)
EVICTIONS = Counter(
    PREFIX + "evictions_total",
    "Blobs deleted from the disk cache to keep it under cache.max_size",
)
DISK_LIMIT_BYTES = Gauge(
    PREFIX + "disk_limit_bytes",
    "cache.max_size (0 when unbounded)",
    multiprocess_mode="max",
)
EVICTED_IMAGES = Counter(
    PREFIX + "evicted_images_total",
    "Images (a root manifest and what only it references) and loose blobs removed from the "
    "disk cache, by reason (size, space, manual, gc, corrupt) and kind (image, loose)",
    ["reason", "kind"],
)
EVICTED_BYTES = Counter(
    PREFIX + "evicted_bytes_total",
    "Bytes removed from the disk cache, by reason (size, space, manual, gc, corrupt)",
    ["reason"],
)
CACHE_STATE_BYTES = Gauge(
    PREFIX + "cache_state_bytes",
    "Committed bytes by state at the last eviction or GC pass: pinned (never evicted), "
    "evictable (images and loose blobs past min_age), recent (used within min_age)",
    ["state"],
    multiprocess_mode="mostrecent",
)
PINS_OVER_LIMIT = Gauge(
    PREFIX + "pins_over_limit",
    "1 while pinned images alone exceed cache.max_size (they are kept; nothing else fits)",
    multiprocess_mode="mostrecent",
)
GC_REMOVED = Counter(
    PREFIX + "gc_removed_total",
    "What garbage collection removed, by kind (temp, blob, image)",
    ["kind"],
)
VERIFY_FAILURES = Counter(
    PREFIX + "verify_failures_total",
    "Committed blobs whose bytes no longer match their digest (found by cache verify and "
    "quarantined)",
)
PREWARM_IMAGES = Counter(
    PREFIX + "prewarm_images_total",
    "Images pre-warmed through the admin API, by result (ok, failed)",
    ["result"],
)
COALESCED = Counter(
    PREFIX + "coalesced_requests_total",
    "Requests that joined a fetch already in progress instead of starting one, by kind",
    ["kind"],
)
STALE_SERVES = Counter(
    PREFIX + "stale_serves_total",
    "Tagged manifests served from cache because the upstream could not revalidate them",
    ["upstream"],
)
DIGEST_MISMATCHES = Counter(
    PREFIX + "digest_mismatches_total",
    "Upstream content rejected because its digest or size was not the one asked for",
)

CACHE_SECONDS = Histogram(
    PREFIX + "cache_lookup_duration_seconds",
    "Time of a descriptor look-up, by layer (memory|redis|disk|upstream)",
    ["layer"],
    buckets=(0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.05, 0.25, 1),
)
REDIS_OPERATIONS = Counter(
    PREFIX + "redis_operations_total",
    "Redis operations by op (get|set|clear|ping|lease) and result (ok|error|skipped)",
    ["op", "result"],
)
REDIS_SECONDS = Histogram(
    PREFIX + "redis_operation_duration_seconds",
    "Time of successful Redis round trips",
    ["op"],
    buckets=(0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.1, 0.25),
)
REDIS_BREAKER_STATE = Gauge(
    PREFIX + "redis_breaker_state",
    "Redis circuit breaker: 0 closed (in use), 1 open (skipped), 2 half-open (probing)",
    multiprocess_mode="max",
)

UPSTREAM_UP = Gauge(
    PREFIX + "upstream_up",
    "1 while the upstream's breaker is closed, 0 while it is open or probing",
    ["upstream"],
    multiprocess_mode="min",
)
UPSTREAM_RATELIMIT_REMAINING = Gauge(
    PREFIX + "upstream_ratelimit_remaining",
    "Latest ratelimit-remaining the upstream reported (pulls left in its window)",
    ["upstream"],
    multiprocess_mode="mostrecent",
)
UPSTREAM_RATELIMIT_LIMIT = Gauge(
    PREFIX + "upstream_ratelimit_limit",
    "Latest ratelimit-limit the upstream reported",
    ["upstream"],
    multiprocess_mode="mostrecent",
)
UPSTREAM_RETRIES = Counter(
    PREFIX + "upstream_retries_total",
    "Upstream requests retried after a connection error or 5xx, and blob fetches resumed",
    ["upstream", "kind"],
)


def status_class(status: int) -> str:
    """``2xx``, ``4xx``...; 429 keeps its own value, since throttling is not a client error
    an operator can ignore."""
    return "429" if status == 429 else f"{status // 100}xx"


# --- access control (labels: fixed reasons, and local user names or identity kinds) ----
ACCESS_DECISIONS = Counter(
    PREFIX + "access_decisions_total",
    "Access decisions by decision (allow|deny) and reason (public, user, token, "
    "passthrough, no_rule, not_granted, private, passthrough_refused, bad_credentials)",
    ["decision", "reason"],
)
ACCESS_CHECKS = Counter(
    PREFIX + "access_checks_total",
    "Upstream access checks by kind (visibility|passthrough|login) and result "
    "(cached|granted|refused|unknown|stale|error)",
    ["kind", "result"],
)
LIMIT_REJECTIONS = Counter(
    PREFIX + "limit_rejections_total",
    "Requests refused with 429 by limit (requests|cold_fetches|cold_bytes|logins|probes) and "
    "identity (a local user's name, else anonymous or passthrough)",
    ["limit", "identity"],
)
IDENTITY_USAGE = Counter(
    PREFIX + "identity_usage_total",
    "Usage by identity (a local user's name, else anonymous or passthrough) and counter "
    "(requests, cache_bytes, upstream_bytes, cold_fetches, denials, limited)",
    ["identity", "counter"],
)
TOKENS_ISSUED = Counter(
    PREFIX + "tokens_issued_total",
    "Bearer tokens issued by the token service, by identity kind",
    ["kind"],
)

PASSTHROUGH_FETCHES = Counter(
    PREFIX + "passthrough_fetches_total",
    "Blob fetches streamed to their clients without being cached, by reason (write_error: "
    "the cache write failed, e.g. ENOSPC or EIO; low_space: free space under cache.min_free)",
    ["reason"],
)
DISK_FREE_BYTES = Gauge(
    PREFIX + "disk_free_bytes",
    "Free space of the cache directory's filesystem, as last checked",
    multiprocess_mode="mostrecent",
)
DISK_MIN_FREE_BYTES = Gauge(
    PREFIX + "disk_min_free_bytes",
    "cache.min_free in bytes: below it no new cache write starts",
    multiprocess_mode="max",
)
DISK_LOW_SPACE = Gauge(
    PREFIX + "disk_low_space",
    "1 while free space is under cache.min_free (misses are served pass-through)",
    multiprocess_mode="mostrecent",
)

CLIENT_CONNECTIONS = Gauge(
    PREFIX + "client_connections",
    "Open client connections of the main listener",
    multiprocess_mode="livesum",
)
CLIENT_CONNECTIONS_LIMIT = Gauge(
    PREFIX + "client_connections_limit",
    "server.max_connections in force",
    multiprocess_mode="livesum",
)
CLIENT_CONNECTIONS_CLOSED = Counter(
    PREFIX + "client_connections_closed_total",
    "Client connections the proxy closed, by reason (header_timeout, keepalive_timeout, "
    "send_timeout, shed: made room at max_connections, refused: at the bound, all busy)",
    ["reason"],
)
ACCEPT_ERRORS = Counter(
    PREFIX + "accept_errors_total",
    "Failed accepts of client connections (EMFILE, ENFILE: out of file descriptors)",
)
ASYNCIO_TASKS = Gauge(
    PREFIX + "asyncio_tasks",
    "asyncio tasks of the serving loop (a number that keeps growing is a leak)",
    multiprocess_mode="livesum",
)
MALFORMED_REQUESTS = Counter(
    PREFIX + "malformed_requests_total",
    "Requests that could not be parsed as HTTP (answered 400 with an OCI error body)",
)

# --- cluster (proxy.cluster) -------------------------------------------------------------

PEER_BYTES = Counter(
    PREFIX + "peer_bytes_total",
    "Blob bytes exchanged with other replicas over the peer endpoint, by direction (in|out)",
    ["direction"],
)
PEER_REQUESTS = Counter(
    PREFIX + "peer_requests_total",
    "Requests to this replica's peer endpoint, by result (ok|denied|unknown|error)",
    ["result"],
)
CLUSTER_LEASES = Counter(
    PREFIX + "cluster_leases_total",
    "Blob fetch leases asked for, by result: acquired (this replica fetches), followed "
    "(another replica's fetch is followed), takeover (a dead owner's fetch continued "
    "here), unavailable (Redis did not answer: per-process behaviour)",
    ["result"],
)
CLUSTER_FETCHES = Counter(
    PREFIX + "cluster_fetches_total",
    "Blob fetches committed, by where their bytes came from: upstream, owner (followed "
    "another replica's fetch), holder (filled from a replica that had it), mixed (a peer, "
    "then the upstream after a takeover)",
    ["source"],
)
CLUSTER_TAG_CHECKS = Counter(
    PREFIX + "cluster_tag_checks_total",
    "Tag revalidations past the TTL, by how the cluster settled them: checked (this replica "
    "asked the upstream), shared (another replica's fresh result was used), waited (the "
    "wait for another's result ran out; the cached entry was served), unavailable (Redis "
    "did not answer; checked as a single process does)",
    ["result"],
)
CLUSTER_MANIFESTS_SHARED = Counter(
    PREFIX + "cluster_shared_manifests_total",
    "Manifests taken from Redis instead of being fetched by digest from the upstream",
)


# --- workers (prometheus_client's multiprocess mode) -------------------------------------


class _ProcessLocal:
    """What the multiprocess files do not hold: the build info (the same in every worker)."""

    def collect(self) -> Iterable[Metric]:
        return BUILD_INFO.collect()


def multiprocess_registry(path: str) -> CollectorRegistry:
    """The registry a worker's /metrics renders: every worker's samples from the files in
    ``path`` (``PROMETHEUS_MULTIPROC_DIR``, set by the supervisor before the workers
    start), each Gauge combined as its ``multiprocess_mode`` says: ``livesum`` for what
    each worker has in progress, ``mostrecent`` for what any of them measured last,
    ``max``/``min`` for bounds and states. Counters and histograms are summed, those of
    workers that died included (a count never goes back)."""
    registry = CollectorRegistry(auto_describe=True)
    MultiProcessCollector(registry, path=path)  # type: ignore[no-untyped-call]
    registry.register(_ProcessLocal())
    return registry
