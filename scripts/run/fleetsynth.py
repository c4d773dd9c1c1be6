"""One synth for the whole fleet: every VM's stacks written by one child process, not one per VM.

A VM's repair-run synthesizes its stacks with `<python> main.py` (scripts.run.synth): a Node.js process
that loads the azurerm bindings through jsii - about 11 s of CPU and a few hundred MB before the first
stack is written - then writes both stacks in a fraction of a second. Fifty VMs paid that load fifty
times, up to --max-parallel of them at once (memory a CI runner does not have). Here the fleet runs one
child (`python -m scripts.run.fleetsynth <list>`, in its own session, scripts.run.child) that loads jsii
once and builds each VM's app (main.build_app) from that VM's config into that VM's folder, exactly what
its own synth would write; each VM's repair-run then runs with --skip-synth (its check that the stacks are
for its VM stays). A VM whose config the synth refuses is left to synthesize on its own, where repair-run
reports the refusal as it always does. The child is the only process that imports main/cdktf: this
module's import by the fleet reads neither.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

from scripts.base.console import log
from scripts.base.stop import StopRequest
from scripts.run.child import spawn, supervise

RESULT = "FLEETSYNTH "  # the child's line per VM: RESULT + {"key", "ok", "error"}


def synth_all(folders: dict[str, Path], project_dir: Path, env: dict[str, str],
              stop: StopRequest | None) -> set[str]:
    """Synthesizes <folder>/cdktf.out for each VM (key -> its folder, holding its repair.toml) in one child
    process run in the project folder. Returns the keys whose stacks were written (a stop request ends the
    child: the VMs it did not write are not started anyway)."""
    if not folders:
        return set()
    started = time.monotonic()
    with tempfile.NamedTemporaryFile("w", suffix=".json", prefix="fleetsynth-", delete=False) as handle:
        json.dump({key: str(folder) for key, folder in folders.items()}, handle)
    try:
        proc = spawn([sys.executable, "-m", "scripts.run.fleetsynth", handle.name], cwd=project_dir,
                     env={**env, "JSII_SILENCE_WARNING_END_OF_LIFE_NODE_VERSION": env.get(
                         "JSII_SILENCE_WARNING_END_OF_LIFE_NODE_VERSION", "20")})
        code, out, err, _ = supervise(proc, "synth", stop, graceful=False)
    finally:
        os.unlink(handle.name)
    done: set[str] = set()
    for line in out.splitlines():
        if not line.startswith(RESULT):
            continue
        result = json.loads(line[len(RESULT):])
        if result.get("ok"):
            done.add(result["key"])
        else:
            log.warning("    %s: the fleet's synth refused its config (%s); its repair-run synthesizes on its own",
                        result.get("key"), result.get("error"))
    if code != 0:
        log.warning("fleet: the synth of the VMs' stacks ended with exit %s (%s); the VMs it did not write "
                    "synthesize their own", code, (err.strip().splitlines() or ["no message"])[-1][:300])
    log.info("fleet: synthesized the stacks of %d of %d VM(s) in one process (%.1f s)", len(done), len(folders),
             time.monotonic() - started)
    return done


def _main(spec_path: str) -> int:
    """The child: loads the CDKTF app once, then each VM's config -> its folder's cdktf.out."""
    import importlib

    from scripts.base.errors import CrashcartError
    from scripts.config.model import Config

    folders = json.loads(Path(spec_path).read_text(encoding="utf-8"))
    sys.path.insert(0, os.getcwd())  # the project folder's main.py, as `python main.py` there would run it
    build_app = importlib.import_module("main").build_app
    for key, folder in folders.items():
        try:
            config = Config.load(str(Path(folder) / "repair.toml"))
            build_app(config, str(Path(folder) / "cdktf.out")).synth()
            result = {"key": key, "ok": True}
        except CrashcartError as err:
            result = {"key": key, "ok": False, "error": err.message}
        print(RESULT + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1]))
