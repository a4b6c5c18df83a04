"""What the proxy knows of an upstream's health and pull budget.

Breaker: every request that gets no usable answer (refused, timed out, 5xx) counts as a
failure; any other answer is a success and resets the count. After ``failures``
consecutive failures the breaker opens for ``cooldown`` seconds: requests are refused at
once with ``UpstreamUnavailable`` (503 + Retry-After) instead of waiting on a dead
upstream, so whatever the cache can answer is answered without delay. After the
cool-down one request probes (half-open); its outcome closes or re-opens the breaker.

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
from proxy.errors import TooManyRequests, UpstreamUnavailable

log = logging.getLogger(__name__)

UP, DOWN, PROBING = "up", "down", "probing"
_STATE_VALUES = {UP: 0, DOWN: 1, PROBING: 2}
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
        self._threshold = failures
        self._cooldown = cooldown
        self._floor = budget_floor
        self._clock = clock
        self._failures = 0
        self._opened_at = 0.0
        self.state = UP
        self.last_error: str | None = None
        self.budget: Budget | None = None
        metrics.UPSTREAM_UP.labels(name).set(1)

    # Breaker -----------------------------------------------------------------------

    def retry_after(self) -> int:
        return max(1, int(self._cooldown - (self._clock() - self._opened_at) + 0.999))

    def check(self) -> None:
        """Raise UpstreamUnavailable at once while the breaker is open."""
        if self.state == UP:
            return
        if self._clock() - self._opened_at >= self._cooldown:
            # This caller probes; the others are refused until it reports. A probe that
            # never reports (cancelled, failed before a response) is replaced by another
            # after one more cool-down.
            self._opened_at = self._clock()
            self._set(PROBING)
            return
        raise UpstreamUnavailable(
            f"upstream {self.name} is down ({self.last_error or 'unreachable'}); "
            "not asking it until it has had a rest",
            headers={"Retry-After": str(self.retry_after())},
        )

    def success(self) -> None:
        self._failures = 0
        if self.state != UP:
            log.info("upstream %s is reachable again", self.name)
            self._set(UP)

    def failure(self, reason: str) -> None:
        self._failures += 1
        self.last_error = reason
        if self.state == PROBING or self._failures >= self._threshold:
            if self.state != DOWN:
                log.warning(
                    "upstream %s marked down after %d failures (%s); cooling down %.0fs",
                    self.name,
                    self._failures,
                    reason,
                    self._cooldown,
                )
            self._opened_at = self._clock()
            self._set(DOWN)

    def _set(self, state: str) -> None:
        self.state = state
        metrics.UPSTREAM_UP.labels(self.name).set(1 if state == UP else 0)

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
