"""Command-line plumbing shared by every verb: logs on stderr, JSON on stdout, exit codes, progress.

Pipelines read stdout as JSON and branch on the exit code; people read stderr. Keeping the two
apart is what lets `pipenv run collect | jq .blobs` work while progress is still shown.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

from scripts.base.errors import CrashcartError, ExitCode, printable

log = logging.getLogger("crashcart")


def setup_logging(verbose: bool = False) -> None:
    level = logging.DEBUG if verbose or os.environ.get("CRASHCART_DEBUG") else logging.INFO
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    root = logging.getLogger("crashcart")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False
    # The Azure SDK logs every HTTP request at INFO, headers included: keep it quiet unless debugging.
    logging.getLogger("azure").setLevel(logging.DEBUG if level == logging.DEBUG else logging.WARNING)


def emit_json(result: Any) -> None:
    """The machine-readable result of a verb: one JSON document on stdout."""
    sys.stdout.write(json.dumps(result, indent=2, sort_keys=True, default=str) + "\n")
    sys.stdout.flush()


def report_error(err: CrashcartError) -> None:
    """The two lines an operator reads: what happened, what to do next (control characters escaped)."""
    sys.stderr.write(f"error: {printable(err.message)}\n")
    if err.hint:
        sys.stderr.write(f"next:  {printable(err.hint)}\n")


def run_verb(func: Callable[[], int | None]) -> int:
    """Runs a verb body and turns expected failures into a message and an exit code, never a traceback."""
    try:
        code = func()
        return int(code) if code is not None else int(ExitCode.OK)
    except CrashcartError as err:
        report_error(err)
        return int(err.exit_code)
    except KeyboardInterrupt:
        sys.stderr.write("error: interrupted\n")
        return int(ExitCode.INTERRUPTED)
    except Exception:  # a bug: show the traceback, it is what a maintainer needs
        log.exception("crashcart hit an unexpected error; please report it with this log")
        return int(ExitCode.BUG)


def is_interactive() -> bool:
    return sys.stderr.isatty() and not os.environ.get("CI")


class Progress:
    """A progress bar on a terminal, plain lines in CI (one line per step, or every `every` seconds).

    `update(done)` may be called as often as the caller likes; in plain mode it throttles itself.
    """

    def __init__(self, description: str, total: float | None = None, unit: str = "", every: float = 10.0):
        self.description = description
        self.total = total
        self.unit = unit
        self.every = every
        self._last_line = 0.0
        self._rich = None
        self._task = None

    def __enter__(self) -> "Progress":
        if is_interactive():
            from rich.progress import BarColumn, Progress as RichProgress, TextColumn, TimeElapsedColumn

            self._rich = RichProgress(
                TextColumn("{task.description}"), BarColumn(), TextColumn("{task.fields[status]}"),
                TimeElapsedColumn(), transient=False,
                console=__import__("rich.console", fromlist=["Console"]).Console(stderr=True),
            )
            self._rich.__enter__()
            self._task = self._rich.add_task(self.description, total=self.total, status="")
        else:
            log.info("%s ...", self.description)
        return self

    def update(self, done: float | None = None, status: str = "") -> None:
        if self._rich is not None:
            kwargs: dict[str, Any] = {"status": status}
            if done is not None:
                kwargs["completed"] = done
            self._rich.update(self._task, **kwargs)
            return
        now = time.monotonic()
        if now - self._last_line < self.every:
            return
        self._last_line = now
        parts = [self.description]
        if done is not None and self.total:
            parts.append(f"{done:.0f}/{self.total:.0f}{self.unit} ({100 * done / self.total:.0f}%)")
        if status:
            parts.append(status)
        log.info("  %s", " - ".join(parts))

    def __exit__(self, *exc: object) -> None:
        if self._rich is not None:
            self._rich.__exit__(*exc)
        elif exc[0] is None:
            log.info("%s: done", self.description)


class NullProgress:
    """Progress that shows nothing (progress=False, e.g. when an orchestrator draws its own)."""

    def __enter__(self) -> "NullProgress":
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def update(self, done: float | None = None, status: str = "") -> None:
        pass


@contextlib.contextmanager
def environment(values: dict[str, str]) -> Iterator[None]:
    """Sets environment variables for the duration of the block (for child processes and SDK clients
    that read them), then puts back exactly what was there."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@contextlib.contextmanager
def step(name: str) -> Iterator[None]:
    """A named step in the human log, with its duration."""
    start = time.monotonic()
    log.info("==> %s", name)
    yield
    log.info("    %s done in %.1fs", name, time.monotonic() - start)
