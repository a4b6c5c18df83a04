"""``python -m bench.access``: what access control costs on the warm path.

One private upstream (docker-registry behind htpasswd) and three ``registry-proxy serve``
processes over it, each with its own cache:

- ``open``: the upstream's credentials, ``visibility: public``, ``passthrough: false``, no
  users: access control not engaged (what the proxy did before it existed);
- ``secured``: the secure default (``visibility: auto``), an htpasswd user, rules;
- ``secured-nocache``: the same with ``decision_ttl: 0``, so every pass-through request
  asks the upstream again (the decision's cost without its cache).

Measured in one run, on warm content (each proxy filled first): ``wrk`` req/s on a
manifest by digest and MiB/s on a blob, for an anonymous client of ``open`` (the
baseline), a local user by Basic, the same user by bearer token, and upstream credentials
by pass-through; then the latency of sequential pass-through requests with and without
the verdict cache. Prints a table; nothing is written.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import statistics
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import bcrypt
import yaml

from bench import clients
from bench.images import Image, Pusher, mib
from bench.servers import START_TIMEOUT, proxy_binary
from tests.rig import oci
from tests.rig.auth import Credentials, htpasswd_auth
from tests.rig.process import ChildProcess, LoopbackAddress, free_port
from tests.rig.registry import Registry

ACCEPT = {"Accept": oci.OCI_MANIFEST}


class ConfiguredProxy(ChildProcess, LoopbackAddress):
    """``registry-proxy serve --config FILE``; ready when it answers ``/healthz``."""

    def __init__(self, workdir: Path, name: str, config: dict[str, object]) -> None:
        super().__init__(workdir, log_name="proxy.log")
        self.name = name
        self.port = free_port()
        config = {"listen": self.host, "log_level": "warning", **config}
        config["cache"] = {"dir": str(workdir / "cache")}
        self.config_path = workdir / "config.yaml"
        workdir.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(yaml.safe_dump(config))

    def argv(self) -> list[str]:
        return [proxy_binary(), "serve", "--config", str(self.config_path)]

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(self.url + "/healthz", timeout=1) as response:
                return bool(response.status == 200)
        except (urllib.error.URLError, OSError):
            return False


def basic(credentials: Credentials) -> dict[str, str]:
    return {"Authorization": "Basic " + credentials.basic}


@contextlib.contextmanager
def running(*servers: ChildProcess) -> Iterator[None]:
    try:
        for server in servers:
            server.start(START_TIMEOUT)
        yield
    finally:
        for server in reversed(servers):
            server.stop()


async def fill(
    http: aiohttp.ClientSession, url: str, image: Image, headers: dict[str, str]
) -> None:
    for path in (f"manifests/{image.manifest_digest}", *(f"blobs/{b.digest}" for b in image.blobs)):
        async with http.get(f"{url}/v2/{image.repo}/{path}", headers={**ACCEPT, **headers}) as r:
            assert r.status == 200, (url, path, r.status, await r.text())
            await r.read()


async def token(http: aiohttp.ClientSession, url: str, repo: str, headers: dict[str, str]) -> str:
    params = {"service": "registry-proxy", "scope": f"repository:{repo}:pull"}
    async with http.get(f"{url}/token", params=params, headers=headers) as response:
        assert response.status == 200, await response.text()
        value: str = (await response.json())["token"]
        return value


async def sequential_ms(
    http: aiohttp.ClientSession, url: str, headers: dict[str, str], n: int
) -> float:
    """Median milliseconds of ``n`` sequential GETs of ``url``."""
    times: list[float] = []
    for _ in range(n):
        started = time.perf_counter()
        async with http.get(url, headers=headers) as response:
            await response.read()
            assert response.status == 200, response.status
        times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times)


async def measure(args: argparse.Namespace, workdir: Path) -> list[tuple[str, str, str]]:
    owner = Credentials.random("bench-upstream")
    alice = Credentials.random("alice")
    upstream = Registry(
        workdir / "upstream",
        log_level="warn",
        extra=htpasswd_auth(workdir / "upstream-auth", {owner.username: owner.password}),
    )
    htpasswd = workdir / "htpasswd"
    hashed = bcrypt.hashpw(alice.password.encode(), bcrypt.gensalt(10)).decode()
    htpasswd.write_text(f"alice:{hashed}\n")
    entry = {
        "name": "up",
        "url": upstream.url,
        "default": True,
        "username": owner.username,
        "password": owner.password,
    }
    secured_config: dict[str, object] = {
        "upstreams": [entry],
        "auth": {"htpasswd": str(htpasswd)},
        "access": {
            "rules": [
                {"repos": "**", "pull": ["anonymous", "passthrough"]},
                {"repos": "up/bench/**", "pull": ["alice", "passthrough"]},
            ]
        },
    }
    # Every request of this one is an upstream probe: room for the sequential ones (the
    # default auth.probe_rate, 120/m per address, would answer 429 part-way).
    nocache_config = {
        **secured_config,
        "auth": {"htpasswd": str(htpasswd), "decision_ttl": 0, "probe_rate": "100000/m"},
    }
    proxies = {
        "open": ConfiguredProxy(
            workdir / "open",
            "open",
            {"upstreams": [{**entry, "visibility": "public", "passthrough": False}]},
        ),
        "secured": ConfiguredProxy(workdir / "secured", "secured", secured_config),
        "secured-nocache": ConfiguredProxy(workdir / "nocache", "secured-nocache", nocache_config),
    }
    rows: list[tuple[str, str, str]] = []
    with running(upstream, *proxies.values()):
        timeout = aiohttp.ClientTimeout(total=600)
        async with aiohttp.ClientSession(timeout=timeout, headers=basic(owner)) as pushing:
            image = await Pusher(pushing, upstream.url).push_image(
                "bench/app", "v1", [mib(args.blob_mib)]
            )
        async with aiohttp.ClientSession(timeout=timeout) as http:
            for proxy in proxies.values():
                await fill(http, proxy.url, image, basic(owner))
            secured = proxies["secured"].url
            bearer = {
                "Authorization": "Bearer " + await token(http, secured, image.repo, basic(alice))
            }
            clients_of = [
                ("open, anonymous (baseline)", proxies["open"].url, {}),
                ("secured, local user by Basic", secured, basic(alice)),
                ("secured, local user by bearer token", secured, bearer),
                ("secured, pass-through (verdict cached)", secured, basic(owner)),
            ]
            manifest = f"/v2/{image.repo}/manifests/{image.manifest_digest}"
            blob = f"/v2/{image.repo}/blobs/{image.blobs[-1].digest}"
            # Rounds interleave the clients, so drift on the machine hits all alike.
            figures: dict[tuple[str, str], list[float]] = {}
            for _ in range(args.rounds):
                for label, url, headers in clients_of:
                    for kind, path in (("manifest", manifest), ("blob", blob)):
                        run = await clients.wrk(
                            url + path,
                            connections=16,
                            seconds=args.seconds,
                            headers={**ACCEPT, **headers},
                        )
                        assert run.errors == 0, str(run)
                        value = run.rps if kind == "manifest" else run.mib_per_s
                        figures.setdefault((kind, label), []).append(value)
            for kind, unit in (("manifest", "req/s"), ("blob", "MiB/s")):
                base = statistics.median(figures[(kind, clients_of[0][0])])
                for label, _, _ in clients_of:
                    value = statistics.median(figures[(kind, label)])
                    rows.append(
                        (
                            f"warm {kind} by digest, {label}",
                            f"{value:,.0f} {unit}",
                            f"{value / base:.2f}x",
                        )
                    )
            n = args.sequential
            cached = await sequential_ms(http, secured + manifest, {**ACCEPT, **basic(owner)}, n)
            uncached_url = proxies["secured-nocache"].url + manifest
            uncached = await sequential_ms(http, uncached_url, {**ACCEPT, **basic(owner)}, n)
            open_ms = await sequential_ms(http, proxies["open"].url + manifest, ACCEPT, n)
            rows.append(("sequential manifest GET, open, anonymous", f"{open_ms:.2f} ms", "1.00x"))
            rows.append(
                (
                    "sequential, pass-through, verdict cached",
                    f"{cached:.2f} ms",
                    f"{cached / open_ms:.2f}x",
                )
            )
            rows.append(
                (
                    "sequential, pass-through, no cache (decision_ttl 0)",
                    f"{uncached:.2f} ms",
                    f"{uncached / open_ms:.2f}x",
                )
            )
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.access", description=__doc__)
    parser.add_argument("--seconds", type=float, default=5.0, help="wrk duration per round")
    parser.add_argument("--rounds", type=int, default=3, help="wrk rounds per figure (median)")
    parser.add_argument("--blob-mib", type=float, default=16.0)
    parser.add_argument("--sequential", type=int, default=200, help="requests per latency figure")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="rp-bench-access-") as tmp:
        rows = asyncio.run(measure(args, Path(tmp)))
    width = max(len(r[0]) for r in rows)
    print(f"{'measurement':<{width}}  {'value':>14}  vs baseline")
    for name, value, ratio in rows:
        print(f"{name:<{width}}  {value:>14}  {ratio}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
