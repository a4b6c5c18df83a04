"""Consecutive-failure circuit breaker, shared by the Redis layer and upstream health.

Closed: calls go through; ``failures`` consecutive failures open it. Open: calls are
refused (``allow()`` is False) for ``cooldown`` seconds. Then one caller probes
(half-open) while the others are still refused; its success closes the breaker, its
failure opens it again. A probe that never reports (cancelled, or failed in a way
nobody counted) is replaced by another after one more cool-down, so the breaker can
never stay shut for good.
"""

from __future__ import annotations

import time
from collections.abc import Callable

CLOSED, OPEN, HALF_OPEN = "closed", "open", "half-open"


class Breaker:
    def __init__(
        self,
        *,
        failures: int,
        cooldown: float,
        clock: Callable[[], float] = time.monotonic,
        on_change: Callable[[str, str], None] | None = None,
    ) -> None:
        """``on_change(old_state, new_state)`` is called on every transition."""
        self._threshold = failures
        self._cooldown = cooldown
        self._clock = clock
        self._on_change = on_change
        self._failures = 0
        self._since = 0.0
        self.state = CLOSED

    def allow(self) -> bool:
        if self.state == CLOSED:
            return True
        if self._clock() - self._since >= self._cooldown:
            self._since = self._clock()
            self._set(HALF_OPEN)
            return True
        return False

    def success(self) -> None:
        self._failures = 0
        self._set(CLOSED)

    def failure(self) -> None:
        self._failures += 1
        if self.state == HALF_OPEN or self._failures >= self._threshold:
            self._since = self._clock()
            self._set(OPEN)

    def retry_after(self) -> int:
        """Whole seconds until the next probe is allowed (at least 1)."""
        return max(1, int(self._cooldown - (self._clock() - self._since) + 0.999))

    def _set(self, state: str) -> None:
        old, self.state = self.state, state
        if old != state and self._on_change is not None:
            self._on_change(old, state)
