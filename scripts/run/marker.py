"""<out-dir>/repair-run.marker.json: the note a run in progress leaves in its output folder.

A second run in the same folder refuses to start while the first is alive; a run that died (SIGKILL,
a lost machine) is named by the next one, with the step it stopped in. The marker is kept when the
teardown failed, for the same reason.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import socket
from pathlib import Path
from typing import Any

from scripts.base.console import log
from scripts.base.errors import CrashcartError, ExitCode

MARKER_FILE = "repair-run.marker.json"


def now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


class RunMarker:
    """Who is running in this folder, since when, and in which step."""

    def __init__(self, out_dir: Path, run_id: str):
        self.path = out_dir / MARKER_FILE
        self.run_id = run_id
        self.previous: dict[str, Any] | None = None

    def claim(self) -> None:
        self.previous = self._read()
        prev = self.previous
        if prev and prev.get("host") == socket.gethostname() and _alive(int(prev.get("pid", 0))):
            raise CrashcartError(
                f"another repair-run (pid {prev['pid']}, run {prev.get('run_id')}) is working in this folder",
                "wait for it to finish, or stop it with SIGTERM (it tears down) and re-run", ExitCode.USAGE)
        if prev:
            log.warning("an earlier run (%s, started %s) stopped during '%s' without finishing; "
                        "checking what it left", prev.get("run_id"), prev.get("started_at"), prev.get("phase"))
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._write({"run_id": self.run_id, "pid": os.getpid(), "host": socket.gethostname(),
                     "started_at": now(), "phase": "starting"})

    def phase(self, name: str) -> None:
        data = self._read() or {}
        if data.get("run_id") == self.run_id:
            data["phase"] = name
            self._write(data)

    def release(self) -> None:
        data = self._read()
        if data and data.get("run_id") == self.run_id:
            self.path.unlink(missing_ok=True)

    def _read(self) -> dict[str, Any] | None:
        try:
            return json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None

    def _write(self, data: dict[str, Any]) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(data, indent=2), encoding="utf-8")
        tmp.replace(self.path)


def _alive(pid: int) -> bool:
    if pid <= 0 or pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
