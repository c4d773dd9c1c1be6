"""repair-run's fix step (`repair-run --fix SPEC`, #16): after the collection, fix the disk copy, swap it in and
prove the VM boots (scripts.run.fix with verify), in the same unattended run.

SPEC is what `fix` takes as RECIPE[:ARG] (`disable-driver:csagent`, `safe-mode`, `remove-file:PATTERN`);
`disable-driver:auto` is `fix disable-driver --from-triage`: the driver the collection's triage names. The
rescue-vm collection does not triage, so the step triages the primary stored dump where it lies in evidence
(range reads) first, and records the verdict in the report's `collect.triage`.

How it ends (scripts.run.result, scripts.run.teardown):
- booted: the fixed copy is now the VM's OS disk and belongs to the repair stack, so the stack stays on purpose
  (destroying it would delete the disk the VM boots from). The run exits 0 with status "fixed", the report's
  repair_stack says kept / kept_reason, and `next` says what to do (rollback command, cleanup once the VM's
  own disk is fixed). The teardown is not attempted (it would refuse with 31).
- not booted / refused / failed: fix_verify has already put the original OS disk back (rollback state
  "restored"), the run fails with the fix's exit code (16 when the fixed copy crashed again: the dump that crash
  wrote is collected from the copy beside the collection's own first, scripts.run.fix_dump, before the
  teardown destroys the stack as usual).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from scripts.base.console import log
from scripts.base.errors import CrashcartError, ExitCode, first_line
from scripts.config.stackoutputs import RepairOutputs
from scripts.remediate import recipes
from scripts.run import fix_verify
from scripts.run.fix import FixReport, FixRequest, culprit_driver, fix, newest_report

AUTO_TARGET = "auto"
SPEC_HINT = ("--fix RECIPE[:ARG], e.g. --fix disable-driver:auto (the driver the triage names), "
             "--fix disable-driver:csagent, --fix safe-mode")


def check_spec(spec: str) -> str:
    """The spec as given, or a usage error naming the recipes (before anything is deployed)."""
    name, _, target = spec.partition(":")
    if name not in recipes.RECIPES:
        raise CrashcartError(f"--fix {spec!r}: there is no recipe {name!r}",
                             f"name one of: {', '.join(recipes.RECIPES)} ({SPEC_HINT})", ExitCode.USAGE)
    if target == AUTO_TARGET and name != "disable-driver":
        raise CrashcartError(f"--fix {spec!r}: only disable-driver takes the culprit from the triage", SPEC_HINT,
                             ExitCode.USAGE)
    if target != AUTO_TARGET:
        recipes.parse(spec)  # the recipe's own checks (a name, a pattern), as `fix` does them
    return spec


def _primary_dump(collect: dict[str, Any]) -> str | None:
    order = {"full": 0, "kernel": 1, "memory": 1, "minidump": 2}
    dumps = [b for b in collect.get("blobs") or [] if b.get("ok") and b.get("name")]
    dumps.sort(key=lambda b: order.get(str(b.get("kind")), 3))
    return str(dumps[0]["name"]) if dumps else None


def triage_if_missing(collect: dict[str, Any], container: Any, folder: Path) -> Path:
    """A report holding a triage verdict for --fix disable-driver:auto: the collection's own when it has one,
    else the verdict on the primary stored dump, read where it lies in evidence (also put in `collect`)."""
    if collect.get("triage"):
        report = {"triage": collect["triage"]}
    else:
        blob = _primary_dump(collect)
        if blob is None:
            raise CrashcartError("--fix disable-driver:auto: the collection stored no verified dump to triage",
                                 "name the driver (--fix disable-driver:NAME) or collect a dump first",
                                 ExitCode.USAGE)
        from scripts.collection.server_copy import read_url
        from scripts.dumpfile.errors import BadDump
        from scripts.dumpfile.triage import triage

        try:
            verdict = triage(read_url(container, blob), getattr(container, "credential", None)).to_dict()
        except (BadDump, OSError, ValueError) as err:
            raise CrashcartError(f"--fix disable-driver:auto: triage of {blob} failed: "
                                 f"{getattr(err, 'message', None) or first_line(err)}",
                                 "run `pipenv run triage` on the dump and name the driver (--fix disable-driver:NAME)",
                                 ExitCode.USAGE) from None
        collect["triage"] = verdict
        report = {"triage": verdict}
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "fix-triage.json"
    path.write_text(json.dumps(report, indent=2, default=str) + "\n", encoding="utf-8")
    return path


def recipes_for(spec: str, collect: dict[str, Any] | None, container: Any, out_dir: Path,
                vm_id: str) -> tuple[recipes.Recipe, ...]:
    name, _, target = spec.partition(":")
    if target != AUTO_TARGET:
        return (recipes.parse(spec),)
    try:
        folder = newest_report(out_dir, vm_id).parent  # the collection's run folder
    except CrashcartError:
        folder = out_dir
    driver = culprit_driver(triage_if_missing(collect or {}, container, folder))
    log.info("    --fix %s: the triage names %s", spec, driver)
    return (recipes.parse(f"{name}:{driver}"),)


def fix_and_verify(spec: str, outputs: RepairOutputs, collect: dict[str, Any] | None, *, out_dir: Path,
                   options: fix_verify.BootOptions, timing: Any = None, stop: Any = None) -> FixReport:
    """The fix with verify; a report whose error is set when the VM did not boot from the fixed copy."""
    from scripts.evidence import blobs as evidence

    container = evidence.container_client(outputs.evidence_blob_endpoint, outputs.evidence_container)
    chosen = recipes_for(spec, collect, container, out_dir, outputs.source_vm_id)
    extra: dict[str, Any] = {"timing": timing} if timing is not None else {}
    return fix(FixRequest(outputs=outputs, recipes=chosen, verify=options, out_dir=out_dir, stop=stop,
                          first_collection=collect, **extra))
