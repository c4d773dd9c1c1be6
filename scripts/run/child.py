"""The kit's child processes (terraform, synth): started in their own session, watched, stopped once.

A terminal's Ctrl-C goes to its foreground process group. A terraform in the kit's group would get it
directly - and a second Ctrl-C makes Terraform exit at once without saving its state, which is how a
destroy loses track of what it created. So every child starts in its own session
(`start_new_session=True`): no signal meant for the kit reaches it. The kit decides: a stop request
(SIGINT, SIGTERM, the deadline) is forwarded to the child exactly once, as one SIGINT (Terraform then
finishes the calls in flight and writes its state) or SIGTERM (synth, which has nothing to save); a
shielded child (the destroy) gets nothing and is waited for. Only SIGKILL stops the kit meanwhile, and a
child then finishes on its own.

Terraform children also run with umask 077: a state file it creates (the repair stack's holds the rescue
VM's admin password, see README "The stacks") is readable by this user only.
"""

from __future__ import annotations

import logging
import math
import re
import signal
import subprocess
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from scripts.azure.poll import poll
from scripts.base.stop import StopRequest

log = logging.getLogger("crashcart.terraform")

PRIVATE_UMASK = 0o077

_ESCAPES = re.compile(r"\x1b(\[[0-?]*[ -/]*[@-~]|\][^\x07\x1b]*(\x07|\x1b\\)?|[@-Z\\-_])")
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")
_BOX = "│╷╵╭╮╰╯─"


def clean_line(line: str) -> str:
    """A line of Terraform's output as plain text: no escape sequences (colours), no box drawing around
    diagnostics, no control characters."""
    text = _CONTROL.sub("", _ESCAPES.sub("", line))
    return text.strip().lstrip(_BOX).strip()


def spawn(argv: Sequence[str], *, cwd: Path | str | None, env: Mapping[str, str],
          private: bool = False) -> subprocess.Popen:
    """Starts a child in its own session, stdout and stderr piped (`private`: umask 077)."""
    return subprocess.Popen(list(argv), cwd=cwd, env=dict(env), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True, umask=PRIVATE_UMASK if private else -1)


def supervise(proc: subprocess.Popen, label: str, stop: StopRequest | None, *, shielded: bool = False,
              loud: bool = False, graceful: bool = True) -> tuple[int, str, str, bool]:
    """Waits for a child, streaming its output to the log (debug, or info when `loud`), and passes a stop
    request on to it once: SIGINT (`graceful`) or SIGTERM. A `shielded` child is never signalled.
    Returns (exit code, stdout, stderr, whether it was asked to stop)."""
    out: list[str] = []
    err: list[str] = []

    def pump(stream: Any, sink: list[str], level: int) -> None:
        for raw in iter(stream.readline, b""):
            line = raw.decode("utf-8", "replace").rstrip("\n")
            sink.append(line)
            shown = clean_line(line)
            if shown:
                log.log(level, "    %s| %s", label, shown)
        stream.close()

    level = logging.INFO if loud else logging.DEBUG
    readers = [threading.Thread(target=pump, args=(proc.stdout, out, level), daemon=True),
               threading.Thread(target=pump, args=(proc.stderr, err, level), daemon=True)]
    for reader in readers:
        reader.start()
    stop_seen = False
    forwarded = False

    def wait_briefly() -> None:
        # Waiting on the stdout reader ends the moment the child exits (its pipe closes); polling the
        # process would add up to 50 ms per command.
        if readers[0].is_alive():
            readers[0].join(timeout=0.2)
        else:
            try:
                proc.wait(timeout=0.2)
            except subprocess.TimeoutExpired:
                pass

    def exited() -> int | None:
        """Waits up to 0.2 s for the child; its exit code once it ended, else passes a stop request on
        (once). The wait comes first, so a command that ends at once never sees the stop."""
        nonlocal stop_seen, forwarded
        wait_briefly()
        code = proc.poll()
        if code is not None or stop is None or not stop.reason:
            return code
        if not stop_seen:
            stop_seen = True
            if shielded:
                log.info("    %s: %s received; letting it finish (it is not interrupted)", label, stop.reason)
            else:
                log.info("    %s: stopping (%s); waiting for it to finish what is in flight", label, stop.reason)
        if not shielded and not forwarded:
            forwarded = True
            try:
                proc.send_signal(signal.SIGINT if graceful else signal.SIGTERM)
            except ProcessLookupError:
                pass
        return None

    # The probe does the waiting; no deadline and no StopRun here: a stop is forwarded to the child,
    # which is waited for until it exits.
    poll(exited, timeout_s=math.inf, interval_s=0.0, jitter=0.0)
    for reader in readers:
        reader.join(timeout=5)
    return proc.returncode, "\n".join(out), "\n".join(err), forwarded
