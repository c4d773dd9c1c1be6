"""Running a rendered bash remote script as Run Command would, on a disk image instead of the attached copy."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

from scripts.remote import RESULT_MARKER


def run_for_result(script: Path, image: Path, *, timeout: int, **params: str) -> tuple[subprocess.CompletedProcess, dict]:
    """Run `script` with its parameters in the environment (Device = the image) and return the process and the
    one result line's JSON; fails the test, showing both streams, when there is not exactly one."""
    env = {"PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"), "HOME": "/root", "Device": str(image),
           **params}
    proc = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, timeout=timeout)
    return proc, result_of(proc)


def result_of(proc: subprocess.CompletedProcess) -> dict:
    """The JSON of the script's one result line; fails the test, showing both streams, when there is not exactly one."""
    lines = [line for line in proc.stdout.splitlines() if line.startswith(RESULT_MARKER + " ")]
    assert len(lines) == 1, f"expected one result line\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    return json.loads(lines[0][len(RESULT_MARKER) + 1:])


def download(container, name: str) -> bytes:
    return container.download_blob(name).readall()
