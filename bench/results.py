"""Raw measurements of a run, by scenario key then target name."""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field

# The targets every run has, in table order; a run may add nginx, proxy-w<N> and
# proxy@base (see bench.servers.Stack). Ours are the ones named proxy*.
TARGETS = ("direct", "peer", "proxy", "proxy+redis")
BASE = "proxy@base"


def ours(targets: tuple[str, ...] | list[str]) -> tuple[str, ...]:
    """This project's targets among ``targets`` (the ones the table checks)."""
    return tuple(t for t in targets if t.startswith("proxy"))


@dataclass
class Results:
    """Raw measurements, by scenario then target."""

    targets: tuple[str, ...] = TARGETS
    values: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    details: dict[str, dict[str, str]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def ours(self) -> tuple[str, ...]:
        return ours(self.targets)

    def add(self, key: str, target: str, value: float) -> None:
        self.values.setdefault(key, {}).setdefault(target, []).append(value)

    def detail(self, key: str, target: str, text: str) -> None:
        self.details.setdefault(key, {})[target] = text

    def median(self, key: str) -> dict[str, float | None]:
        per = self.values.get(key, {})
        return {t: statistics.median(per[t]) if per.get(t) else None for t in self.targets}
