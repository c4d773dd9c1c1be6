"""Cleanups no signal can cut short: SIGINT and SIGTERM wait while an undo action runs.

A second Ctrl-C must never skip a revoke, a release or a destroy. `deferred("revoking access")` wraps a
cleanup: a SIGINT or SIGTERM received inside it is logged ("finishing ... first") and recorded instead
of acting; when the block ends, the previous handlers are back and the first signal received is
delivered again, so it does what it would have done (KeyboardInterrupt, the run's stop request, the
default action of SIGTERM) - after the cleanup. Blocks nest: only the outermost one delivers. Outside
the main thread (where Python delivers no signal anyway) it only runs the block.

    with contextlib.ExitStack() as undo:
        undo.callback(signals.deferring("revoking the snapshot's access", revoke))
        ...

Only SIGKILL stops a deferred block.
"""

from __future__ import annotations

import contextlib
import functools
import signal
import threading
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

from scripts.base.console import log

DEFERRED_SIGNALS = (signal.SIGINT, signal.SIGTERM)

T = TypeVar("T")

_depth = 0
_received: list[int] = []
_what: list[str] = []


def _on_signal(signum: int, frame: Any) -> None:
    name = signal.Signals(signum).name
    if not _received:
        _received.append(signum)
    log.warning("%s received: finishing %s first (only SIGKILL stops it)", name, _what[-1] if _what else "a cleanup")


@contextlib.contextmanager
def deferred(what: str) -> Iterator[None]:
    """Runs the block with SIGINT/SIGTERM held back; delivers the first one held afterwards."""
    global _depth
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous: dict[int, Any] = {}
    if _depth == 0:
        _received.clear()
        for sig in DEFERRED_SIGNALS:
            previous[sig] = signal.signal(sig, _on_signal)
    _depth += 1
    _what.append(what)
    try:
        yield
    finally:
        _what.pop()
        _depth -= 1
        if _depth == 0:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            if _received:
                signum = _received.pop()
                _received.clear()
                signal.raise_signal(signum)  # now handled as it would have been without the cleanup


def deferring(what: str, action: Callable[..., T]) -> Callable[..., T]:
    """`action` wrapped in `deferred(what)`: for ExitStack.callback / push."""

    @functools.wraps(action)
    def wrapped(*args: Any, **kwargs: Any) -> T:
        with deferred(what):
            return action(*args, **kwargs)

    return wrapped
