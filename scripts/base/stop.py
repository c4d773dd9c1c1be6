"""A run's stop request, as every waiting loop sees it.

The orchestrator (scripts.run) turns SIGINT, SIGTERM and its --timeout deadline into a stop request;
loops deep below it (polls, terraform supervision) only ask whether one was made and why. Nothing
here installs a signal handler: that is the orchestrator's business.
"""

from __future__ import annotations

from typing import Protocol


class StopRun(BaseException):
    """Raised where a stop request takes effect. A BaseException, so that no `except Exception` in a
    library swallows it."""


class StopRequest(Protocol):
    """Has someone asked the run to stop, and why (reason None: no)."""

    @property
    def reason(self) -> str | None: ...

    @property
    def is_deadline(self) -> bool: ...


def check(stop: StopRequest | None) -> None:
    """Raises StopRun when a stop was requested."""
    if stop is not None and stop.reason is not None:
        raise StopRun(stop.reason)
