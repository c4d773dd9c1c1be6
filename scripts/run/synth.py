"""Synthesizing the stacks: `<python> main.py` in the project folder, exactly as `npx cdktf synth` runs it.

The CDKTF app is a child process, so scripts/ never imports cdktf (jsii takes 15 s to load). The
app validates the config first and exits 2 on a bad value with `error:` and `next:` lines, which are
passed on as they are. Both repair-run and summary synthesize through here.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from scripts.base import stop as base_stop
from scripts.base.errors import CrashcartError, ExitCode
from scripts.base.stop import StopRequest
from scripts.run.child import spawn, supervise


def synth(project_dir: Path, config_path: Path, *, outdir: Path | None = None,
          stop: StopRequest | None = None) -> None:
    """Writes <outdir or project_dir/cdktf.out>/stacks/{evidence,repair}/cdk.tf.json for the config.
    A stop request ends the child (SIGTERM: it has nothing to save) and raises StopRun."""
    if not (project_dir / "main.py").exists():
        raise CrashcartError(f"there is no main.py in {project_dir}",
                             "run repair-run from the crashcart folder, or pass --project-dir", ExitCode.USAGE)
    env = {**os.environ, "CRASHCART_CONFIG": str(config_path),
           "JSII_SILENCE_WARNING_END_OF_LIFE_NODE_VERSION": os.environ.get(
               "JSII_SILENCE_WARNING_END_OF_LIFE_NODE_VERSION", "20")}
    if outdir is not None:
        env["CDKTF_OUTDIR"] = str(outdir)
    proc = spawn([sys.executable, "main.py"], cwd=project_dir, env=env)  # own session: scripts.run.child
    code, _, err, _ = supervise(proc, "synth", stop, graceful=False)
    base_stop.check(stop)
    if code == 0:
        return
    message = _line_after(err, "error:") or (err.strip().splitlines() or [f"exit code {code}"])[-1]
    if code == int(ExitCode.USAGE):
        raise CrashcartError(f"synth rejected the config: {message}",
                             _line_after(err, "next:") or "fix the config and re-run", ExitCode.USAGE)
    raise CrashcartError(f"synth failed (exit {code}): {message}",
                         "run `pipenv run python main.py` to see the whole error; with a valid config "
                         "this is a bug in crashcart", ExitCode.BUG)


def _line_after(text: str, prefix: str) -> str:
    for line in text.splitlines():
        if line.startswith(prefix):
            return line[len(prefix):].strip()
    return ""
