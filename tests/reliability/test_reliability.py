"""The short reliability suite (the long one is ``python -m bench reliability``): every
trial of ``tests.rig.trials`` a few times, with real parts. Each must end with no
failures and no corrupt body delivered or committed."""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiohttp

from tests.rig.distribution import push_blob, random_blob
from tests.rig.faults import FaultProxy
from tests.rig.proxy_app import ProxyFactory
from tests.rig.proxy_process import ProxyProcess
from tests.rig.recording import PassThrough
from tests.rig.registry import Registry
from tests.rig.skopeo import Skopeo
from tests.rig.trials import (
    MiB,
    TrialResult,
    fault_trials,
    fuzz_trial,
    lying_upstream_trial,
    seed_soak_images,
    sigkill_trials,
    slow_client_trial,
    soak_trial,
    tmpfs_trials,
)
from tests.rig.upstreams import LyingUpstream


def assert_clean(result: TrialResult) -> None:
    print(result.row())  # the table row, for -s runs
    assert result.runs > 0, result.row()
    assert result.corrupt == 0, result.row()
    assert result.failures == 0, result.row()


def child(workdir: Path, upstream_url: str, **server: object) -> ProxyProcess:
    mapping: dict[str, object] = {
        "log_level": "warning",
        "cache": {"dir": str(workdir / "cache")},
        "upstreams": [{"name": "up", "url": upstream_url, "default": True}],
    }
    if server:
        mapping["server"] = server
    return ProxyProcess(workdir, mapping)


async def test_upstream_faults_never_deliver_or_commit_a_corrupt_blob(
    registry: Registry,
    fault_proxy: FaultProxy,
    lying_upstream: LyingUpstream,
    proxy_factory: ProxyFactory,
) -> None:
    proxy = await proxy_factory(fault_proxy.url, failure_threshold=1000)
    for result in await fault_trials(registry.url, fault_proxy, proxy.url, proxy.cache_dir, 2):
        assert_clean(result)
    liar = await proxy_factory(lying_upstream.url)
    assert_clean(await lying_upstream_trial(liar.url, liar.cache_dir, 3))


async def test_sigkill_mid_write_then_restart_on_the_same_directory(
    tmp_path: Path, registry: Registry, fault_proxy: FaultProxy
) -> None:
    offsets = [1 * MiB, 8 * MiB, 20 * MiB]
    result = await sigkill_trials(tmp_path / "kill", registry.url, fault_proxy, offsets, 1)
    assert_clean(result)
    assert result.runs == len(offsets)


async def test_pulls_bigger_than_a_tmpfs_cache(
    tmpfs: Path,
    tmp_path: Path,
    registry: Registry,
    fault_proxy: FaultProxy,
    proxy_factory: ProxyFactory,
    skopeo: Skopeo,
) -> None:
    proxy = await proxy_factory(fault_proxy.url, cache_dir=tmpfs / "cache")
    result = await tmpfs_trials(
        tmp_path / "disk",
        registry.url,
        proxy.url,
        proxy.cache_dir,
        skopeo,
        1,
        layer_size=30 * MiB,
    )
    assert_clean(result)


async def test_fuzzed_requests_get_no_5xx_and_write_nothing_outside_the_cache(
    tmp_path: Path, registry: Registry, passthrough: PassThrough, skopeo: Skopeo
) -> None:
    data, digest = random_blob(MiB)
    async with aiohttp.ClientSession() as http:
        await push_blob(http, registry.url, "fuzz/ok", data)
    with child(tmp_path / "proxy", passthrough.url) as proxy:
        result = await asyncio.to_thread(
            fuzz_trial, proxy.host, tmp_path, [proxy.cache_dir, proxy.workdir], 150
        )
        assert proxy.running, "the proxy died"
        async with (
            aiohttp.ClientSession() as http,
            http.get(f"{proxy.url}/v2/fuzz/ok/blobs/{digest}") as response,
        ):
            assert response.status == 200 and await response.read() == data
    assert_clean(result)


async def test_slowloris_and_stalled_readers_are_closed_by_the_timeouts(
    tmp_path: Path, registry: Registry, passthrough: PassThrough
) -> None:
    data, digest = random_blob(24 * MiB)
    async with aiohttp.ClientSession() as http:
        await push_blob(http, registry.url, "slow/blob", data)
    with child(
        tmp_path / "proxy", passthrough.url, header_timeout="2s", send_timeout="2s"
    ) as proxy:
        async with (
            aiohttp.ClientSession() as http,
            http.get(f"{proxy.url}/v2/slow/blob/blobs/{digest}") as response,
        ):
            assert await response.read() == data
        result = await slow_client_trial(
            proxy,
            "slow/blob",
            digest,
            slowloris=200,
            stalled=20,
            header_timeout=2,
            send_timeout=2,
        )
    assert_clean(result)


async def test_soak_of_concurrent_warm_and_cold_pulls(
    tmp_path: Path, registry: Registry, passthrough: PassThrough
) -> None:
    with child(tmp_path / "proxy", passthrough.url) as proxy:
        async with aiohttp.ClientSession() as http:
            images = await seed_soak_images(
                http, registry.url, tmp_path / "image", proxy.url, cold=40
            )
        result = await soak_trial(proxy, images, clients=100, seconds=8)
    assert_clean(result)
