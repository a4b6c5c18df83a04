"""``python -m bench reliability``: the long reliability run (issue 12).

The trials of ``tests.rig.trials`` (the short suite in ``tests/reliability`` runs the same
ones a few times), here with many runs: upstream faults through the fault proxy before a
real docker-registry and a lying upstream, SIGKILL mid-write at several offsets, pulls
bigger than a 64 MiB tmpfs the cache is on (root only; noted as skipped otherwise),
hypothesis fuzzing on raw sockets, slowloris and stalled readers, and a soak of many
concurrent clients. Prints one table (trial, runs, failures, corrupt bodies, notes) and
with ``--results FILE`` writes it there as a section (``bench/RESULTS.md`` keeps the
latest one under "Reliability").
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import re
import shutil
import tempfile
import time
from dataclasses import dataclass, fields, replace
from pathlib import Path

import aiohttp

from tests.rig.distribution import push_blob, random_blob
from tests.rig.faults import FaultProxy
from tests.rig.proxy_app import proxy_settings_mapping, serve_proxy
from tests.rig.proxy_process import ProxyProcess
from tests.rig.registry import Registry
from tests.rig.skopeo import Skopeo
from tests.rig.tmpfs import mounted_tmpfs, tmpfs_unavailable
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
    table,
    tmpfs_trials,
)
from tests.rig.upstreams import LyingUpstream

SECTION = "## Reliability (python -m bench reliability)"


@dataclass(frozen=True)
class ReliabilityConfig:
    fault_runs: int = 20
    kill_runs: int = 3
    tmpfs_runs: int = 3
    fuzz_examples: int = 2000
    slowloris: int = 300
    stalled: int = 50
    soak_clients: int = 500
    soak_seconds: float = 60

    @classmethod
    def quick(cls) -> ReliabilityConfig:
        return cls(
            fault_runs=2,
            kill_runs=1,
            tmpfs_runs=1,
            fuzz_examples=100,
            slowloris=50,
            stalled=5,
            soak_clients=50,
            soak_seconds=5,
        )


def parse_args(argv: list[str]) -> tuple[ReliabilityConfig, argparse.Namespace]:
    p = argparse.ArgumentParser(prog="python -m bench reliability", description=__doc__)
    p.add_argument("--quick", action="store_true", help="a few runs of each (about 2 minutes)")
    defaults = ReliabilityConfig()
    for f in fields(ReliabilityConfig):
        default = getattr(defaults, f.name)
        p.add_argument(
            "--" + f.name.replace("_", "-"),
            type=type(default),
            metavar="N",
            help=f"default {default}",
        )
    p.add_argument("--results", type=Path, help="write the table into this Markdown file")
    p.add_argument("--workdir", type=Path, help="scratch directory (default: a new one in /tmp)")
    args = p.parse_args(argv)
    config = ReliabilityConfig.quick() if args.quick else defaults
    overrides = {
        f.name: getattr(args, f.name)
        for f in fields(ReliabilityConfig)
        if getattr(args, f.name) is not None
    }
    return replace(config, **overrides), args


def say(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", flush=True)


def child(workdir: Path, upstream_url: str, **server: object) -> ProxyProcess:
    mapping: dict[str, object] = {
        "log_level": "warning",
        "cache": {"dir": str(workdir / "cache")},
        "upstreams": [{"name": "up", "url": upstream_url, "default": True}],
    }
    if server:
        mapping["server"] = server
    return ProxyProcess(workdir, mapping)


async def run_trials(config: ReliabilityConfig, workdir: Path) -> list[TrialResult]:
    results: list[TrialResult] = []
    with Registry(workdir / "registry", log_level="warn") as registry:
        async with FaultProxy(registry.url) as faults, LyingUpstream() as liar:
            say(f"upstream faults, {config.fault_runs} runs per mode")
            proxy = await serve_proxy(
                proxy_settings_mapping(
                    faults.url, workdir / "faults-cache", failure_threshold=10**6
                )
            )
            try:
                results += await fault_trials(
                    registry.url, faults, proxy.url, proxy.cache_dir, config.fault_runs
                )
            finally:
                await proxy.server.stop()
            lying = await serve_proxy(proxy_settings_mapping(liar.url, workdir / "liar-cache"))
            try:
                results.append(
                    await lying_upstream_trial(lying.url, lying.cache_dir, config.fault_runs)
                )
            finally:
                await lying.server.stop()

            say(f"SIGKILL mid-write, {config.kill_runs} rounds")
            offsets = [1 * MiB, 8 * MiB, 16 * MiB, 31 * MiB]
            results.append(
                await sigkill_trials(
                    workdir / "kill", registry.url, faults, offsets, config.kill_runs
                )
            )

            reason = tmpfs_unavailable()
            if reason is None:
                say(f"tmpfs, {config.tmpfs_runs} runs")
                with mounted_tmpfs(workdir / "tmpfs", 64) as disk:
                    small = await serve_proxy(proxy_settings_mapping(faults.url, disk / "cache"))
                    try:
                        skopeo = Skopeo(workdir / "skopeo")
                        results.append(
                            await tmpfs_trials(
                                workdir / "disk",
                                registry.url,
                                small.url,
                                small.cache_dir,
                                skopeo,
                                config.tmpfs_runs,
                                layer_size=50 * MiB,
                            )
                        )
                    finally:
                        await small.server.stop()
            else:
                results.append(TrialResult("cache on a 64 MiB tmpfs", notes=[f"skipped: {reason}"]))

        say(f"fuzzing, {config.fuzz_examples} requests")
        with child(workdir / "fuzz", registry.url) as proxy:
            fuzzed = await asyncio.to_thread(
                fuzz_trial,
                proxy.host,
                workdir,
                [proxy.cache_dir, proxy.workdir, registry.workdir],
                config.fuzz_examples,
            )
            if not proxy.running:
                fuzzed.failures += 1
                fuzzed.notes.append("the proxy died")
            results.append(fuzzed)

        say(f"slowloris x{config.slowloris}, stalled readers x{config.stalled}")
        data, digest = random_blob(32 * MiB)
        async with aiohttp.ClientSession() as http:
            await push_blob(http, registry.url, "slow/blob", data)
        with child(workdir / "slow", registry.url, header_timeout="5s", send_timeout="5s") as proxy:
            async with (
                aiohttp.ClientSession() as http,
                http.get(f"{proxy.url}/v2/slow/blob/blobs/{digest}") as response,
            ):
                assert await response.read() == data
            results.append(
                await slow_client_trial(
                    proxy,
                    "slow/blob",
                    digest,
                    slowloris=config.slowloris,
                    stalled=config.stalled,
                    header_timeout=5,
                    send_timeout=5,
                )
            )

        say(f"soak: {config.soak_clients} clients for {config.soak_seconds:g} s")
        with child(workdir / "soak", registry.url) as proxy:
            async with aiohttp.ClientSession() as http:
                images = await seed_soak_images(
                    http, registry.url, workdir / "soak-image", proxy.url, cold=200
                )
            results.append(
                await soak_trial(
                    proxy, images, clients=config.soak_clients, seconds=config.soak_seconds
                )
            )
    return results


def write_section(path: Path, body: str) -> None:
    """Replace (or append) the reliability section of a Markdown file."""
    text = path.read_text() if path.exists() else ""
    pattern = re.compile(rf"^{re.escape(SECTION)}\n.*?(?=^## |\Z)", re.S | re.M)
    section = f"{SECTION}\n\n{body}\n\n"
    text = pattern.sub(section, text) if pattern.search(text) else text.rstrip() + "\n\n" + section
    path.write_text(text)


def main(argv: list[str]) -> int:
    config, args = parse_args(argv)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="rp-reliability-"))
    started = time.monotonic()
    try:
        results = asyncio.run(run_trials(config, workdir))
    finally:
        with contextlib.suppress(OSError):
            shutil.rmtree(workdir, ignore_errors=True)
    rendered = table(results)
    print(rendered)
    clean = all(r.failures == 0 and r.corrupt == 0 for r in results)
    if args.results is not None:
        body = (
            f"Run {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, "
            f"{time.monotonic() - started:.0f} s, settings {config}.\n\n{rendered}"
        )
        write_section(args.results, body)
        say(f"wrote {args.results}")
    return 0 if clean else 1
