"""Command line: ``registry-proxy serve``, ``registry-proxy check-config``,
``registry-proxy --version`` and the operator commands ``registry-proxy cache ...`` and
``registry-proxy prewarm`` (``proxy.operator``).

The override flags are not listed here: one per ``proxy.settings.OPTIONS``, declared with
the settings they override.

What stops ``serve`` from starting (the cache directory cannot be created, an address
is in use or not allowed) ends in one line on stderr and exit status 1, never a
traceback (``--log-level debug`` logs it). A bad configuration exits 2 naming the key.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

import yaml

from proxy import __version__, operator
from proxy.settings import OPTIONS, ConfigError, Settings, load_settings

if TYPE_CHECKING:
    from proxy.workers import WorkerRole

EXIT_START_ERROR = 1
EXIT_CONFIG_ERROR = 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="registry-proxy", description="Caching pull-through proxy for OCI registries"
    )
    parser.add_argument("--version", action="version", version=f"registry-proxy {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_text in (
        ("serve", "run the proxy"),
        ("check-config", "validate the configuration and print the effective settings"),
    ):
        _add_options(cmd := sub.add_parser(name, help=help_text))
        if name == "serve":
            # Set by the supervisor on the workers it starts (proxy.workers); not for people.
            cmd.add_argument("--worker-index", type=int, help=argparse.SUPPRESS)
            cmd.add_argument("--worker-ready-fd", type=int, help=argparse.SUPPRESS)
    operator.add_commands(sub, _add_options)
    operator.add_prewarm(sub, _add_options)
    return parser


def _add_options(cmd: argparse.ArgumentParser) -> None:
    cmd.add_argument("--config", metavar="FILE", help="YAML configuration file")
    for option in OPTIONS:
        cmd.add_argument(
            option.flag, dest=option.name, metavar=option.key.metavar, help=option.key.help
        )


def _settings(args: argparse.Namespace) -> Settings:
    overrides = {option.name: getattr(args, option.name) for option in OPTIONS}
    return load_settings(args.config, overrides=overrides)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parser().parse_args(argv)
    try:
        settings = _settings(args)
    except ConfigError as exc:
        print(f"registry-proxy: configuration error: {exc}", file=sys.stderr)
        return EXIT_CONFIG_ERROR
    if args.command == "check-config":
        print(yaml.safe_dump(settings.to_dict(), sort_keys=False), end="")
        return 0
    if args.command == "cache":
        return asyncio.run(operator.run(args, settings))
    if args.command == "prewarm":
        return asyncio.run(operator.prewarm(args, settings))
    worker = None
    if args.worker_index is not None:
        from proxy.workers import WorkerRole

        worker = WorkerRole(args.worker_index, settings.workers, args.worker_ready_fd)
    return serve(settings, argv=argv, worker=worker)


def serve(settings: Settings, *, argv: Sequence[str] = (), worker: WorkerRole | None = None) -> int:
    """Run the proxy: one process (``workers: 1``), the supervisor of ``workers``
    processes started with ``argv`` (``proxy.workers``), or one of those (``worker``)."""
    from proxy import logs
    from proxy.app import run

    logs.configure(
        settings.log_level, settings.log_format, worker=None if worker is None else worker.index
    )
    try:
        settings.cache_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        return _start_error(f"cannot create cache directory {settings.cache_dir}", exc)
    try:
        if worker is None and settings.workers > 1:
            from proxy.workers import supervise

            return supervise(settings, argv)
        asyncio.run(run(settings, worker=worker))
    except OSError as exc:  # only start-up gets here: serving handles its own errors
        return _start_error("cannot start", exc)
    return 0


def _start_error(what: str, exc: OSError) -> int:
    logging.getLogger("proxy").debug("%s", what, exc_info=exc)
    reason = exc.strerror or str(exc)
    if exc.filename is not None and str(exc.filename) not in reason:
        reason = f"{reason}: {exc.filename}"
    print(f"registry-proxy: {what}: {reason}", file=sys.stderr)
    return EXIT_START_ERROR


if __name__ == "__main__":
    sys.exit(main())
