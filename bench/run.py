"""Benchmark entry point: ``python -m bench [--quick]`` from the repository root.

Starts a real upstream (docker-registry, access log on), the peer (docker-registry in
proxy mode), this proxy twice (embedded defaults; and with Redis), pushes fresh random
images into the upstream, runs every scenario against direct / peer / proxy /
proxy+redis interleaved (the order rotates from one scenario or repetition to the next),
and prints one table with ratios; a full run also writes bench/RESULTS.md.
"""

# This module only orchestrates (it is also ``--help``'s description, so the layout is
# told here): options are in bench.config, servers in bench.servers, scenarios in
# bench.scenarios, the pass/fail table in bench.targets, rendering in bench.report and
# environment probes in bench.environment.

from __future__ import annotations

import argparse
import asyncio
import shutil
import tempfile
import time
from dataclasses import fields, replace
from pathlib import Path

from bench.config import HELP, SCENARIOS, Config
from bench.environment import environment, git_rev, proxy_tree
from bench.report import Report, markdown_table, micro_table, render, targets_summary
from bench.scenarios import Scenarios
from bench.servers import Stack
from bench.targets import rows

BENCH_DIR = Path(__file__).resolve().parent


def parse_args(argv: list[str] | None) -> tuple[Config, argparse.Namespace]:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    p.add_argument("--quick", action="store_true", help="smoke run: small blobs, short wrk")
    defaults = Config()
    for f in fields(Config):
        if f.name == "profile":
            continue
        default = getattr(defaults, f.name)
        p.add_argument(
            "--" + f.name.replace("_", "-"),
            type=type(default),
            metavar="N",
            help=f"{HELP.get(f.name, f.name)} (default {default}; --quick: "
            f"{getattr(Config.quick(), f.name)})",
        )
    p.add_argument("--no-profile", action="store_true", help="skip the py-spy profiles")
    p.add_argument(
        "--only",
        metavar="LIST",
        help=f"comma-separated scenarios to run, of: {','.join(SCENARIOS)} (default: all)",
    )
    p.add_argument(
        "--proxy-env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra environment for both proxy processes (experiments, e.g. MALLOC_ARENA_MAX=2)",
    )
    p.add_argument(
        "--results",
        type=Path,
        help="write the report here (default: bench/RESULTS.md for a full run, none for --quick)",
    )
    p.add_argument("--workdir", type=Path, help="scratch directory (default: a new one in /tmp)")
    p.add_argument("--keep", action="store_true", help="keep the scratch directory")
    args = p.parse_args(argv)
    config = Config.quick() if args.quick else Config()
    overrides: dict[str, object] = {
        f.name: getattr(args, f.name)
        for f in fields(Config)
        if f.name != "profile" and getattr(args, f.name) is not None
    }
    if args.no_profile:
        overrides["profile"] = False
    only = frozenset(SCENARIOS)
    if args.only:
        only = frozenset(x.strip() for x in args.only.split(",") if x.strip())
        unknown = only - set(SCENARIOS)
        if unknown:
            p.error(f"unknown scenario(s): {', '.join(sorted(unknown))}")
    args.only_set = only
    for item in args.proxy_env:
        if "=" not in item:
            p.error(f"--proxy-env expects KEY=VALUE, got {item!r}")
    return replace(config, **overrides), args  # type: ignore[arg-type]


def main(argv: list[str] | None = None) -> int:
    config, args = parse_args(argv)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="rp-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    results_path = args.results
    if results_path is None and not args.quick and not args.only:
        results_path = BENCH_DIR / "RESULTS.md"
    stack = Stack(workdir)
    for item in args.proxy_env:
        key, _, value = item.partition("=")
        stack.set_proxy_env(key, value)
    bench = Scenarios(config, workdir, stack)
    # before any server starts: the servers run the code checked out now
    env_info = environment()
    tree = proxy_tree()
    bench.say(f"scratch directory {workdir}")
    try:
        with stack.running() as pids:
            bench.watch(pids)
            asyncio.run(bench.run(args.only_set))
            if bench.profiles and results_path is not None:
                dest = results_path.parent / "profiles"
                dest.mkdir(exist_ok=True)
                for prof in bench.profiles:
                    shutil.copy(prof.path, dest / prof.path.name)
                    prof.path = dest / prof.path.name
        if proxy_tree() != tree:
            bench.results.notes.append(
                f"proxy/ changed during the run (HEAD now {git_rev()}); the servers ran the "
                "code checked out at the start"
            )
        table = rows(bench.results, config, bench.run_stats())
        report = Report(
            config=config,
            environment=env_info,
            proxy_env=list(args.proxy_env),
            results=bench.results,
            rows=table,
            micro=bench.micro,
            profiles=bench.profiles,
            elapsed=time.monotonic() - bench.started,
        )
        print(markdown_table(table))
        print()
        print(micro_table(bench.micro))
        print()
        print(targets_summary(table))
        if bench.results.notes:
            print("\nnotes:\n" + "\n".join(f"- {n}" for n in bench.results.notes))
        if results_path is not None:
            results_path.write_text(render(report))
            bench.say(f"wrote {results_path}")
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    return 0
