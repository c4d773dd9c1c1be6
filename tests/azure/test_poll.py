"""scripts.azure.poll: the one wait loop (deadline, backoff with jitter, the run's stop request)."""

from __future__ import annotations

import pytest

from scripts.azure.poll import poll
from scripts.base.errors import CrashcartError, ExitCode
from scripts.base.stop import StopRun


class Clock:
    """Time that passes only when the loop sleeps."""

    def __init__(self):
        self.now = 0.0
        self.sleeps: list[float] = []

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds

    def __call__(self) -> float:
        return self.now


def test_returns_the_first_value_and_sleeps_between_calls():
    clock = Clock()
    answers = iter([None, None, "ready"])
    assert poll(lambda: next(answers), timeout_s=60, interval_s=5, jitter=0, sleep=clock.sleep, clock=clock) == "ready"
    assert clock.sleeps == [5, 5]


def test_backoff_grows_to_its_ceiling_and_never_sleeps_past_the_deadline():
    clock = Clock()
    with pytest.raises(CrashcartError) as caught:
        poll(lambda: None, timeout_s=100, interval_s=10, max_interval_s=40, backoff=2, jitter=0,
             sleep=clock.sleep, clock=clock)
    assert caught.value.exit_code == ExitCode.TIMED_OUT
    assert clock.sleeps[:4] == [10, 20, 40, 30] and clock.now == 100


def test_jitter_stays_within_its_share():
    clock = Clock()
    with pytest.raises(CrashcartError):
        poll(lambda: None, timeout_s=1000, interval_s=10, jitter=0.2, sleep=clock.sleep, clock=clock)
    assert all(8 <= s <= 12 for s in clock.sleeps[:-1]) and len(set(clock.sleeps)) > 1


def test_the_caller_says_what_a_timeout_means():
    clock = Clock()
    with pytest.raises(CrashcartError, match="agent") as caught:
        poll(lambda: None, timeout_s=1, interval_s=1, sleep=clock.sleep, clock=clock,
             on_timeout=lambda: CrashcartError("the agent never got ready", exit_code=ExitCode.AGENT_NOT_READY))
    assert caught.value.exit_code == ExitCode.AGENT_NOT_READY


def test_a_stop_request_ends_the_wait_before_the_next_call():
    class Stop:
        reason: str | None = None
        is_deadline = False

    stop, calls = Stop(), []

    def probe():
        calls.append(1)
        stop.reason = "SIGTERM"

    with pytest.raises(StopRun):
        poll(probe, timeout_s=60, interval_s=0, stop=stop)
    assert len(calls) == 1
