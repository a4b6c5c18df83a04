"""``workers: 2``: a supervisor and two worker processes on one port and one cache.

Real parts: the proxy as a child process (``python -m proxy serve``), docker-registry as
the upstream behind a counting (or fault-injecting) pass-through, skopeo as a client.
Which worker answered is known two ways: the access log (JSON, with the ``worker``
field every worker's lines carry) and ``/readyz`` (its ``worker`` section) asked first on
a keep-alive connection, which then stays with that worker.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from tests.rig import oci
from tests.rig.distribution import push_blob, push_image, random_blob
from tests.rig.faults import FaultProxy, blobs
from tests.rig.process import async_wait_until, wait_until
from tests.rig.proxy_process import ProxyProcess
from tests.rig.recording import PassThrough
from tests.rig.redis_server import RedisServer
from tests.rig.registry import Registry
from tests.rig.skopeo import Skopeo

pytestmark = pytest.mark.integration

MiB = 1 << 20
BIG = 32 * MiB
DEADLINE = 60.0


def worker_proxy(
    workdir: Path,
    upstream_url: str,
    *,
    workers: int = 2,
    redis_url: str | None = None,
    secret_file: Path | None = None,
) -> ProxyProcess:
    """The proxy with ``workers``; with ``secret_file`` a cluster replica (Redis)."""
    cache: dict[str, object] = {"dir": str(workdir / "cache")}
    mapping: dict[str, object] = {
        "log_level": "info",
        "log_format": "json",
        "workers": workers,
        "shutdown_grace": "20s",
        "cache": cache,
        "upstreams": [{"name": "up", "url": upstream_url, "default": True}],
    }
    if redis_url is not None:
        cache["redis"] = redis_url
    proxy = ProxyProcess(workdir, mapping)
    if secret_file is not None:
        proxy.mapping["cluster"] = {"advertise": proxy.host, "secret_file": str(secret_file)}
        proxy.config_path.write_text(yaml.safe_dump(proxy.mapping))
    return proxy


def log_lines(proxy: ProxyProcess) -> list[dict[str, Any]]:
    lines = []
    for line in proxy.log_text().splitlines():
        try:
            lines.append(json.loads(line))
        except ValueError:
            continue
    return lines


def wait_for_workers(proxy: ProxyProcess, count: int = 2) -> None:
    def listening() -> bool:
        return any(line.get("msg") == f"{count} workers listening" for line in log_lines(proxy))

    wait_until(listening, within=DEADLINE, what=f"{count} workers listening")


def access_lines(proxy: ProxyProcess, path_part: str) -> list[dict[str, Any]]:
    return [
        line
        for line in log_lines(proxy)
        if "route" in line and "duration_ms" in line and path_part in str(line.get("msg"))
    ]


async def served_by_worker(proxy: ProxyProcess, path_part: str, count: float) -> Counter[int]:
    """Access lines of ``path_part`` by worker, once there are ``count``: a line is
    written after its client has the response (on the loop's next turn), so right after
    the last response it may still be on its way."""
    await async_wait_until(
        lambda: len(access_lines(proxy, path_part)) >= count,
        within=DEADLINE,
        what=f"{count} access lines of {path_part}",
    )
    return Counter(line["worker"] for line in access_lines(proxy, path_part))


def blob_path(proxy: ProxyProcess, digest: str) -> Path:
    hex_digest = digest.removeprefix("sha256:")
    return proxy.cache_dir / "blobs" / "sha256" / hex_digest[:2] / hex_digest


def claim_meta(proxy: ProxyProcess, digest: str) -> Path:
    return proxy.cache_dir / "tmp" / f"{digest.removeprefix('sha256:')}.meta"


async def worker_of(session: aiohttp.ClientSession, proxy: ProxyProcess) -> int:
    """The pid of the worker behind ``session``'s one connection (``/readyz``)."""
    async with session.get(f"{proxy.url}/readyz") as response:
        report = await response.json()
    return int(report["worker"]["pid"])


async def sessions_on_workers(
    proxy: ProxyProcess, per_worker: int, workers: int = 2
) -> dict[int, list[aiohttp.ClientSession]]:
    """Keep-alive sessions of one connection each, ``per_worker`` on every worker."""
    by_pid: dict[int, list[aiohttp.ClientSession]] = {}
    spare: list[aiohttp.ClientSession] = []
    for _ in range(64):
        if len(by_pid) == workers and all(len(s) >= per_worker for s in by_pid.values()):
            break
        session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1))
        pid = await worker_of(session, proxy)
        group = by_pid.setdefault(pid, [])
        (group if len(group) < per_worker else spare).append(session)
    for session in spare:
        await session.close()
    assert len(by_pid) == workers, f"connections reached only {sorted(by_pid)}"
    assert all(len(s) >= per_worker for s in by_pid.values()), {
        pid: len(s) for pid, s in by_pid.items()
    }
    return by_pid


async def fetch_blob(session: aiohttp.ClientSession, url: str) -> tuple[int, str, int] | str:
    """(status, sha256 digest, length) of a whole response, or why it was cut."""
    try:
        async with session.get(url) as response:
            hasher = hashlib.sha256()
            length = 0
            async for chunk in response.content.iter_chunked(MiB):
                hasher.update(chunk)
                length += len(chunk)
            return response.status, "sha256:" + hasher.hexdigest(), length
    except (TimeoutError, aiohttp.ClientError) as exc:
        return f"cut: {type(exc).__name__}"


async def test_sixteen_gets_over_both_workers_cost_one_upstream_get(
    tmp_path: Path, registry: Registry, passthrough: PassThrough, http: aiohttp.ClientSession
) -> None:
    data, digest = random_blob(BIG)
    await push_blob(http, registry.url, "big/blob", data)
    del data
    with worker_proxy(tmp_path / "proxy", passthrough.url) as proxy:
        wait_for_workers(proxy)
        url = f"{proxy.url}/v2/big/blob/blobs/{digest}"

        async def one() -> tuple[int, str, int] | str:
            async with aiohttp.ClientSession() as session:  # a connection of its own
                return await fetch_blob(session, url)

        results = await asyncio.gather(*(one() for _ in range(16)))

        assert results == [(200, digest, BIG)] * 16
        assert len(passthrough.log.blob_gets(digest)) == 1, passthrough.log.summary()
        assert passthrough.log.blob_bytes_served(digest) == BIG
        served = await served_by_worker(proxy, digest, 16)
        assert sum(served.values()) == 16
        assert set(served) == {1, 2}, f"every GET went to one worker: {served}"
        follows = proxy.metric("registry_proxy_worker_fetches_total", result="followed")
        assert follows >= 1
        await async_wait_until(
            blob_path(proxy, digest).is_file, within=DEADLINE, what="the blob committed"
        )
        assert oci.sha256_digest(blob_path(proxy, digest).read_bytes()) == digest
        assert list((proxy.cache_dir / "tmp").iterdir()) == []


async def test_replicas_with_workers_still_fetch_each_blob_once(
    tmp_path: Path,
    registry: Registry,
    passthrough: PassThrough,
    redis_server: RedisServer,
    http: aiohttp.ClientSession,
) -> None:
    """Two replicas sharing Redis (``cluster``), one of them with two workers: clients on
    every worker of both get the blob, and the upstream sends it once. The worker that
    holds the node's temp file is the one that asks Redis for the lease; the other
    replica's follower may reach either worker of the owner's node on the peer endpoint
    (the one without the fetch follows its sibling's file)."""
    data, digest = random_blob(BIG)
    await push_blob(http, registry.url, "big/cluster", data)
    del data
    secret = tmp_path / "cluster.secret"
    secret.write_text("cluster-test-secret-0123456789abcdef\n")
    secret.chmod(0o600)
    two = worker_proxy(
        tmp_path / "two", passthrough.url, redis_url=redis_server.url, secret_file=secret
    )
    one = worker_proxy(
        tmp_path / "one",
        passthrough.url,
        workers=1,
        redis_url=redis_server.url,
        secret_file=secret,
    )
    with two, one:
        wait_for_workers(two)

        async def get(proxy: ProxyProcess) -> tuple[int, str, int] | str:
            async with aiohttp.ClientSession() as session:
                return await fetch_blob(session, f"{proxy.url}/v2/big/cluster/blobs/{digest}")

        results = await asyncio.gather(*(get(p) for p in (two, one) * 8))

        assert results == [(200, digest, BIG)] * 16
        assert len(passthrough.log.blob_gets(digest)) == 1, passthrough.log.summary()
        assert set(await served_by_worker(two, digest, 8)) == {1, 2}
        for proxy in (two, one):
            await async_wait_until(
                blob_path(proxy, digest).is_file, within=DEADLINE, what="the blob committed"
            )
            assert oci.sha256_digest(blob_path(proxy, digest).read_bytes()) == digest


async def test_sigkill_of_the_fetching_worker_is_taken_over_by_the_other(
    tmp_path: Path, registry: Registry, fault_proxy: FaultProxy, http: aiohttp.ClientSession
) -> None:
    """The owner of a fetch dies mid-blob: clients following it through the other worker
    get the whole blob with the right digest (the survivor takes the fetch over with a
    Range request); the dead worker's own clients are cut; nothing partial is committed."""
    data, digest = random_blob(BIG)
    await push_blob(http, registry.url, "big/kill", data)
    del data
    pause = fault_proxy.pause_blob(8 * MiB, match=blobs("GET", digest=digest))
    with worker_proxy(tmp_path / "proxy", fault_proxy.url) as proxy:
        wait_for_workers(proxy)
        groups = await sessions_on_workers(proxy, per_worker=3)
        try:
            url = f"{proxy.url}/v2/big/kill/blobs/{digest}"
            tasks = {
                pid: [asyncio.create_task(fetch_blob(s, url)) for s in sessions]
                for pid, sessions in groups.items()
            }
            await asyncio.wait_for(pause.reached.wait(), DEADLINE)
            meta = claim_meta(proxy, digest)
            await async_wait_until(meta.exists, within=DEADLINE, what="the claim's meta file")
            owner = int(json.loads(meta.read_text())["pid"])
            assert owner in groups
            os.kill(owner, signal.SIGKILL)
            pause.resume()
            results = {pid: await asyncio.gather(*ts) for pid, ts in tasks.items()}
        finally:
            for sessions in groups.values():
                for session in sessions:
                    await session.close()
        (survivor,) = [pid for pid in groups if pid != owner]
        assert results[survivor] == [(200, digest, BIG)] * 3, results[survivor]
        for result in results[owner]:  # cut, or (had it all before the kill) whole
            assert not (isinstance(result, tuple) and result[0] == 200 and result[1] != digest)
            assert not (isinstance(result, tuple) and result[2] == BIG and result[1] != digest)
        await async_wait_until(
            blob_path(proxy, digest).is_file, within=DEADLINE, what="the blob committed"
        )
        assert oci.sha256_digest(blob_path(proxy, digest).read_bytes()) == digest
        gets = fault_proxy.log.blob_gets(digest)
        assert len(gets) == 2, fault_proxy.log.summary()  # the first, then one Range
        assert "Range" not in gets[0].headers and "Range" in gets[1].headers
        assert any(line.get("msg", "").startswith("taking over") for line in log_lines(proxy))
        # The supervisor brings the dead worker back.
        wait_until(
            lambda: any("restarting" in str(line.get("msg")) for line in log_lines(proxy)),
            within=DEADLINE,
            what="the supervisor restarting the worker",
        )


async def test_skopeo_pulls_through_two_workers(
    tmp_path: Path,
    registry: Registry,
    passthrough: PassThrough,
    skopeo: Skopeo,
    http: aiohttp.ClientSession,
) -> None:
    image = await push_image(http, registry.url, tmp_path / "image", "team/app", "v1", layers=3)
    with worker_proxy(tmp_path / "proxy", passthrough.url) as proxy:
        wait_for_workers(proxy)
        await asyncio.gather(
            *(skopeo.pull(proxy.host, "team/app:v1", tmp_path / f"pulled{i}") for i in range(4))
        )
        for i in range(4):
            pulled = oci.layout_layer_digests(tmp_path / f"pulled{i}", "pulled")
            assert pulled == image.layer_digests
        for layer in image.layer_digests:
            assert len(passthrough.log.blob_gets(layer)) == 1, passthrough.log.summary()


async def test_metrics_are_summed_over_the_workers(
    tmp_path: Path, registry: Registry, passthrough: PassThrough
) -> None:
    with worker_proxy(tmp_path / "proxy", passthrough.url) as proxy:
        wait_for_workers(proxy)
        for _ in range(30):
            async with (
                aiohttp.ClientSession() as session,  # a connection each
                session.get(f"{proxy.url}/v2/") as response,
            ):
                assert response.status == 200
        # The counter is bumped before a response is written: wait for the access log
        # to catch up with it.
        counted = proxy.metric(
            "registry_proxy_http_requests_total", route="base", method="GET", status="2xx"
        )
        assert counted >= 30
        served = await served_by_worker(proxy, "GET /v2/ ", counted)
        assert sum(served.values()) == counted, served
        assert set(served) == {1, 2}, served
        # A gauge of what each worker has in progress is summed over the live ones; the
        # build info is there once.
        samples = proxy.metrics()
        assert samples[("registry_proxy_client_connections", ())] >= 1
        assert [k for k in samples if k[0] == "registry_proxy_build_info"] != []


async def test_sigterm_drains_both_workers(
    tmp_path: Path, registry: Registry, fault_proxy: FaultProxy, http: aiohttp.ClientSession
) -> None:
    """SIGTERM to the supervisor: each worker finishes the responses in flight (here two
    clients on each, held mid-blob by the upstream until after the signal), then all exit
    and the supervisor exits 0."""
    data, digest = random_blob(BIG)
    await push_blob(http, registry.url, "big/drain", data)
    del data
    pause = fault_proxy.pause_blob(4 * MiB, match=blobs("GET", digest=digest))
    with worker_proxy(tmp_path / "proxy", fault_proxy.url) as proxy:
        wait_for_workers(proxy)
        groups = await sessions_on_workers(proxy, per_worker=2)
        try:
            url = f"{proxy.url}/v2/big/drain/blobs/{digest}"
            tasks = [asyncio.create_task(fetch_blob(s, url)) for g in groups.values() for s in g]
            await asyncio.wait_for(pause.reached.wait(), DEADLINE)
            assert proxy.process is not None
            proxy.process.send_signal(signal.SIGTERM)
            wait_until(
                lambda: sum("shutting down" in str(x.get("msg")) for x in log_lines(proxy)) == 2,
                within=DEADLINE,
                what="both workers draining",
            )
            pause.resume()
            results = await asyncio.gather(*tasks)
        finally:
            for sessions in groups.values():
                for session in sessions:
                    await session.close()
        assert results == [(200, digest, BIG)] * 4
        code = await asyncio.to_thread(proxy.process.wait, DEADLINE)
        assert code == 0, proxy.log_text()[-2000:]
        assert all(_gone(pid) for pid in groups)


def _gone(pid: int) -> bool:
    """No such process any more (or a zombie its parent has not reaped yet)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z"
    except OSError:
        return True


def _children(pid: int) -> list[str]:
    return Path(f"/proc/{pid}/task/{pid}/children").read_text().split()


async def test_one_worker_is_the_single_process_of_before(
    tmp_path: Path, registry: Registry, passthrough: PassThrough
) -> None:
    with worker_proxy(tmp_path / "proxy", passthrough.url, workers=1) as proxy:
        async with (
            aiohttp.ClientSession() as session,
            session.get(f"{proxy.url}/readyz") as response,
        ):
            report = await response.json()
        assert "worker" not in report
        assert proxy.pid is not None
        assert _children(proxy.pid) == []
        assert not any("worker" in line for line in log_lines(proxy))


def test_an_address_in_use_is_the_one_line_start_up_error(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "proxy",
                "serve",
                "--workers",
                "2",
                "--listen",
                f"127.0.0.1:{port}",
                "--cache-dir",
                str(tmp_path / "cache"),
            ],
            capture_output=True,
            text=True,
            timeout=DEADLINE,
        )
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "address already in use" in lines[0].lower(), done.stderr
