"""Command line: ``registry-proxy serve``, ``registry-proxy check-config`` and the operator
commands ``registry-proxy cache ...`` (``proxy.operator``).

The override flags are not listed here: one per ``proxy.settings.OPTIONS``, declared with
the settings they override.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Sequence

import yaml

from proxy import operator
from proxy.settings import OPTIONS, ConfigError, Settings, load_settings

EXIT_CONFIG_ERROR = 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="registry-proxy", description="Caching pull-through proxy for OCI registries"
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_text in (
        ("serve", "run the proxy"),
        ("check-config", "validate the configuration and print the effective settings"),
    ):
        _add_options(sub.add_parser(name, help=help_text))
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
    return serve(settings)


def serve(settings: Settings) -> int:
    from proxy import logs
    from proxy.app import run

    logs.configure(settings.log_level, settings.log_format)
    asyncio.run(run(settings))
    return 0


if __name__ == "__main__":
    sys.exit(main())
