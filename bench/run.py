"""Benchmark entry point: ``python -m bench [--quick]`` from the repository root.

Starts a real upstream (docker-registry, access log on), two peers (docker-registry in
proxy mode; nginx caching as rpardini's mirror does), this proxy twice (embedded
defaults; and with Redis), optionally a third time with ``workers: N`` (--workers) and
the baseline checkout's proxy (--baseline), pushes fresh random images into the
upstream, runs every scenario against every target interleaved (the order rotates from
one scenario or repetition to the next), and prints one table with ratios and issue 15's
targets; a full run also writes bench/RESULTS.md.
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

from bench import pagecache
from bench.config import HELP, SCENARIOS, Config
from bench.environment import environment, git_rev, git_rev_of, load_average, proxy_tree
from bench.nginx import nginx_version
from bench.report import (
    Report,
    goals_table,
    markdown_table,
    micro_table,
    render,
    targets_summary,
)
from bench.scenarios import Scenarios
from bench.servers import Stack, baseline_binary
from bench.targets import goals, rows

BENCH_DIR = Path(__file__).resolve().parent
SWITCHES = ("profile", "recycle")
"""Config fields that are on by default, each turned off by ``--no-<name>``."""


def parse_args(argv: list[str] | None) -> tuple[Config, argparse.Namespace]:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    p.add_argument("--quick", action="store_true", help="smoke run: small blobs, short wrk")
    defaults = Config()
    for f in fields(Config):
        if f.name in SWITCHES:
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
        "--no-recycle",
        action="store_true",
        help="measure cold paths with memory as found, not right after freeing as much "
        "page cache as they need (bench/pagecache.py)",
    )
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
    p.add_argument(
        "--workers",
        type=int,
        metavar="N",
        help="add a target proxy-wN: registry-proxy with `workers: N` in its config file "
        "(skipped, with a line saying so, if the proxy refuses the key)",
    )
    p.add_argument(
        "--baseline",
        type=Path,
        metavar="DIR",
        help="add a target proxy@base: DIR/.venv/bin/registry-proxy (another checkout, "
        "e.g. of main), for before/after ratios in one run",
    )
    p.add_argument(
        "--nginx-workers",
        default="auto",
        metavar="N",
        help="nginx's worker_processes (default auto, as rpardini's: one per core)",
    )
    p.add_argument("--no-nginx", action="store_true", help="leave the nginx peer out")
    p.add_argument("--workdir", type=Path, help="scratch directory (default: a new one in /tmp)")
    p.add_argument("--keep", action="store_true", help="keep the scratch directory")
    args = p.parse_args(argv)
    config = Config.quick() if args.quick else Config()
    overrides: dict[str, object] = {
        f.name: getattr(args, f.name)
        for f in fields(Config)
        if f.name not in SWITCHES and getattr(args, f.name) is not None
    }
    for name in SWITCHES:
        if getattr(args, f"no_{name}"):
            overrides[name] = False
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
    if args.workers is not None and args.workers < 1:
        p.error("--workers expects a number of at least 1")
    if args.baseline is not None:
        args.baseline = args.baseline.resolve()
        if not baseline_binary(args.baseline).exists():
            p.error(
                f"--baseline: {baseline_binary(args.baseline)} does not exist (make the "
                "checkout's venv: python3 -m venv .venv && .venv/bin/pip install -e .)"
            )
    return replace(config, **overrides), args  # type: ignore[arg-type]


def main(argv: list[str] | None = None) -> int:
    config, args = parse_args(argv)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="rp-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    results_path = args.results
    if results_path is None and not args.quick and not args.only:
        results_path = BENCH_DIR / "RESULTS.md"
    stack = Stack(
        workdir,
        nginx_workers=None if args.no_nginx else args.nginx_workers,
        workers=args.workers,
        baseline=args.baseline,
    )
    for item in args.proxy_env:
        key, _, value = item.partition("=")
        stack.set_proxy_env(key, value)
    bench = Scenarios(config, workdir, stack)
    # before any server starts: the servers run the code checked out now
    env_info = environment()
    if not args.no_nginx:
        env_info.append(("nginx", f"{nginx_version()}, worker_processes {args.nginx_workers}"))
    if args.baseline is not None:
        env_info.append(("proxy@base", f"{args.baseline} at {git_rev_of(args.baseline)}"))
    if args.workers is not None:
        env_info.append((f"proxy-w{args.workers}", f"workers: {args.workers} (config file)"))
    load_start = load_average()
    write_start = pagecache.probe(workdir / "probe")
    reported_start = pagecache.reported_mib()
    tree = proxy_tree()
    bench.say(f"scratch directory {workdir}; load average {load_start}")
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
        load_end = load_average()
        env_info.append(
            ("load average (1, 5, 15 min)", f"{load_start} at start, {load_end} at end")
        )
        reported_end = pagecache.reported_mib()
        write_end = pagecache.probe(workdir / "probe")
        env_info.append(("new-file write cost at start", write_start.text()))
        env_info.append(("new-file write cost at end", write_end.text()))
        if reported_start is not None and reported_end is not None:
            env_info.append(
                (
                    "free memory reported to the host during the run",
                    f"{(reported_end - reported_start) / 1024:.1f} GiB (page_reporting)",
                )
            )
        table = rows(bench.results, config, bench.run_stats())
        issue = goals(bench.results, config, bench.run_stats())
        report = Report(
            config=config,
            environment=env_info,
            proxy_env=list(args.proxy_env),
            results=bench.results,
            rows=table,
            goals=issue,
            micro=bench.micro,
            profiles=bench.profiles,
            elapsed=time.monotonic() - bench.started,
        )
        targets = bench.results.targets
        print(markdown_table(table, targets))
        print()
        print(goals_table(issue, targets))
        print()
        print(micro_table(bench.micro))
        print()
        print(targets_summary(table))
        print(f"\nload average (1, 5, 15 min): {load_start} at start, {load_end} at end")
        if bench.results.notes:
            print("\nnotes:\n" + "\n".join(f"- {n}" for n in bench.results.notes))
        if results_path is not None:
            results_path.write_text(render(report))
            bench.say(f"wrote {results_path}")
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    return 0
