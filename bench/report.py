"""The results table: rows of measurements per target, ratios, targets met or missed."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

TARGETS = ("direct", "peer", "proxy", "proxy+redis")
OURS = ("proxy", "proxy+redis")

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


def ratio(a: float | None, b: float | None) -> str:
    if a is None or b is None:
        return "-"
    if b == 0:
        return "-" if a == 0 else "inf"
    return f"{a / b:.2f}x"


def verdict(row: Row) -> str:
    if not row.verdicts:
        return ""
    marks = []
    for name in OURS:
        v = row.verdicts.get(name)
        marks.append("n/a" if v is None else "met" if v else "MISSED")
    return " / ".join(marks)


def markdown_table(rows: list[Row]) -> str:
    header = [
        "scenario",
        *TARGETS,
        "proxy/direct",
        "proxy/peer",
        "+redis/direct",
        "+redis/peer",
        "target (proxy)",
        "met (proxy / +redis)",
    ]
    lines = [
        "| " + " | ".join(header) + " |",
        "| " + " | ".join(["---"] + ["---:"] * (len(header) - 3) + ["---", "---"]) + " |",
    ]
    for row in rows:
        v = row.values
        cells = [
            row.label,
            *(row.cell(name) for name in TARGETS),
            ratio(v.get("proxy"), v.get("direct")),
            ratio(v.get("proxy"), v.get("peer")),
            ratio(v.get("proxy+redis"), v.get("direct")),
            ratio(v.get("proxy+redis"), v.get("peer")),
            row.target,
            verdict(row),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def simple_table(header: list[str], rows: list[list[str]]) -> str:
    lines = [
        "| " + " | ".join(header) + " |",
        "| " + " | ".join(["---"] + ["---:"] * (len(header) - 1)) + " |",
    ]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)
