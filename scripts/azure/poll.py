"""Waiting for Azure: the one poll loop of the kit.

Everything that waits (a VM agent to report Ready, a run command to finish, a serial log to show a
bugcheck, a role assignment to be honoured) is a `probe` called until it returns a value, with a
deadline, a growing interval with jitter (so a fleet of runners does not poll in lockstep), and the
run's stop request checked between calls. What a timeout means is the caller's to say.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from typing import TypeVar

from scripts.base.errors import CrashcartError, ExitCode
from scripts.base.stop import StopRequest, check

T = TypeVar("T")


def poll(probe: Callable[[], T | None], *, timeout_s: float, interval_s: float = 10.0,
         max_interval_s: float | None = None, backoff: float = 1.0, jitter: float = 0.1,
         stop: StopRequest | None = None, on_timeout: Callable[[], BaseException] | None = None,
         sleep: Callable[[float], None] = time.sleep, clock: Callable[[], float] = time.monotonic) -> T:
    """Calls `probe()` until it returns something other than None and returns that.

    After `timeout_s` (counted from the first call; the probe always runs at least once) raises
    `on_timeout()`, by default a TIMED_OUT CrashcartError. Between calls it sleeps `interval_s`, growing
    by `backoff` up to `max_interval_s`, each sleep shortened or lengthened by up to `jitter` of itself
    and never past the deadline. A stop request raises StopRun before each call.
    """
    deadline = clock() + max(0.0, timeout_s)
    interval = max(0.0, interval_s)
    ceiling = max_interval_s if max_interval_s is not None else interval
    while True:
        check(stop)
        value = probe()
        if value is not None:
            return value
        now = clock()
        if now >= deadline:
            raise on_timeout() if on_timeout else CrashcartError(
                f"gave up waiting after {timeout_s:.0f}s", "re-run with a longer timeout", ExitCode.TIMED_OUT)
        pause = interval * (1 + random.uniform(-jitter, jitter)) if jitter else interval
        sleep(max(0.0, min(pause, deadline - now)))
        interval = min(ceiling, interval * backoff) if backoff > 1 else interval
