"""Raw measurements of a run, by scenario key then target name."""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field

# The four targets every scenario runs against, in table order; the last two are ours.
TARGETS = ("direct", "peer", "proxy", "proxy+redis")
OURS = ("proxy", "proxy+redis")


@dataclass
class Results:
    """Raw measurements, by scenario then target."""

    values: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    details: dict[str, dict[str, str]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def add(self, key: str, target: str, value: float) -> None:
        self.values.setdefault(key, {}).setdefault(target, []).append(value)

    def detail(self, key: str, target: str, text: str) -> None:
        self.details.setdefault(key, {})[target] = text

    def median(self, key: str) -> dict[str, float | None]:
        per = self.values.get(key, {})
        return {t: statistics.median(per[t]) if per.get(t) else None for t in TARGETS}
