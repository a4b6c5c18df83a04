"""``registry-proxy cache stats|ls|verify|evict|gc``: the operator's commands.

On the configuration's cache directory when no proxy runs on it (the CLI then holds the
directory's lock exclusively, so a proxy cannot start under it); through the running
proxy's admin API otherwise (``--url``, or the configured ``listen`` address on
loopback), authenticated as a user of ``access.admins`` (``--user``, the password from
``REGISTRY_PROXY_ADMIN_PASSWORD`` or ``--password-file``). Either way the same code
(``proxy.pullthrough.operations``) does the work.

Exit status: 0, 1 when ``verify`` found corrupt files (as fsck does) or the command
failed, 2 for a configuration error.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp

from proxy.settings import Settings

PASSWORD_ENV = "REGISTRY_PROXY_ADMIN_PASSWORD"
EXIT_FAILED = 1
REQUEST_TIMEOUT = 3600.0  # verify of a large cache takes a while

# command -> (HTTP method, admin path)
ENDPOINTS = {
    "stats": ("GET", "/admin/cache/stats"),
    "ls": ("GET", "/admin/cache/images"),
    "evict": ("POST", "/admin/cache/evict"),
    "gc": ("POST", "/admin/cache/gc"),
    "verify": ("POST", "/admin/cache/verify"),
}


def add_commands(sub: Any, add_options: Callable[[argparse.ArgumentParser], None]) -> None:
    """``cache`` and its sub-commands, each with the configuration options."""
    cache = sub.add_parser("cache", help="inspect and manage the cache (see README)")
    commands = cache.add_subparsers(dest="cache_command", required=True)
    specs: dict[str, str] = {
        "stats": "size, blobs, images, hit ratio, top repositories",
        "ls": "images with size, last pull and pin state",
        "verify": "re-hash every blob; quarantine corrupt ones (exit 1 if any)",
        "evict": "remove the images matching a pattern",
        "gc": "remove orphaned temp files, unreferenced blobs and old images",
    }
    for name, help_text in specs.items():
        cmd = commands.add_parser(name, help=help_text)
        add_options(cmd)
        cmd.add_argument("--url", help="a running proxy's URL (default: detected)")
        cmd.add_argument("--user", help="admin user for a running proxy")
        cmd.add_argument(
            "--password-file", metavar="FILE", help=f"its password (or ${PASSWORD_ENV})"
        )
        cmd.add_argument("--json", action="store_true", help="print JSON")
        if name == "ls":
            cmd.add_argument("pattern", nargs="?", help="<upstream>/<repository>:<tag> glob")
        elif name == "evict":
            cmd.add_argument("pattern", help="<upstream>/<repository>:<tag> glob")
        elif name == "verify":
            cmd.add_argument("--repair", action="store_true", help="re-fetch what was corrupt")
        elif name == "gc":
            cmd.add_argument("--dry-run", action="store_true", help="report, remove nothing")


def _basic(user: str | None, password: str) -> dict[str, str]:
    """The Authorization header for ``user`` (none without one)."""
    if not user:
        return {}
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    return {"Authorization": f"Basic {token}"}


def _params(args: argparse.Namespace) -> dict[str, str]:
    params = {}
    if getattr(args, "pattern", None):
        params["pattern"] = args.pattern
    if getattr(args, "repair", False):
        params["repair"] = "1"
    if getattr(args, "dry_run", False):
        params["dry_run"] = "1"
    return params


async def run(args: argparse.Namespace, settings: Settings) -> int:
    from proxy.pullthrough.operations import CacheOperations
    from proxy.pullthrough.registry import DirectoryBusy, PullThroughRegistry

    command: str = args.cache_command
    detected = ""
    if args.url is None:
        registry = PullThroughRegistry(settings)
        try:
            await registry.open(exclusive=True)
        except DirectoryBusy:
            await registry.close()
            detected = f"{settings.cache_dir} is in use by a running proxy; asked it: "
        else:
            try:
                result = await _local(CacheOperations(registry), command, args)
            finally:
                await registry.close()
            return _report(command, result, args.json)
    url = args.url or _local_url(settings)
    password = os.environ.get(PASSWORD_ENV, "")
    if args.password_file:
        password = Path(args.password_file).read_text().strip()  # noqa: ASYNC240 (CLI)
    try:
        result = await _remote(url, command, args, password)
    except (aiohttp.ClientError, OSError) as exc:
        print(f"registry-proxy: {detected}{url}: {exc} (give its --url)", file=sys.stderr)
        return EXIT_FAILED
    except RemoteError as exc:
        print(f"registry-proxy: {detected}{exc}", file=sys.stderr)
        return EXIT_FAILED
    return _report(command, result, args.json)


async def _local(ops: Any, command: str, args: argparse.Namespace) -> Any:
    if command == "stats":
        return await ops.stats()
    if command == "ls":
        return {"images": await ops.images(args.pattern)}
    if command == "evict":
        return await ops.evict(args.pattern)
    if command == "gc":
        return await ops.gc(dry_run=args.dry_run)
    return await ops.verify(repair=args.repair)


def _local_url(settings: Settings) -> str:
    host = settings.listen_host
    if host in ("0.0.0.0", "", "::"):
        host = "127.0.0.1"
    elif ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{settings.listen_port}"


class RemoteError(Exception):
    pass


async def _remote(url: str, command: str, args: argparse.Namespace, password: str) -> Any:
    method, path = ENDPOINTS[command]
    timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT, sock_connect=10)
    async with (
        aiohttp.ClientSession(timeout=timeout) as session,
        session.request(
            method,
            url.rstrip("/") + path,
            params=_params(args),
            headers=_basic(args.user, password),
        ) as response,
    ):
        body = await response.read()
        if response.status == 401:
            raise RemoteError(
                f"{url}: admin credentials needed: --user (an access.admins user) and"
                f" ${PASSWORD_ENV} or --password-file"
            )
        if response.status != 200:
            raise RemoteError(f"{url}{path}: {response.status} {body[:300]!r}")
        return json.loads(body)


def _size(n: int | None) -> str:
    if n is None:
        return "unbounded"
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.1f} {unit}" if unit != "B" else f"{n} B"
        value /= 1024
    return f"{n} B"


def _report(command: str, result: Any, as_json: bool) -> int:
    status = EXIT_FAILED if command == "verify" and result["corrupt"] else 0
    if as_json:
        print(json.dumps(result, indent=2))
        return status
    if command == "stats":
        ratio = result["hit_ratio"]
        print(f"directory     {result['dir']}")
        print(f"used          {_size(result['used_bytes'])} of {_size(result['max_size'])}")
        print(f"blobs         {result['blobs']} ({result['loose_blobs']} in no image)")
        print(f"images        {result['images']}")
        print(f"pinned        {_size(result['pinned_bytes'])}")
        print(f"hit ratio     {'n/a' if ratio is None else f'{ratio:.1%}'}")
        for item in result["top_repositories"]:
            print(f"  {_size(item['size']):>12}  {item['repository']}")
    elif command == "ls":
        for image in result["images"]:
            pin = "pinned" if image["pinned"] else ""
            print(
                f"{_size(image['size']):>12}  {image['last_pull'] or '-':25}  {pin:6}  "
                f"{', '.join(image['names'])}"
            )
    elif command == "evict":
        print(f"removed {len(result['removed'])} images, freed {_size(result['freed_bytes'])}")
        for name in result["removed"]:
            print(f"  {name}")
        for name in result["skipped_pinned"]:
            print(f"  kept (pinned) {name}")
    elif command == "gc":
        verb = "would remove" if result["dry_run"] else "removed"
        print(
            f"{verb} {result['temp_files']} temp files, {result['loose_blobs']} unreferenced"
            f" blobs, {len(result['images'])} old images: {_size(result['freed_bytes'])}"
        )
        for name in result["images"]:
            print(f"  {name}")
    else:
        print(f"checked {result['checked']} blobs: {len(result['corrupt'])} corrupt")
        for digest in result["corrupt"]:
            fixed = " (re-fetched)" if digest in result["repaired"] else ""
            print(f"  quarantined {digest}{fixed} -> {result['quarantine']}")
    return status


# --- registry-proxy prewarm -------------------------------------------------------------


def add_prewarm(sub: Any, add_options: Callable[[argparse.ArgumentParser], None]) -> None:
    cmd = sub.add_parser(
        "prewarm", help="pull images into a running proxy's cache (or a stopped one's directory)"
    )
    add_options(cmd)
    cmd.add_argument(
        "refs", nargs="*", metavar="REF", help="[<upstream>/]<repository>[:tag|@digest]"
    )
    cmd.add_argument("--file", metavar="LIST", help="more references, one a line (# comments)")
    which = cmd.add_mutually_exclusive_group()
    which.add_argument("--platform", action="append", metavar="OS/ARCH", help="repeatable")
    which.add_argument("--all-platforms", action="store_true")
    cmd.add_argument("--url", help="a running proxy's URL (default: detected)")
    cmd.add_argument("--user", help="admin user for a running proxy")
    cmd.add_argument("--password-file", metavar="FILE", help=f"its password (or ${PASSWORD_ENV})")
    cmd.add_argument("--no-progress", action="store_true", help="one line per image instead")


def host_platform() -> str:
    machine = os.uname().machine
    arch = {"x86_64": "amd64", "aarch64": "arm64", "armv7l": "arm"}.get(machine, machine)
    return f"linux/{arch}"


class ProgressView:
    """A bar per image and an overall one (rich), or plain lines without a terminal."""

    def __init__(self, refs: list[str], *, bars: bool) -> None:
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            Progress,
            TextColumn,
            TimeRemainingColumn,
            TransferSpeedColumn,
        )

        self._bars = bars
        self._progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            DownloadColumn(),
            TransferSpeedColumn(),
            TimeRemainingColumn(),
            disable=not bars,
        )
        self._overall = self._progress.add_task("[bold]all images", total=len(refs))
        self._tasks: dict[str, Any] = {}

    def __enter__(self) -> ProgressView:
        self._progress.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._progress.__exit__(None, None, None)

    def event(self, event: dict[str, Any]) -> None:
        name = str(event.get("name", ""))
        kind = event.get("event")
        if kind == "image":
            self._tasks[name] = self._progress.add_task(name, total=event["total"] or None)
        elif kind == "progress" and name in self._tasks:
            self._progress.update(self._tasks[name], completed=event["done"])
        elif kind == "done":
            if name in self._tasks:
                task = self._tasks[name]
                total = self._progress.tasks[task].total
                self._progress.update(task, completed=total or event.get("bytes", 0))
            self._progress.advance(self._overall)
            line = f"{name}: {'failed: ' + event['error'] if event.get('error') else 'ok'}"
            if self._bars:
                self._progress.console.print(line)
            else:
                print(line, flush=True)


async def prewarm(args: argparse.Namespace, settings: Settings) -> int:
    from proxy.pullthrough.registry import DirectoryBusy, PullThroughRegistry

    refs = list(args.refs)
    if args.file:
        text = Path(args.file).read_text()  # noqa: ASYNC240 (CLI, before any work)
        refs += [line.split("#")[0].strip() for line in text.splitlines()]
    refs = [ref for ref in refs if ref]
    if not refs:
        print("registry-proxy prewarm: no references given", file=sys.stderr)
        return EXIT_FAILED
    platforms = None if args.all_platforms else (args.platform or [host_platform()])
    bars = sys.stderr.isatty() and not args.no_progress
    failed: list[str] = []
    with ProgressView(refs, bars=bars) as view:
        if args.url is None:
            registry = PullThroughRegistry(settings)
            try:
                await registry.open(exclusive=True)
            except DirectoryBusy:
                await registry.close()
            else:
                try:
                    failed = await _prewarm_local(registry, settings, refs, platforms, view)
                finally:
                    await registry.close()
                return _prewarm_report(refs, failed)
        url = args.url or _local_url(settings)
        password = os.environ.get(PASSWORD_ENV, "")
        if args.password_file:
            password = Path(args.password_file).read_text().strip()  # noqa: ASYNC240 (CLI)
        try:
            failed = await _prewarm_remote(url, args, password, refs, platforms, view)
        except (aiohttp.ClientError, OSError, RemoteError) as exc:
            print(f"registry-proxy prewarm: {url}: {exc}", file=sys.stderr)
            return EXIT_FAILED
    return _prewarm_report(refs, failed)


async def _prewarm_local(
    registry: Any,
    settings: Settings,
    refs: list[str],
    platforms: list[str] | None,
    view: ProgressView,
) -> list[str]:
    from proxy.pullthrough.warm import Warmer, warm_refs
    from proxy.routing import Router

    wanted = None if platforms is None else set(platforms)
    return await warm_refs(Warmer(registry), Router(settings.upstreams), refs, wanted, view.event)


async def _prewarm_remote(
    url: str,
    args: argparse.Namespace,
    password: str,
    refs: list[str],
    platforms: list[str] | None,
    view: ProgressView,
) -> list[str]:
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=10)
    async with (
        aiohttp.ClientSession(timeout=timeout) as session,
        session.post(
            url.rstrip("/") + "/admin/cache/prewarm",
            json={"refs": refs, "platforms": platforms},
            headers=_basic(args.user, password),
        ) as response,
    ):
        if response.status == 401:
            raise RemoteError(
                f"admin credentials needed: --user and ${PASSWORD_ENV} or --password-file"
            )
        if response.status != 200:
            raise RemoteError(f"{response.status} {(await response.read())[:300]!r}")
        summary: dict[str, Any] | None = None
        async for line in response.content:
            if not line.strip():
                continue
            event = json.loads(line)
            if event.get("event") == "summary":
                summary = event
            else:
                view.event(event)
    if summary is None:
        raise RemoteError("the proxy ended the prewarm before its summary")
    return [str(ref) for ref in summary["failed"]]


def _prewarm_report(refs: list[str], failed: list[str]) -> int:
    if failed:
        print(f"prewarm: {len(failed)} of {len(refs)} failed:", file=sys.stderr)
        for ref in failed:
            print(f"  {ref}", file=sys.stderr)
        return EXIT_FAILED
    print(f"prewarm: {len(refs)} images cached")
    return 0
