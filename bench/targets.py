"""The pass/fail tables.

- :func:`rows`: every figure of a run as a :class:`Row` (one value per target), with the
  target our proxies must meet and the check that decides it (``met``, ``MISSED``, or
  ``n/a`` when a figure is missing).
- :func:`goals`: issue 15's speed targets as ratios measured in the run, one
  :class:`Goal` per ratio, with a cell per proxy target (``proxy``, ``proxy+redis``,
  ``proxy-w<N>``, ``proxy@base``), so a run with ``--baseline`` shows before and after.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from bench.config import Config
from bench.procstats import ProcessStats
from bench.results import BASE, Results

MiB = 1 << 20

Values = dict[str, float | None]
Check = Callable[[str, Values], bool | None]

# Issue 15's targets (ratios in one run).
COLD_VS_DIRECT = 1.25
COLD_VS_PEER = 0.55
COLD_VS_NGINX = 0.9
BIG_COLD_SHARE = 85.0  # % of direct's MiB/s
CPU_VS_BASE = 0.5
CONC_VS_PEER = 0.7
CONC_VS_NGINX = 1.0
BLOB_VS_NGINX = 1.0
MDIGEST_RPS = 7500.0  # one worker
MDIGEST_VS_PEER = 9.0
WORKERS_SCALING = 1.6  # workers: 2 over one worker, manifest by digest
RSS_PER_WORKER = 150.0  # MiB, 1 GiB blob


@dataclass
class Row:
    label: str
    values: Values
    fmt: str = "{:.2f}"
    target: str = ""
    check: Check | None = None
    verdicts: dict[str, bool | None] = field(default_factory=dict)

    def evaluate(self, ours: tuple[str, ...]) -> None:
        if self.check is None:
            return
        for name in ours:
            if self.values.get(name) is None:
                self.verdicts[name] = None
            else:
                self.verdicts[name] = self.check(name, self.values)

    def cell(self, name: str) -> str:
        value = self.values.get(name)
        return "-" if value is None else self.fmt.format(value)


def rows(r: Results, c: Config, run_stats: Mapping[str, ProcessStats]) -> list[Row]:
    """The table: one row per figure, with its target and a check for our targets.
    ``run_stats`` is each target's serving process (tree) over the whole run."""
    m = r.median
    img = f"{c.layers}x{c.layer_mib:g} MiB"
    big = f"{c.big_mib:g} MiB"
    small = f"{c.layer_mib:g} MiB"
    conn = c.connections
    has_nginx = "nginx" in r.targets

    rss_run: Values = {n: s.peak_rss / MiB for n, s in run_stats.items()}
    rss_run_each: Values = {n: s.peak_rss_each / MiB for n, s in run_stats.items()}
    cpu_run: Values = {n: s.cpu for n, s in run_stats.items()}
    gib = c.big_mib / 1024
    cpu_per_gib: Values = {n: None if v is None else v / gib for n, v in m("big_cold_cpu").items()}

    def cold_target(n: str, v: Values) -> bool | None:
        ok = _all(
            _le(v[n], v["direct"], COLD_VS_DIRECT),
            _le(v[n], v["peer"], COLD_VS_PEER),
            _le(v[n], v.get("nginx"), COLD_VS_NGINX) if has_nginx else True,
        )
        return ok and not _sum(r, "cold_failed")[n]

    def conc_target(n: str, v: Values) -> bool | None:
        ok = _all(
            _le(v[n], v["peer"], CONC_VS_PEER),
            _le(v[n], v.get("nginx"), CONC_VS_NGINX) if has_nginx else True,
        )
        return ok and not _sum(r, "conc_failed")[n]

    nginx_part = ", <= {:g}x nginx"
    rows = [
        Row(
            f"cold pull {img}, skopeo: wall s",
            m("cold_wall"),
            target=f"<= {COLD_VS_DIRECT:g}x direct, <= {COLD_VS_PEER:g}x peer"
            + (nginx_part.format(COLD_VS_NGINX) if has_nginx else ""),
            check=cold_target,
        ),
        Row("cold pull: CPU s of the server (process tree)", m("cold_cpu")),
        Row("cold pull: CPU s of the client (skopeo)", m("cold_client_cpu")),
        Row("cold pull: CPU s of the upstream", m("cold_upstream_cpu")),
        Row("cold pull: cores busy (client + upstream + server CPU / wall)", m("cold_cores_busy")),
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
            target=f"<= {CONC_VS_PEER:g}x peer"
            + (nginx_part.format(CONC_VS_NGINX) if has_nginx else "")
            + ", no pull failed",
            check=conc_target,
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
        Row(
            f"{c.concurrent} concurrent: upstream GETs per blob (max)",
            _max(r, "conc_blob_gets_max"),
            fmt="{:.0f}",
            target="exactly 1",
            check=lambda n, v: v[n] == 1 and _min(r, "conc_blob_gets_min")[n] == 1,
        ),
        Row(f"{c.concurrent} concurrent: CPU s of the server", m("conc_cpu")),
        Row(f"{c.concurrent} concurrent: peak RSS MiB", m("conc_rss"), fmt="{:.0f}"),
        Row(
            f"warm {small} blob GET, wrk -c{conn}: MiB/s",
            m("blob_mibs"),
            fmt="{:.0f}",
            target=">= 0.9x direct, >= peer" + (", >= nginx" if has_nginx else ""),
            check=lambda n, v: _all(
                _ge(v[n], v["direct"], 0.9),
                _ge(v[n], v["peer"], 1.0),
                _ge(v[n], v.get("nginx"), BLOB_VS_NGINX) if has_nginx else True,
            ),
        ),
        Row("warm blob GET: p99 ms", m("blob_p99")),
        Row(
            f"warm manifest by digest, wrk -c{conn}: req/s",
            m("mdigest_rps"),
            fmt="{:.0f}",
            target=f">= {MDIGEST_RPS:,.0f} (one worker), >= {MDIGEST_VS_PEER:g}x peer",
            check=lambda n, v: _all(
                _ge(v[n], MDIGEST_RPS, 1.0) if not _is_pool(n) else True,
                _ge(v[n], v["peer"], MDIGEST_VS_PEER),
            ),
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
        Row(
            f"{big} blob cold GET: MiB/s",
            m("big_cold_mibs"),
            fmt="{:.0f}",
            target=f">= {BIG_COLD_SHARE:g} % of direct",
            check=lambda n, v: _ge(v[n], v["direct"], BIG_COLD_SHARE / 100),
        ),
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
        Row(
            f"peak RSS MiB of one process, {big} blob cold",
            m("big_cold_rss_each"),
            fmt="{:.0f}",
            target=f"< {RSS_PER_WORKER:g} per worker",
            check=lambda n, v: _lt(v[n], RSS_PER_WORKER),
        ),
        Row(
            f"peak RSS MiB of one process, {big} blob warm",
            m("big_warm_rss_each"),
            fmt="{:.0f}",
            target=f"< {RSS_PER_WORKER:g} per worker",
            check=lambda n, v: _lt(v[n], RSS_PER_WORKER),
        ),
        Row(f"CPU s serving {big} blob cold", m("big_cold_cpu")),
        Row(
            "CPU s per GiB cold",
            cpu_per_gib,
            target=f"<= {CPU_VS_BASE:g}x proxy@base" if BASE in r.targets else "reported",
            check=(
                (lambda n, v: None if n == BASE else _le(v[n], v.get(BASE), CPU_VS_BASE))
                if BASE in r.targets
                else None
            ),
        ),
        Row(
            "CPU s per GiB cold: user space only (not the kernel's copies and page cache)",
            {n: None if v is None else v / gib for n, v in m("big_cold_cpu_user").items()},
        ),
        Row(f"CPU s serving {big} blob warm", m("big_warm_cpu")),
        Row(
            "peak RSS MiB over the run (all processes)",
            rss_run,
            fmt="{:.0f}",
            target="<= 150 per worker",
            check=lambda n, v: _le(v[n], 150.0 * _workers(n), 1.0),
        ),
        Row("peak RSS MiB over the run, largest process", rss_run_each, fmt="{:.0f}"),
        Row("CPU s over the run", cpu_run, fmt="{:.1f}"),
    ]
    for row in rows:
        row.evaluate(r.ours)
    return rows


# ------------------------------------------------------------------------------ goals


@dataclass
class Goal:
    """One of issue 15's targets as a figure per proxy target (a ratio, mostly)."""

    label: str
    target: str
    values: Values
    fmt: str
    passes: Callable[[float], bool] | None
    applies: Callable[[str], bool] = lambda name: True
    verdicts: dict[str, bool | None] = field(default_factory=dict)

    def evaluate(self, ours: tuple[str, ...]) -> None:
        for name in ours:
            value = self.values.get(name)
            if not self.applies(name) or self.passes is None:
                continue
            self.verdicts[name] = None if value is None else self.passes(value)

    def cell(self, name: str) -> str:
        value = self.values.get(name)
        if value is None or not self.applies(name):
            return "-"
        text = self.fmt.format(value)
        if name not in self.verdicts:
            return text
        v = self.verdicts[name]
        return f"{text} {'n/a' if v is None else 'met' if v else 'MISSED'}"


def goals(r: Results, c: Config, run_stats: Mapping[str, ProcessStats]) -> list[Goal]:
    """Issue 15's targets, each as measured for every proxy target of the run."""
    m = r.median
    ours = r.ours
    img = f"{c.layers}x{c.layer_mib:g} MiB"
    big = f"{c.big_mib:g} MiB"
    has = set(r.targets)
    pool = next((n for n in ours if _is_pool(n)), None)

    def ratio(key: str, ref: str) -> Values:
        vals = m(key)
        return {n: _div(vals.get(n), vals.get(ref)) for n in ours}

    out: list[Goal] = [
        Goal(
            f"cold pull {img}: wall / direct",
            f"<= {COLD_VS_DIRECT:g}x",
            ratio("cold_wall", "direct"),
            "{:.2f}x",
            lambda x: x <= COLD_VS_DIRECT,
        ),
        Goal(
            "cold pull: wall / peer (Distribution)",
            f"<= {COLD_VS_PEER:g}x",
            ratio("cold_wall", "peer"),
            "{:.2f}x",
            lambda x: x <= COLD_VS_PEER,
        ),
    ]
    if "nginx" in has:
        out.append(
            Goal(
                "cold pull: wall / nginx",
                f"<= {COLD_VS_NGINX:g}x",
                ratio("cold_wall", "nginx"),
                "{:.2f}x",
                lambda x: x <= COLD_VS_NGINX,
            )
        )
    share = ratio("big_cold_mibs", "direct")
    out.append(
        Goal(
            f"cold {big} blob: MiB/s, % of direct",
            f">= {BIG_COLD_SHARE:g} %",
            {n: None if v is None else v * 100 for n, v in share.items()},
            "{:.0f} %",
            lambda x: x >= BIG_COLD_SHARE,
        )
    )
    gib = c.big_mib / 1024
    cpu = {n: None if v is None else v / gib for n, v in m("big_cold_cpu").items()}
    out.append(
        Goal(
            f"cold {big} blob: CPU s per GiB (the proxy's process tree)",
            "reported",
            {n: cpu.get(n) for n in ours},
            "{:.2f}",
            None,
        )
    )
    if BASE in has:
        out.append(
            Goal(
                "cold blob: CPU s per GiB / proxy@base",
                f"<= {CPU_VS_BASE:g}x",
                {n: _div(cpu.get(n), cpu.get(BASE)) for n in ours},
                "{:.2f}x",
                lambda x: x <= CPU_VS_BASE,
                applies=lambda n: n != BASE,
            )
        )
    gets = _max(r, "conc_blob_gets_max")
    out.append(
        Goal(
            f"{c.concurrent} concurrent cold pulls: upstream GETs per blob (max)",
            "exactly 1",
            {n: gets.get(n) for n in ours},
            "{:.0f}",
            lambda x: x == 1,
        )
    )
    out.append(
        Goal(
            f"{c.concurrent} concurrent cold pulls: wall / peer",
            f"<= {CONC_VS_PEER:g}x",
            ratio("conc_wall", "peer"),
            "{:.2f}x",
            lambda x: x <= CONC_VS_PEER,
        )
    )
    if "nginx" in has:
        out += [
            Goal(
                f"{c.concurrent} concurrent cold pulls: wall / nginx",
                f"<= {CONC_VS_NGINX:g}x",
                ratio("conc_wall", "nginx"),
                "{:.2f}x",
                lambda x: x <= CONC_VS_NGINX,
            ),
            Goal(
                f"warm {c.layer_mib:g} MiB blob: MiB/s / nginx",
                f">= {BLOB_VS_NGINX:g}x",
                ratio("blob_mibs", "nginx"),
                "{:.2f}x",
                lambda x: x >= BLOB_VS_NGINX,
            ),
        ]
    mdigest = m("mdigest_rps")
    out += [
        Goal(
            "warm manifest by digest: req/s, one worker",
            f">= {MDIGEST_RPS:,.0f}",
            {n: mdigest.get(n) for n in ours},
            "{:,.0f}",
            lambda x: x >= MDIGEST_RPS,
            applies=lambda n: not _is_pool(n),
        ),
        Goal(
            "warm manifest by digest: req/s / peer",
            f">= {MDIGEST_VS_PEER:g}x",
            ratio("mdigest_rps", "peer"),
            "{:.1f}x",
            lambda x: x >= MDIGEST_VS_PEER,
        ),
    ]
    if "nginx" in has:
        out.append(
            Goal(
                "warm manifest by digest: req/s / nginx",
                "reported",
                ratio("mdigest_rps", "nginx"),
                "{:.2f}x",
                None,
            )
        )
    if pool is not None:
        out.append(
            Goal(
                f"warm manifest by digest: req/s, {pool} / proxy",
                f">= {WORKERS_SCALING:g}x",
                {pool: _div(mdigest.get(pool), mdigest.get("proxy"))},
                "{:.2f}x",
                lambda x: x >= WORKERS_SCALING,
                applies=lambda n: n == pool,
            )
        )
    for state in ("cold", "warm"):
        each = m(f"big_{state}_rss_each")
        out.append(
            Goal(
                f"{big} blob {state}: peak RSS MiB of the largest process",
                f"< {RSS_PER_WORKER:g} per worker",
                {n: each.get(n) for n in ours},
                "{:.0f}",
                lambda x: x < RSS_PER_WORKER,
            )
        )
    if BASE in has:
        for key, label, fmt in (
            ("cold_wall", "cold pull wall", "{:.2f}x"),
            ("cold_cpu", "cold pull CPU s", "{:.2f}x"),
            ("conc_wall", "concurrent cold pulls wall", "{:.2f}x"),
            ("conc_cpu", "concurrent cold pulls CPU s", "{:.2f}x"),
            ("blob_mibs", "warm blob MiB/s", "{:.2f}x"),
            ("mdigest_rps", "warm manifest by digest req/s", "{:.2f}x"),
            ("big_cold_mibs", f"cold {big} blob MiB/s", "{:.2f}x"),
        ):
            out.append(
                Goal(
                    f"{label} / proxy@base",
                    "before/after",
                    ratio(key, BASE),
                    fmt,
                    None,
                    applies=lambda n: n != BASE,
                )
            )
    for goal in out:
        goal.evaluate(ours)
    return out


# ---------------------------------------------------------------------------- helpers


def _is_pool(name: str) -> bool:
    """``proxy-w<N>``: the target with several workers."""
    return name.startswith("proxy-w")


def _workers(name: str) -> int:
    if _is_pool(name):
        try:
            return max(1, int(name.removeprefix("proxy-w")))
        except ValueError:
            return 1
    return 1


def _div(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return a / b


def _all(*parts: bool | None) -> bool | None:
    if any(p is None for p in parts):
        return None
    return all(parts)


def _le(a: float | None, b: float | None, factor: float) -> bool | None:
    if a is None or b is None:
        return None
    return a <= b * factor


def _lt(a: float | None, b: float) -> bool | None:
    return None if a is None else a < b


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
    for t in r.targets:
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
