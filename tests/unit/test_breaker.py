"""Breaker: closed -> open after ``failures`` consecutive failures, refused for
``cooldown``, then one half-open probe whose outcome closes or reopens it. Time is a clock
the test moves."""

from __future__ import annotations

import pytest

from proxy.breaker import CLOSED, HALF_OPEN, OPEN, Breaker
from tests.unit.clock import Clock

COOLDOWN = 30.0


class Transitions:
    """Records every ``on_change(old, new)`` call."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, str]] = []

    def __call__(self, old: str, new: str) -> None:
        self.seen.append((old, new))


@pytest.fixture
def clock() -> Clock:
    return Clock(5_000.0)


@pytest.fixture
def changes() -> Transitions:
    return Transitions()


@pytest.fixture
def breaker(clock: Clock, changes: Transitions) -> Breaker:
    return Breaker(failures=3, cooldown=COOLDOWN, clock=clock, on_change=changes)


def open_it(breaker: Breaker) -> None:
    for _ in range(3):
        breaker.failure()
    assert breaker.state == OPEN


def test_starts_closed_and_allows(breaker: Breaker, changes: Transitions) -> None:
    assert breaker.state == CLOSED
    assert all(breaker.allow() for _ in range(10))
    assert changes.seen == []


def test_opens_at_the_threshold_not_before(breaker: Breaker, changes: Transitions) -> None:
    breaker.failure()
    breaker.failure()
    assert breaker.state == CLOSED
    assert breaker.allow() is True

    breaker.failure()

    assert breaker.state == OPEN
    assert breaker.allow() is False
    assert changes.seen == [(CLOSED, OPEN)]


def test_failures_must_be_consecutive(breaker: Breaker) -> None:
    for _ in range(5):
        breaker.failure()
        breaker.failure()
        breaker.success()
    assert breaker.state == CLOSED
    breaker.failure()
    breaker.failure()
    assert breaker.state == CLOSED


def test_a_threshold_of_one_opens_on_the_first_failure(clock: Clock) -> None:
    breaker = Breaker(failures=1, cooldown=COOLDOWN, clock=clock)
    breaker.failure()
    assert breaker.state == OPEN
    assert breaker.allow() is False


def test_refused_for_the_whole_cooldown(breaker: Breaker, clock: Clock) -> None:
    open_it(breaker)
    clock.now += COOLDOWN - 0.001
    assert breaker.allow() is False
    assert breaker.state == OPEN
    clock.now += 0.001
    assert breaker.allow() is True
    assert breaker.state == HALF_OPEN


def test_half_open_lets_exactly_one_probe_through(
    breaker: Breaker, clock: Clock, changes: Transitions
) -> None:
    open_it(breaker)
    clock.now += COOLDOWN

    allowed = [breaker.allow() for _ in range(5)]

    assert allowed == [True, False, False, False, False]
    assert changes.seen == [(CLOSED, OPEN), (OPEN, HALF_OPEN)]


def test_probe_success_closes(breaker: Breaker, clock: Clock, changes: Transitions) -> None:
    open_it(breaker)
    clock.now += COOLDOWN
    assert breaker.allow() is True

    breaker.success()

    assert breaker.state == CLOSED
    assert all(breaker.allow() for _ in range(5))
    assert changes.seen == [(CLOSED, OPEN), (OPEN, HALF_OPEN), (HALF_OPEN, CLOSED)]
    # The count starts again from zero: it takes the full threshold to reopen.
    breaker.failure()
    breaker.failure()
    assert breaker.state == CLOSED


def test_probe_failure_reopens_at_once_for_another_cooldown(
    breaker: Breaker, clock: Clock, changes: Transitions
) -> None:
    open_it(breaker)
    clock.now += COOLDOWN
    assert breaker.allow() is True

    breaker.failure()  # one failure is enough in half-open, whatever the threshold

    assert breaker.state == OPEN
    assert changes.seen[-1] == (HALF_OPEN, OPEN)
    clock.now += COOLDOWN - 1
    assert breaker.allow() is False
    clock.now += 1
    assert breaker.allow() is True
    assert breaker.state == HALF_OPEN


def test_a_probe_that_never_reports_is_replaced_after_one_more_cooldown(
    breaker: Breaker, clock: Clock, changes: Transitions
) -> None:
    open_it(breaker)
    clock.now += COOLDOWN
    assert breaker.allow() is True  # the probe, which is then cancelled: no report

    clock.now += COOLDOWN - 1
    assert breaker.allow() is False
    clock.now += 1
    assert breaker.allow() is True  # a second probe
    assert breaker.allow() is False
    assert breaker.state == HALF_OPEN
    # Still half-open: no transition is reported for the replacement.
    assert changes.seen == [(CLOSED, OPEN), (OPEN, HALF_OPEN)]


def test_retry_after_counts_down_in_whole_seconds(breaker: Breaker, clock: Clock) -> None:
    open_it(breaker)
    assert breaker.retry_after() == 30
    clock.now += 0.5
    assert breaker.retry_after() == 30  # 29.5 s left: rounded up
    clock.now += 10
    assert breaker.retry_after() == 20
    clock.now += 19.4
    assert breaker.retry_after() == 1  # 0.1 s left
    clock.now += 5
    assert breaker.retry_after() == 1  # past the cool-down: never 0 or negative


def test_retry_after_in_half_open_runs_from_the_probe(breaker: Breaker, clock: Clock) -> None:
    open_it(breaker)
    clock.now += COOLDOWN + 100
    assert breaker.allow() is True
    clock.now += 10
    assert breaker.retry_after() == 20


def test_on_change_is_optional(clock: Clock) -> None:
    breaker = Breaker(failures=1, cooldown=COOLDOWN, clock=clock)
    breaker.failure()
    clock.now += COOLDOWN
    assert breaker.allow() is True
    breaker.success()
    assert breaker.state == CLOSED


def test_success_while_closed_reports_no_transition(breaker: Breaker, changes: Transitions) -> None:
    breaker.success()
    breaker.failure()
    breaker.success()
    assert changes.seen == []
