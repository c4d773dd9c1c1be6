"""The run's stop request, fed by SIGINT, SIGTERM and the --timeout deadline.

`StopGuard` is the one place that installs signal handlers; everything below it (terraform
supervision, polls) only reads the request through scripts.base.stop.StopRequest.
"""

from __future__ import annotations

import contextlib
import signal
import time
from collections.abc import Iterator
from typing import Any

from scripts.base import stop as base_stop
from scripts.base.console import log
from scripts.base.stop import StopRun
from scripts.run.settings import minutes


class StopGuard:
    """Turns SIGINT, SIGTERM and the --timeout deadline into a stop request, and decides where it acts.

    Nothing is cut in half: a signal only records the request, which the next step boundary turns into
    StopRun; a running terraform or synth child (in its own session: the signal never reaches it) is asked
    to stop once by scripts.run.child.supervise; only the collect step (inside `interruptible()`) is
    abandoned at once. The teardown runs inside scripts.base.signals.deferred, so no signal can stop it.
    """

    def __init__(self, deadline_seconds: float | None):
        self.deadline_seconds = deadline_seconds
        self.reason: str | None = None
        self.is_deadline = False
        self._interruptible = False
        self.finishing = False  # the teardown and the report: a late signal changes nothing any more
        self._started = time.monotonic()
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "StopGuard":
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._on_signal)
        if hasattr(signal, "setitimer"):
            self._previous[signal.SIGALRM] = signal.signal(signal.SIGALRM, self._on_deadline)
        if self.deadline_seconds is not None:
            self.arm(self.deadline_seconds)
        return self

    def arm(self, deadline_seconds: float) -> None:
        """Sets the deadline, counted from the start of the run (the default one needs the config)."""
        self.deadline_seconds = deadline_seconds
        remaining = self.remaining_seconds() or 0.0
        if hasattr(signal, "setitimer"):
            signal.setitimer(signal.ITIMER_REAL, max(remaining, 0.001))

    def __exit__(self, *exc: object) -> None:
        if hasattr(signal, "setitimer"):
            signal.setitimer(signal.ITIMER_REAL, 0)
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _on_signal(self, signum: int, frame: Any) -> None:
        self._request(signal.Signals(signum).name, deadline=False)

    def _on_deadline(self, signum: int, frame: Any) -> None:
        self._request(f"--timeout of {minutes(self.deadline_seconds or 0)} reached", deadline=True)

    def _request(self, reason: str, deadline: bool) -> None:
        if self.finishing:
            log.warning("%s: the run is already finishing (teardown, report); it ends as soon as they are done", reason)
            return
        if self.reason is not None:
            log.warning("%s received: already stopping (%s); the teardown will still run - only SIGKILL "
                        "stops it, and then `pipenv run repair-run --cleanup` finishes it", reason, self.reason)
            return
        self.reason, self.is_deadline = reason, deadline
        log.warning("%s: stopping; the repair stack will be torn down", reason)
        if self._interruptible:
            self._interruptible = False
            raise StopRun(reason)

    def check(self) -> None:
        """StopRun when a stop was requested: called at every step boundary."""
        base_stop.check(self)

    @contextlib.contextmanager
    def interruptible(self) -> Iterator[None]:
        """The block a signal abandons at once (by raising StopRun from the handler)."""
        self.check()
        self._interruptible = True
        try:
            yield
        finally:
            self._interruptible = False

    def remaining_seconds(self) -> float | None:
        if self.deadline_seconds is None:
            return None
        return max(0.0, self.deadline_seconds - (time.monotonic() - self._started))
