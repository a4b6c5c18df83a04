"""Rendering a run: the results table with ratios and verdicts, the micro-benchmark and
profile tables, the targets summary, and RESULTS.md."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from bench import micro, profile
from bench.config import Config
from bench.results import BASE, Results
from bench.targets import Goal, Row


def ratio(a: float | None, b: float | None) -> str:
    if a is None or b is None:
        return "-"
    if b == 0:
        return "-" if a == 0 else "inf"
    return f"{a / b:.2f}x"


def verdict(row: Row, ours: tuple[str, ...]) -> str:
    if not row.verdicts:
        return ""
    marks = []
    for name in ours:
        v = row.verdicts.get(name)
        marks.append("n/a" if v is None else "met" if v else "MISSED")
    return " / ".join(marks)


def ratio_columns(targets: tuple[str, ...]) -> list[tuple[str, str, str]]:
    """(header, numerator, denominator) of the ratio columns a run's targets allow."""
    cols = [("proxy/direct", "proxy", "direct"), ("proxy/peer", "proxy", "peer")]
    if "nginx" in targets:
        cols.append(("proxy/nginx", "proxy", "nginx"))
    cols.append(("+redis/direct", "proxy+redis", "direct"))
    for name in targets:
        if name.startswith("proxy-w"):
            cols.append((f"{name.removeprefix('proxy-')}/proxy", name, "proxy"))
    if BASE in targets:
        cols.append(("proxy/base", "proxy", BASE))
    return cols


def markdown_table(rows: list[Row], targets: tuple[str, ...]) -> str:
    ours = tuple(t for t in targets if t.startswith("proxy"))
    cols = ratio_columns(targets)
    header = [
        "scenario",
        *targets,
        *(h for h, _, _ in cols),
        "target (ours)",
        f"met ({' / '.join(ours)})",
    ]
    lines = [
        "| " + " | ".join(header) + " |",
        "| " + " | ".join(["---"] + ["---:"] * (len(header) - 3) + ["---", "---"]) + " |",
    ]
    for row in rows:
        v = row.values
        cells = [
            row.label,
            *(row.cell(name) for name in targets),
            *(ratio(v.get(a), v.get(b)) for _, a, b in cols),
            row.target,
            verdict(row, ours),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def goals_table(goals: list[Goal], targets: tuple[str, ...]) -> str:
    """Issue 15's targets: one line per ratio, a cell (figure and verdict) per proxy."""
    ours = tuple(t for t in targets if t.startswith("proxy"))
    header = ["issue 15 target", "target", *ours]
    lines = [
        "| " + " | ".join(header) + " |",
        "| " + " | ".join(["---", "---"] + ["---:"] * len(ours)) + " |",
    ]
    for goal in goals:
        if all(goal.cell(n) == "-" for n in ours):
            continue  # a scenario this run left out
        cells = [goal.label, goal.target, *(goal.cell(n) for n in ours)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def simple_table(header: list[str], rows: list[list[str]]) -> str:
    lines = [
        "| " + " | ".join(header) + " |",
        "| " + " | ".join(["---"] + ["---:"] * (len(header) - 1)) + " |",
    ]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def micro_table(results: list[micro.MicroResult]) -> str:
    return simple_table(
        ["descriptor stat()", "lookups", "mean µs", "p50 µs", "p99 µs", "note"],
        [
            [
                m.name,
                str(m.lookups),
                f"{m.mean_us:.1f}",
                f"{m.p50_us:.1f}",
                f"{m.p99_us:.1f}",
                m.note,
            ]
            for m in results
        ],
    )


def targets_summary(rows: list[Row]) -> str:
    lines = []
    for row in rows:
        if not row.verdicts:
            continue
        marks = ", ".join(
            f"{n}: {'n/a' if v is None else 'met' if v else 'MISSED'}"
            for n, v in row.verdicts.items()
        )
        lines.append(f"- {row.label} ({row.target}): {marks}")
    return "\n".join(lines)


def details_section(results: Results) -> str:
    lines = []
    names = {"cold": "cold pull", "warm": "warm pull", "conc": "concurrent cold pulls"}
    for key, title in names.items():
        per = results.details.get(key, {})
        for t in results.targets:
            if t in per:
                lines.append(f"- {title}, {t}: {per[t] or 'none'}")
    return "\n".join(lines)


def profiles_section(profiles: list[profile.Profile]) -> str:
    parts = []
    for prof in profiles:
        parts.append(
            f"#### {prof.label}\n\nLoad while profiled: {prof.load}. {prof.samples} samples "
            f"at {profile.RATE} Hz over all threads, {prof.idle} of them idle (executor "
            f"workers waiting for work, the loop in epoll); shares below are of the "
            f"{prof.busy} busy ones. Stacks: `{prof.path.name}`.\n\nSelf (leaf frame):\n\n"
            + simple_table(
                ["frame", "% samples"],
                [[f"`{k}`", f"{p:.1f}"] for k, p in prof.top(prof.self_time)],
            )
            + "\n\nInclusive:\n\n"
            + simple_table(
                ["function", "% samples"],
                [[f"`{k}`", f"{p:.1f}"] for k, p in prof.top(prof.inclusive, 20)],
            )
        )
    return "\n\n".join(parts)


@dataclass
class Report:
    """Everything RESULTS.md says about one run."""

    config: Config
    environment: list[tuple[str, str]]
    proxy_env: list[str]
    results: Results
    rows: list[Row]
    goals: list[Goal]
    micro: list[micro.MicroResult]
    profiles: list[profile.Profile]
    elapsed: float


def render(report: Report) -> str:
    """RESULTS.md for a run."""
    rows = report.rows
    elapsed = report.elapsed
    env = "\n".join(f"- {k}: {v}" for k, v in report.environment)
    config = ", ".join(f"{k}={v}" for k, v in asdict(report.config).items())
    if report.proxy_env:
        config += "; proxy environment: " + " ".join(report.proxy_env)
    notes = "\n".join(f"- {n}" for n in report.results.notes) or "- none"
    text = f"""# registry-proxy benchmark results

Produced by `python -m bench` ({elapsed:.0f} s). Targets: `direct` is the upstream itself
(docker-registry, the limit), `peer` is docker-registry in proxy mode, `nginx` is nginx
caching as rpardini's docker-registry-proxy does (bench/nginx.py), `proxy` is
`registry-proxy serve` with embedded defaults, `proxy+redis` the same with `--redis`,
`proxy-w<N>` the same with `workers: N`, `proxy@base` the baseline checkout's proxy.
Medians over repetitions; ratios are ours divided by theirs.

{env}
- config: {config}

## Results

{markdown_table(rows, report.results.targets)}

Targets:

{targets_summary(rows)}

## Issue 15 targets (ratios in this run)

{goals_table(report.goals, report.results.targets)}

## Descriptor look-up cost (in-process, one at a time)

{micro_table(report.micro)}

## Upstream requests seen in the upstream's access log

{details_section(report.results)}

## Notes

{notes}
"""
    if report.profiles:
        text += f"""
## Profiles of the proxy (py-spy, after the measurements)

`proxy` (embedded defaults) profiled with `py-spy record` while wrk loads the manifest and
warm blob endpoints, and during one cold GET of a fresh blob (with `--idle`, so threads
waiting on I/O are sampled too). Collapsed stacks are in `bench/profiles/`.

{profiles_section(report.profiles)}
"""
    return text
