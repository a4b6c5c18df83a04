"""The Grafana dashboard matches the metrics: every PromQL expression in it, evaluated by a
real Prometheus that scraped a proxy through a scenario producing every series, parses and
returns data.

The scenario: a cold pull, a warm pull, one blob fetched by two clients at once (one
coalesced), an upstream 404, a lying upstream (digest mismatch), then the upstream refuses
and a tag is served stale; a second replica fills a blob from the first over the peer
endpoint, and an unsigned peer request is refused. The proxy runs with a real
``redis-server`` (and as a cluster member) so the Redis and cluster series exist, and its
upstream answers with Docker Hub's ``ratelimit-*`` headers.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import re
import subprocess
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import bcrypt
import pytest
from aiohttp import web
from prometheus_client import REGISTRY

from tests.rig import oci
from tests.rig.process import async_wait_until, free_port
from tests.rig.prometheus import PROMETHEUS_BINARY, PROMTOOL_BINARY, Prometheus
from tests.rig.proxy_app import ProxyUnderTest, proxy_settings_mapping, serve_proxy
from tests.rig.recording import PassThrough
from tests.rig.redis_server import RedisServer
from tests.rig.registry import Registry
from tests.rig.skopeo import Skopeo
from tests.rig.upstreams import LyingUpstream

from .binaries import binary_or_skip

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "grafana" / "dashboards" / "registry-proxy.json"
COMPOSE_PROMETHEUS_CONFIG = ROOT / "deploy" / "prometheus" / "prometheus.yml"

# What Grafana's interval variables become: long enough to cover the whole scenario, so
# every rate() sees at least two samples of every series.
WINDOW = "5m"
BUILTIN_VARIABLES = {
    "__rate_interval": WINDOW,
    "__interval": WINDOW,
    "__range": WINDOW,
    "__range_s": "300",
    "__range_ms": "300000",
    "__interval_ms": "300000",
}
_VARIABLE = re.compile(r"\$\{(\w+)(?::\w+)?\}|\[\[(\w+)\]\]|\$(\w+)")
_LABEL_VALUES = re.compile(r"^label_values\((?P<metric>.+),\s*(?P<label>\w+)\)$")

RATELIMIT_LIMIT = 100
RATELIMIT_REMAINING = 76
REPO = "app"
SCRAPE_DEADLINE = 30.0


class MeteredUpstream(PassThrough):
    """A :class:`PassThrough` whose manifest responses carry Docker Hub's rate-limit headers,
    and which can hold blob GET responses (headers not yet sent) until ``blobs_released``
    is set, so a second client deterministically joins a fetch in progress."""

    def __init__(self, upstream_url: str) -> None:
        super().__init__(upstream_url)
        self.blobs_released = asyncio.Event()
        self.blobs_released.set()
        self.app.on_response_prepare.append(self._decorate)

    async def _decorate(self, request: web.Request, response: web.StreamResponse) -> None:
        if "/manifests/" in request.path:
            response.headers["ratelimit-limit"] = f"{RATELIMIT_LIMIT};w=21600"
            response.headers["ratelimit-remaining"] = f"{RATELIMIT_REMAINING};w=21600"
        if request.method == "GET" and "/blobs/" in request.path:
            await self.blobs_released.wait()


# --------------------------------------------------------------------------- dashboard


def dashboard_targets(dashboard: dict[str, Any]) -> list[tuple[str, str]]:
    """(where, expr) for every target of every panel, rows' nested panels included."""
    found: list[tuple[str, str]] = []

    def walk(panels: list[dict[str, Any]]) -> None:
        for panel in panels:
            for target in panel.get("targets", []):
                if target.get("expr"):
                    found.append((f"{panel['title']!r} {target['refId']}", target["expr"]))
            walk(panel.get("panels", []))

    walk(dashboard["panels"])
    return found


def variable_values(dashboard: dict[str, Any]) -> dict[str, str]:
    """What each template variable becomes with "All" selected (its allValue)."""
    values = dict(BUILTIN_VARIABLES)
    for variable in dashboard["templating"]["list"]:
        if variable["type"] in ("query", "custom"):
            values[variable["name"]] = variable.get("allValue") or ".*"
    return values


def substitute(expr: str, values: dict[str, str]) -> str:
    def replace(match: re.Match[str]) -> str:
        name = next(group for group in match.groups() if group)
        if name not in values:
            raise AssertionError(f"unknown variable ${name} in {expr!r}")
        return values[name]

    return _VARIABLE.sub(replace, expr)


def variable_queries(dashboard: dict[str, Any], values: dict[str, str]) -> list[tuple[str, str]]:
    """Each query variable's ``label_values(metric, label)`` as PromQL that must return
    data: ``count by (label) (metric)``."""
    found: list[tuple[str, str]] = []
    for variable in dashboard["templating"]["list"]:
        if variable["type"] != "query":
            continue
        query = variable["query"]
        text = query["query"] if isinstance(query, dict) else query
        match = _LABEL_VALUES.match(text.strip())
        assert match, f"variable {variable['name']}: unsupported query {text!r}"
        found.append(
            (
                f"variable {variable['name']!r}",
                substitute(f"count by ({match['label']}) ({match['metric']})", values),
            )
        )
    return found


def test_dashboard_has_expressions() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    targets = dashboard_targets(dashboard)
    assert len(targets) >= 20
    values = variable_values(dashboard)
    for _, expr in targets:
        assert "$" not in substitute(expr, values)


# --------------------------------------------------------------------------- fixtures


@pytest.fixture
async def metered_upstream(registry: Registry) -> AsyncIterator[MeteredUpstream]:
    server = MeteredUpstream(registry.url)
    await server.start()
    try:
        yield server
    finally:
        server.blobs_released.set()
        await server.stop()


@pytest.fixture
async def observed_proxy(
    tmp_path: Path,
    metered_upstream: MeteredUpstream,
    lying_upstream: LyingUpstream,
    redis_server: RedisServer,
) -> AsyncIterator[ProxyUnderTest]:
    """The proxy with Redis, a disk limit, tag_ttl 0 (every tag pull revalidates) and two
    upstreams: ``up`` (default, the metered pass-through) and ``liar`` (wrong blob bytes)."""
    mapping = proxy_settings_mapping(metered_upstream.url, tmp_path / "cache", tag_ttl="0")
    mapping["cache"]["redis"] = redis_server.url
    mapping["cache"]["max_size"] = "1GiB"  # a limit, so disk_limit_bytes is not 0
    mapping["upstreams"].append({"name": "liar", "url": lying_upstream.url})
    # Access control engaged (a local user, a rule of its own) and limits configured, so
    # the access row has its series; the scenario is denied once.
    htpasswd = tmp_path / "htpasswd"
    htpasswd.write_text(f"ops:{bcrypt.hashpw(b'ops-pw', bcrypt.gensalt(4)).decode()}\n")
    mapping["auth"] = {"htpasswd": str(htpasswd)}
    mapping["access"] = {
        "admins": ["ops"],
        "rules": [
            {"repos": "**", "pull": ["anonymous"]},
            {"repos": "up/private/**", "pull": ["ops"]},
        ],
    }
    mapping["limits"] = {"requests": "10000/s", "cold_fetches": "10000/1h"}
    # A cluster member, so the cluster row has its series; the scenario adds a peer.
    port = free_port()
    (tmp_path / "cluster.secret").write_text("dashboard-cluster-secret\n")
    mapping["cluster"] = {
        "advertise": f"127.0.0.1:{port}",
        "secret_file": str(tmp_path / "cluster.secret"),
    }
    proxy = await serve_proxy(mapping, port=port)
    try:
        yield proxy
    finally:
        await proxy.server.stop()


@pytest.fixture
async def prometheus(
    tmp_path: Path, observed_proxy: ProxyUnderTest, http: aiohttp.ClientSession
) -> AsyncIterator[Prometheus]:
    server = Prometheus(
        tmp_path / "prometheus",
        [observed_proxy.host],
        binary=binary_or_skip(PROMETHEUS_BINARY),
    )
    server.start()
    try:
        await server.wait_ready(http)
        yield server
    finally:
        server.stop()


# --------------------------------------------------------------------------- scenario


def sample(name: str, labels: dict[str, str] | None = None) -> float:
    """The current value of a sample in this process's metrics registry (0 when absent)."""
    return REGISTRY.get_sample_value(name, labels or {}) or 0.0


async def get(
    http: aiohttp.ClientSession, url: str, headers: dict[str, str] | None = None
) -> tuple[int, str | None, bytes]:
    async with http.get(url, headers=headers) as response:
        return response.status, response.headers.get("X-Cache"), await response.read()


async def run_scenario(
    tmp_path: Path,
    registry: Registry,
    upstream: MeteredUpstream,
    proxy: ProxyUnderTest,
    skopeo: Skopeo,
    http: aiohttp.ClientSession,
) -> None:
    image = oci.make_image(tmp_path / "image", tag="v1", layers=2)
    await skopeo.push(image.oci_ref, registry.host, REPO, "v1")
    solo = oci.make_image(tmp_path / "solo", tag="solo", layers=1)
    await skopeo.push(solo.oci_ref, registry.host, REPO, "solo")

    # Cold, then warm: misses, fills, hits; Redis reads and writes; rate-limit headers.
    await skopeo.pull(proxy.host, f"{REPO}:v1", tmp_path / "cold")
    await skopeo.pull(proxy.host, f"{REPO}:v1", tmp_path / "warm")

    # Two clients, one blob: the upstream holds its answer until the second client has
    # joined the fetch in progress.
    layer = solo.layers[0].digest
    url = f"{proxy.url}/v2/{REPO}/blobs/{layer}"
    joined = sample("registry_proxy_coalesced_requests_total", {"kind": "blob"})
    upstream.blobs_released.clear()
    first = asyncio.create_task(get(http, url))
    await async_wait_until(
        lambda: upstream.log.blob_gets(layer), within=10, what="the upstream blob GET"
    )
    second = asyncio.create_task(get(http, url))
    await async_wait_until(
        lambda: sample("registry_proxy_coalesced_requests_total", {"kind": "blob"}) > joined,
        within=10,
        what="the second client to join the fetch",
    )
    upstream.blobs_released.set()
    answers = await asyncio.gather(first, second)
    assert sorted(str(cache) for _, cache, _ in answers) == ["COALESCED", "MISS"], answers
    for status, _, body in answers:
        assert status == 200
        assert "sha256:" + hashlib.sha256(body).hexdigest() == layer

    # An upstream 4xx: a tag it does not have.
    status, _, _ = await get(
        http,
        f"{proxy.url}/v2/{REPO}/manifests/no-such-tag",
        {"Accept": oci.ACCEPT_ALL_MANIFESTS},
    )
    assert status == 404

    # A lying upstream: wrong bytes for the digest asked, rejected, connection aborted.
    mismatches = sample("registry_proxy_digest_mismatches_total")
    bogus = "sha256:" + hashlib.sha256(os.urandom(32)).hexdigest()
    with pytest.raises(aiohttp.ClientError):
        await get(http, f"{proxy.url}/v2/liar/{REPO}/blobs/{bogus}")
    await async_wait_until(
        lambda: sample("registry_proxy_digest_mismatches_total") > mismatches,
        within=10,
        what="the digest mismatch to be counted",
    )

    # Cache management through the admin API: a pre-warm, gc, verify, stats.
    ops = {"Authorization": "Basic " + base64.b64encode(b"ops:ops-pw").decode()}
    async with http.post(
        f"{proxy.url}/admin/cache/prewarm",
        json={"refs": [f"up/{REPO}:solo"], "platforms": None},
        headers=ops,
    ) as response:
        assert response.status == 200
        lines = [json.loads(line) for line in (await response.read()).splitlines()]
        assert lines[-1] == {"event": "summary", "refs": 1, "failed": []}, lines
    for path in ("/admin/cache/gc?dry_run=1", "/admin/cache/verify"):
        async with http.post(proxy.url + path, headers=ops) as response:
            assert response.status == 200, path
    async with http.get(proxy.url + "/admin/cache/stats", headers=ops) as response:
        assert (await response.json())["images"] >= 2

    # The upstream goes away: the tag is served stale (tag_ttl 0 forces revalidation).
    upstream.mode = "refuse"
    await skopeo.pull(proxy.host, f"{REPO}:v1", tmp_path / "stale")
    status, cache, _ = await get(
        http, f"{proxy.url}/v2/{REPO}/manifests/v1", {"Accept": oci.ACCEPT_ALL_MANIFESTS}
    )
    assert (status, cache) == (200, "STALE")

    # Access control: an anonymous client kept out of a repository only ops may pull.
    status, _, _ = await get(http, f"{proxy.url}/v2/private/app/manifests/v1")
    assert status == 401

    # Cluster: a second replica (own cache, same Redis) fills the solo layer from this
    # one over the peer endpoint, with the upstream still away; an unsigned peer request
    # is refused.
    assert proxy.settings.redis_url is not None
    port = free_port()
    peer_mapping = proxy_settings_mapping(upstream.url, tmp_path / "peer-cache", tag_ttl="0")
    peer_mapping["cache"]["redis"] = proxy.settings.redis_url
    peer_mapping["cache"]["max_size"] = "1GiB"  # the process-wide disk limit gauge stays
    peer_mapping["cluster"] = {
        "advertise": f"127.0.0.1:{port}",
        "secret_file": str(proxy.settings.cluster.secret_file),
    }
    peer = await serve_proxy(peer_mapping, port=port)
    try:
        status, _, body = await get(http, f"{peer.url}/v2/{REPO}/blobs/{layer}")
        assert status == 200
        assert "sha256:" + hashlib.sha256(body).hexdigest() == layer
    finally:
        await peer.server.stop()
    status, _, _ = await get(http, f"{proxy.url}/_cluster/blobs/{layer}?offset=0")
    assert status == 403

    # /readyz pings Redis.
    async with http.get(proxy.url + "/readyz") as response:
        assert response.status == 200


async def wait_for_scrapes_after(
    prometheus: Prometheus, http: aiohttp.ClientSession, moment: float
) -> None:
    """Until two scrapes that started after ``moment`` (wall clock) have been stored: then
    every series that existed at ``moment`` has at least two samples after it."""
    seen: list[float] = []

    async def scraped_again() -> bool:
        latest = await prometheus.latest_scrape(http)
        if latest is None:
            return False
        timestamp, value = latest
        assert value == 1, f"Prometheus could not scrape the proxy (up={value})"
        if timestamp > moment and timestamp not in seen:
            seen.append(timestamp)
        return len(seen) >= 2

    await async_wait_until(
        scraped_again, within=SCRAPE_DEADLINE, what="two scrapes after the scenario", interval=0.2
    )


async def test_every_dashboard_expression_returns_data(
    tmp_path: Path,
    registry: Registry,
    metered_upstream: MeteredUpstream,
    observed_proxy: ProxyUnderTest,
    prometheus: Prometheus,
    skopeo: Skopeo,
    http: aiohttp.ClientSession,
) -> None:
    await run_scenario(tmp_path, registry, metered_upstream, observed_proxy, skopeo, http)
    await wait_for_scrapes_after(prometheus, http, time.time())

    dashboard = json.loads(DASHBOARD.read_text())
    values = variable_values(dashboard)
    expressions = [
        (where, substitute(expr, values)) for where, expr in dashboard_targets(dashboard)
    ]
    expressions += variable_queries(dashboard, values)
    failures: list[str] = []
    for where, expr in expressions:
        body = await prometheus.query(http, expr)
        if body.get("status") != "success":
            failures.append(f"{where}: {body.get('errorType')}: {body.get('error')}\n    {expr}")
        elif not body["data"]["result"]:
            failures.append(f"{where}: no data\n    {expr}")
    if failures:
        names = await prometheus.query(
            http, 'group by (__name__) ({__name__=~"registry_proxy_.+"})'
        )
        stored = sorted(r["metric"]["__name__"] for r in names.get("data", {}).get("result", []))
        pytest.fail(
            "dashboard expressions that fail:\n"
            + "\n".join(failures)
            + "\nseries Prometheus has: "
            + (", ".join(stored) or "none")
        )

    # The scrape saw the scenario, not just empty series.
    expected: dict[str, Callable[[float], bool]] = {
        'max(registry_proxy_stale_serves_total{upstream="up"})': lambda v: v >= 1,
        'max(registry_proxy_coalesced_requests_total{kind="blob"})': lambda v: v >= 1,
        "max(registry_proxy_digest_mismatches_total)": lambda v: v >= 1,
        'max(registry_proxy_upstream_ratelimit_remaining{upstream="up"})': (
            lambda v: v == RATELIMIT_REMAINING
        ),
        'sum(registry_proxy_redis_operations_total{result="ok"})': lambda v: v >= 1,
        'sum(registry_proxy_served_bytes_total{source="cache"})': lambda v: v > 0,
        'sum(registry_proxy_upstream_requests_total{status="error"})': lambda v: v >= 1,
        'sum(registry_proxy_upstream_requests_total{status="4xx"})': lambda v: v >= 1,
        "max(registry_proxy_disk_blobs)": lambda v: v >= 1,
        'sum(registry_proxy_access_decisions_total{decision="deny"})': lambda v: v >= 1,
        'sum(registry_proxy_access_decisions_total{reason="public"})': lambda v: v >= 1,
        'sum(registry_proxy_identity_usage_total{counter="requests"})': lambda v: v >= 1,
        'sum(registry_proxy_prewarm_images_total{result="ok"})': lambda v: v >= 1,
        'sum(registry_proxy_cache_state_bytes{state="recent"})': lambda v: v > 0,
        'sum(registry_proxy_cluster_fetches_total{source="holder"})': lambda v: v >= 1,
        'sum(registry_proxy_peer_bytes_total{direction="out"})': lambda v: v > 0,
        'sum(registry_proxy_peer_requests_total{result="denied"})': lambda v: v >= 1,
        'sum(registry_proxy_cluster_leases_total{result="acquired"})': lambda v: v >= 1,
    }
    wrong: list[str] = []
    for expr, check in expected.items():
        value = await prometheus.scalar(http, expr)
        if value is None or not check(value):
            wrong.append(f"{expr} = {value}")
    assert not wrong, "scraped values do not reflect the scenario:\n" + "\n".join(wrong)


def test_promtool_accepts_the_compose_scrape_config() -> None:
    promtool = binary_or_skip(PROMTOOL_BINARY)
    result = subprocess.run(
        [promtool, "check", "config", str(COMPOSE_PROMETHEUS_CONFIG)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
