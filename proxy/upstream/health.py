"""What the proxy knows of an upstream's health and pull budget.

Breaker (``proxy.breaker``): every request that gets no usable answer (refused, timed
out, 5xx) counts as a failure; any other answer is a success and resets the count. After
``failures`` consecutive failures the upstream is marked down for ``cooldown`` seconds:
requests are refused at once with ``UpstreamUnavailable`` (503 + Retry-After) instead of
waiting on a dead upstream, so whatever the cache can answer is answered without delay.
Then one request probes; its outcome marks the upstream up or down again.

Budget: Docker Hub (and registries copying it) send ``ratelimit-limit: 100;w=21600`` and
``ratelimit-remaining: 76;w=21600``. The latest values are kept (and exported as gauges).
When the remaining pulls fall under the configured floor the budget is ``low`` until the
window has passed: tags are then served from cache without revalidation, and cold
manifest fetches are refused with 429 so the last pulls are kept for images the cache does
not have.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from proxy import metrics
from proxy.breaker import CLOSED, HALF_OPEN, OPEN, Breaker
from proxy.errors import TooManyRequests, UpstreamUnavailable

log = logging.getLogger(__name__)

UP, DOWN, PROBING = "up", "down", "probing"
_STATES = {CLOSED: UP, OPEN: DOWN, HALF_OPEN: PROBING}
_RATELIMIT = re.compile(r"^\s*(\d+)\s*(?:;\s*w\s*=\s*(\d+))?")
DEFAULT_WINDOW = 21600.0


@dataclass(frozen=True, slots=True)
class Budget:
    limit: int | None
    remaining: int
    window: float
    observed_at: float


def parse_ratelimit(value: str | None) -> tuple[int, float | None] | None:
    """``76;w=21600`` -> (76, 21600.0); None when absent or unreadable."""
    if not value:
        return None
    m = _RATELIMIT.match(value)
    if m is None:
        return None
    return int(m.group(1)), float(m.group(2)) if m.group(2) else None


class UpstreamHealth:
    def __init__(
        self,
        name: str,
        *,
        failures: int,
        cooldown: float,
        budget_floor: int,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.name = name
        self._floor = budget_floor
        self._clock = clock
        self._breaker = Breaker(
            failures=failures, cooldown=cooldown, clock=clock, on_change=self._changed
        )
        self.last_error: str | None = None
        self.budget: Budget | None = None
        metrics.UPSTREAM_UP.labels(name).set(1)

    # Breaker -----------------------------------------------------------------------

    @property
    def state(self) -> str:
        """up, down or probing."""
        return _STATES[self._breaker.state]

    def check(self) -> None:
        """Raise UpstreamUnavailable at once while the upstream is marked down."""
        if self._breaker.allow():
            return
        raise UpstreamUnavailable(
            f"upstream {self.name} is down ({self.last_error or 'unreachable'}); "
            "not asking it until it has had a rest",
            headers={"Retry-After": str(self._breaker.retry_after())},
        )

    def success(self) -> None:
        self._breaker.success()

    def failure(self, reason: str) -> None:
        self.last_error = reason
        self._breaker.failure()

    def _changed(self, old: str, new: str) -> None:
        metrics.UPSTREAM_UP.labels(self.name).set(1 if new == CLOSED else 0)
        if new == OPEN and old == CLOSED:
            log.warning("upstream %s marked down (%s)", self.name, self.last_error)
        elif new == CLOSED:
            log.info("upstream %s is reachable again", self.name)

    # Budget ------------------------------------------------------------------------

    def observe(self, headers: Mapping[str, str]) -> None:
        remaining = parse_ratelimit(headers.get("ratelimit-remaining"))
        if remaining is None:
            return
        limit = parse_ratelimit(headers.get("ratelimit-limit"))
        window = remaining[1] or (limit[1] if limit else None) or DEFAULT_WINDOW
        self.budget = Budget(limit[0] if limit else None, remaining[0], window, self._clock())
        metrics.UPSTREAM_RATELIMIT_REMAINING.labels(self.name).set(remaining[0])
        if limit is not None:
            metrics.UPSTREAM_RATELIMIT_LIMIT.labels(self.name).set(limit[0])

    def budget_low(self) -> bool:
        budget = self.budget
        if budget is None or self._floor <= 0 or budget.remaining >= self._floor:
            return False
        # Once the window has passed, pulls are available again.
        return self._clock() - budget.observed_at < budget.window

    def refuse_cold_pull(self) -> None:
        """Raise 429 while the budget is low: keep the last pulls for what is not cached."""
        if not self.budget_low():
            return
        assert self.budget is not None
        wait = int(self.budget.window - (self._clock() - self.budget.observed_at)) + 1
        raise TooManyRequests(
            f"upstream {self.name} has {self.budget.remaining} pulls left in its rate-limit "
            "window; keeping them for images the cache does not have",
            headers={"Retry-After": str(max(1, wait))},
        )

    def report(self) -> dict[str, object]:
        out: dict[str, object] = {"state": self.state}
        if self.last_error and self.state != UP:
            out["last_error"] = self.last_error
        if self.budget is not None:
            out["ratelimit_remaining"] = self.budget.remaining
            out["ratelimit_low"] = self.budget_low()
        return out
