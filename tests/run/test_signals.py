"""scripts/base/signals.py: a cleanup no signal can cut short (the repair-run teardown, snapshot-export's
revoke). A Ctrl-C inside it waits, and acts once the cleanup is done; without it, it acts at once."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

SCRIPT = r"""
import logging, os, signal, sys, time
logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(message)s")
from scripts.base import signals

steps = []
def cleanup():
    for n in range(3):
        os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C, again and again, in the middle of the cleanup
        time.sleep(0.05)
        steps.append(n)
try:
    if sys.argv[1] == "deferred":
        with signals.deferred("revoking access"):
            with signals.deferred("an inner step"):  # nested: only the outermost one delivers
                cleanup()
            steps.append("inner done")
    else:
        cleanup()
except KeyboardInterrupt:
    print("interrupted after", steps, flush=True)
    sys.exit(130)
print("not interrupted", steps)
"""


def run(mode: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True, timeout=30,
                          env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})


def test_a_signal_during_a_deferred_cleanup_acts_after_it():
    done = run("deferred")
    assert done.returncode == 130
    assert "interrupted after [0, 1, 2, 'inner done']" in done.stdout  # the whole cleanup ran first
    assert done.stderr.count("SIGINT received: finishing an inner step first") == 3


def test_without_it_the_first_signal_cuts_the_cleanup_short():
    done = run("plain")
    assert done.returncode == 130 and "interrupted after []" in done.stdout
