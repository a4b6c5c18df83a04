"""Command line: ``registry-proxy serve`` and ``registry-proxy check-config``."""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Sequence

import yaml

from proxy.settings import ConfigError, Settings, load_settings

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
        cmd = sub.add_parser(name, help=help_text)
        cmd.add_argument("--config", metavar="FILE", help="YAML configuration file")
        cmd.add_argument("--listen", metavar="HOST:PORT", help="address to listen on")
        cmd.add_argument("--upstream", metavar="URL", help="URL of the default upstream")
        cmd.add_argument("--cache-dir", metavar="DIR", help="local cache directory")
        cmd.add_argument("--redis", metavar="URL", help="Redis URL for the shared cache")
        cmd.add_argument("--max-size", metavar="SIZE", help="evict beyond this size (20GiB)")
        cmd.add_argument("--tag-ttl", metavar="DURATION", help="tag TTL for every upstream")
        cmd.add_argument("--log-level", metavar="LEVEL", help="debug, info, warning, error")
        cmd.add_argument("--log-format", metavar="FORMAT", help="text (default) or json")
        cmd.add_argument(
            "--metrics-listen", metavar="HOST:PORT", help="also serve /metrics on this address"
        )
    return parser


def _settings(args: argparse.Namespace) -> Settings:
    overrides = {
        "listen": args.listen,
        "upstream": args.upstream,
        "cache_dir": args.cache_dir,
        "redis": args.redis,
        "max_size": args.max_size,
        "tag_ttl": args.tag_ttl,
        "log_level": args.log_level,
        "log_format": args.log_format,
        "metrics_listen": args.metrics_listen,
    }
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
    return serve(settings)


def serve(settings: Settings) -> int:
    from proxy import logs
    from proxy.app import run

    logs.configure(settings.log_level, settings.log_format)
    asyncio.run(run(settings))
    return 0


if __name__ == "__main__":
    sys.exit(main())
