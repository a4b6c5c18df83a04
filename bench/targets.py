"""The pass/fail table: every figure of a run as a :class:`Row`, with the target our two
proxies must meet and the check that decides it (``met``, ``MISSED``, or ``n/a`` when a
figure is missing)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from bench.config import Config
from bench.procstats import ProcessStats
from bench.results import OURS, TARGETS, Results

MiB = 1 << 20

Values = dict[str, float | None]
Check = Callable[[str, Values], bool | None]


@dataclass
class Row:
    label: str
    values: Values
    fmt: str = "{:.2f}"
    target: str = ""
    check: Check | None = None
    verdicts: dict[str, bool | None] = field(default_factory=dict)

    def evaluate(self) -> None:
        if self.check is None:
            return
        for name in OURS:
            if self.values.get(name) is None:
                self.verdicts[name] = None
            else:
                self.verdicts[name] = self.check(name, self.values)

    def cell(self, name: str) -> str:
        value = self.values.get(name)
        return "-" if value is None else self.fmt.format(value)


def rows(r: Results, c: Config, run_stats: Mapping[str, ProcessStats]) -> list[Row]:
    """The table: one row per figure, with its target and a check for our two targets.
    ``run_stats`` is each target's serving process over the whole run."""
    m = r.median
    img = f"{c.layers}x{c.layer_mib:g} MiB"
    big = f"{c.big_mib:g} MiB"
    small = f"{c.layer_mib:g} MiB"
    conn = c.connections

    def procs(attr: str) -> dict[str, float | None]:
        out: dict[str, float | None] = {}
        for name, stats in run_stats.items():
            out[name] = stats.peak_rss / MiB if attr == "rss" else stats.cpu
        return out

    rss_run = procs("rss")
    cpu_run = procs("cpu")
    rows = [
        Row(
            f"cold pull {img}, skopeo: wall s",
            m("cold_wall"),
            target="<= 1.3x direct",
            check=lambda n, v: _le(v[n], v["direct"], 1.3) and not _sum(r, "cold_failed")[n],
        ),
        Row("cold pull: upstream requests", m("cold_requests"), fmt="{:.0f}"),
        Row(
            "cold pull: upstream bytes / image size",
            m("cold_bytes"),
            target="1.00x",
            check=lambda n, v: _le(v[n], 1.0, 1.01),
        ),
        Row(
            "cold pull: upstream GETs per blob (max)",
            _max(r, "cold_blob_gets_max"),
            fmt="{:.0f}",
            target="each blob once",
            check=lambda n, v: v[n] == 1 and _min(r, "cold_blob_gets_min")[n] == 1,
        ),
        Row("warm pull: wall s", m("warm_wall")),
        Row(
            "warm pull: upstream requests",
            _max(r, "warm_requests"),
            fmt="{:.0f}",
            target="0 (tag within TTL)",
            check=lambda n, v: v[n] == 0,
        ),
        Row(
            f"{c.concurrent} concurrent cold pulls: wall s",
            m("conc_wall"),
            target="<= peer, no pull failed",
            check=lambda n, v: _le(v[n], v["peer"], 1.0) and not _sum(r, "conc_failed")[n],
        ),
        Row(
            f"{c.concurrent} concurrent cold pulls: failed pulls",
            _sum(r, "conc_failed"),
            fmt="{:.0f}",
            target="0",
            check=lambda n, v: v[n] == 0,
        ),
        Row(
            f"{c.concurrent} concurrent: upstream bytes / image size",
            m("conc_bytes"),
            target="1.00x",
            check=lambda n, v: _le(v[n], 1.0, 1.01),
        ),
        Row(f"{c.concurrent} concurrent: peak RSS MiB", m("conc_rss"), fmt="{:.0f}"),
        Row(
            f"warm {small} blob GET, wrk -c{conn}: MiB/s",
            m("blob_mibs"),
            fmt="{:.0f}",
            target=">= 0.9x direct, >= peer",
            check=lambda n, v: _ge(v[n], v["direct"], 0.9) and _ge(v[n], v["peer"], 1.0),
        ),
        Row("warm blob GET: p99 ms", m("blob_p99")),
        Row(
            f"warm manifest by digest, wrk -c{conn}: req/s",
            m("mdigest_rps"),
            fmt="{:.0f}",
            target=">= 3x peer",
            check=lambda n, v: _ge(v[n], v["peer"], 3.0),
        ),
        Row("manifest by digest: p50 ms", m("mdigest_p50")),
        Row(
            "manifest by digest: p99 ms",
            m("mdigest_p99"),
            target="<= peer",
            check=lambda n, v: _le(v[n], v["peer"], 1.0),
        ),
        Row(
            f"warm manifest by tag, wrk -c{conn}: req/s",
            m("mtag_rps"),
            fmt="{:.0f}",
            target=">= 5x peer",
            check=lambda n, v: _ge(v[n], v["peer"], 5.0),
        ),
        Row("manifest by tag: p50 ms", m("mtag_p50")),
        Row("manifest by tag: p99 ms", m("mtag_p99")),
        Row(
            "manifest by tag: upstream requests",
            _sum(r, "mtag_upstream"),
            fmt="{:.0f}",
            target="0",
            check=lambda n, v: v[n] == 0,
        ),
        Row(f"{small} blob cold GET: wall s", m("small_cold_wall")),
        Row(f"{big} blob cold GET: wall s", m("big_cold_wall")),
        Row(f"{big} blob cold GET: MiB/s", m("big_cold_mibs"), fmt="{:.0f}"),
        Row(f"{big} blob cold GET: upstream bytes / blob", m("big_cold_upbytes")),
        Row(f"{big} blob warm GET: MiB/s", m("big_warm_mibs"), fmt="{:.0f}"),
        Row(f"peak RSS MiB, {small} blob cold", m("small_cold_rss"), fmt="{:.0f}"),
        Row(
            f"peak RSS MiB, {big} blob cold",
            m("big_cold_rss"),
            fmt="{:.0f}",
            target=f"<= 150, flat vs {small}",
            check=lambda n, v: _flat(v[n], m("small_cold_rss")[n]),
        ),
        Row(f"peak RSS MiB, {small} blob warm", m("small_warm_rss"), fmt="{:.0f}"),
        Row(
            f"peak RSS MiB, {big} blob warm",
            m("big_warm_rss"),
            fmt="{:.0f}",
            target=f"<= 150, flat vs {small}",
            check=lambda n, v: _flat(v[n], m("small_warm_rss")[n]),
        ),
        Row(f"CPU s serving {big} blob cold", m("big_cold_cpu")),
        Row(f"CPU s serving {big} blob warm", m("big_warm_cpu")),
        Row(
            "peak RSS MiB over the run",
            rss_run,
            fmt="{:.0f}",
            target="<= 150",
            check=lambda n, v: _le(v[n], 150.0, 1.0),
        ),
        Row("CPU s over the run", cpu_run, fmt="{:.1f}"),
    ]
    for row in rows:
        row.evaluate()
    return rows


def _le(a: float | None, b: float | None, factor: float) -> bool | None:
    if a is None or b is None:
        return None
    return a <= b * factor


def _ge(a: float | None, b: float | None, factor: float) -> bool | None:
    if a is None or b is None:
        return None
    return a >= b * factor


def _flat(big: float | None, small: float | None) -> bool | None:
    """Peak RSS within 150 MiB and no more than 16 MiB above the small blob's."""
    if big is None or small is None:
        return None
    return big <= 150 and big - small <= 16


def _agg(r: Results, key: str, fn: str) -> dict[str, float | None]:
    per = r.values.get(key, {})
    out: dict[str, float | None] = {}
    for t in TARGETS:
        vals = per.get(t)
        out[t] = (
            None
            if not vals
            else max(vals)
            if fn == "max"
            else min(vals)
            if fn == "min"
            else sum(vals)
        )
    return out


def _max(r: Results, key: str) -> dict[str, float | None]:
    return _agg(r, key, "max")


def _min(r: Results, key: str) -> dict[str, float | None]:
    return _agg(r, key, "min")


def _sum(r: Results, key: str) -> dict[str, float | None]:
    return _agg(r, key, "sum")
