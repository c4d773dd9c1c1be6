"""`pipenv run fix`: repair the disk copy (one recipe or more), optionally prove the VM boots from it.

    pipenv run fix disable-driver csagent [--force] [--dry-run] [--verify]
    pipenv run fix disable-driver --from-triage [--report crashcart-out/<vm>/<stamp>/report.json]
    pipenv run fix remove-file 'Windows\\System32\\drivers\\CrowdStrike\\C-00000291*.sys'
    pipenv run fix safe-mode | last-known-good | revert-pending   [--then RECIPE[:ARG] ...]
    pipenv run fix rollback --manifest crashcart-out/<vm>/<stamp>/fix-manifest.json

Parses the options into a FixRequest, runs scripts.run.fix and prints its JSON document on stdout; the
exit code is the report's (see scripts.run.fix).
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from scripts.azure.runcommand import DEFAULT_AGENT_WAIT_MINUTES, DEFAULT_POLL_SECONDS
from scripts.base.console import emit_json, report_error
from scripts.base.errors import CrashcartError, ExitCode
from scripts.collection.contract import OUT_DIR
from scripts.remediate import recipes
from scripts.remediate.apply import FIX_TIMEOUT_MINUTES, Timing
from scripts.run import numbers
from scripts.run.fix import FixRequest, FixRollbackRequest, culprit_driver, fix, newest_report, rollback_fix
from scripts.run.fix_verify import BootOptions
from scripts.run.numbers import Range
from scripts.run.outputs import load_repair_outputs

NUMBERS = {"boot_timeout_minutes": numbers.TIMEOUT_MINUTES, "settle_seconds": Range(0, 24 * 3600, unit="seconds"),
           "timeout_minutes": numbers.TIMEOUT_MINUTES, "agent_wait_minutes": numbers.WAIT_MINUTES,
           "poll_seconds": numbers.POLL_SECONDS}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("recipe", choices=(*recipes.RECIPES, "rollback"),
                        help="what to change on the disk copy, or `rollback` to undo a fix")
    parser.add_argument("target", nargs="?", default="",
                        help="disable-driver: the service name (e.g. csagent); remove-file: the files, a folder on "
                             r"the system volume and a name with * or ? (e.g. 'Windows\System32\drivers\x\*.sys')")
    parser.add_argument("--then", action="append", default=[], metavar="RECIPE[:ARG]",
                        help="another recipe after it, e.g. --then remove-file:'C:\\x\\*.sys' (repeatable)")
    parser.add_argument("--from-triage", action="store_true",
                        help="disable-driver: the driver the collection's triage verdict names")
    parser.add_argument("--report", type=Path, help="with --from-triage: the collection's report.json "
                        "(default: the newest under --out-dir for the repair stack's VM)")
    parser.add_argument("--force", action="store_true",
                        help="disable a boot-critical driver / quarantine a file Windows needs to boot")
    parser.add_argument("--dry-run", action="store_true", help="show exactly what would change on the copy; write nothing")
    parser.add_argument("--verify", action="store_true",
                        help="then swap the fixed copy in, start the VM and keep it only if it boots (guest agent "
                             "Ready, no new stop on the serial log); otherwise roll back to the original OS disk")
    parser.add_argument("--boot-timeout-minutes", default=20.0, help="--verify: how long the boot may take (default: %(default)s)")
    parser.add_argument("--settle-seconds", default=120.0,
                        help="--verify: after the agent is Ready, how long no stop may appear (default: %(default)s)")
    parser.add_argument("--leave-stopped", action="store_true", help="--verify: after a rollback, leave the VM deallocated")
    parser.add_argument("--manifest", type=Path, help="rollback: the fix-manifest.json the fix wrote")
    parser.add_argument("--evidence-blob", help="rollback: the fix manifest's blob in evidence (<vm>/<stamp>/fix/fix-manifest.json)")
    parser.add_argument("--outputs-file", type=Path, help="outputs written by `cdktf deploy repair --outputs-file`")
    parser.add_argument("--timeout-minutes", default=float(FIX_TIMEOUT_MINUTES), help="remote command timeout (default: %(default)s)")
    parser.add_argument("--agent-wait-minutes", default=DEFAULT_AGENT_WAIT_MINUTES)
    parser.add_argument("--poll-seconds", default=DEFAULT_POLL_SECONDS)
    parser.add_argument("--out-dir", type=Path, default=OUT_DIR, help="local output folder (default: %(default)s)")


def recipes_from(args: argparse.Namespace, vm_id: str) -> tuple[recipes.Recipe, ...]:
    first = args.recipe
    if args.from_triage:
        if first != "disable-driver" or args.target:
            raise CrashcartError("--from-triage goes with `disable-driver` and no driver name",
                                 "pipenv run fix disable-driver --from-triage", ExitCode.USAGE)
        target = culprit_driver(args.report or newest_report(args.out_dir, vm_id))
    else:
        target = args.target
        if first in ("disable-driver", "remove-file") and not target:
            raise CrashcartError(f"{first} needs {'a driver name' if first == 'disable-driver' else 'a file pattern'}",
                                 f"pipenv run fix {first} {'NAME (or --from-triage)' if first == 'disable-driver' else 'PATTERN'}",
                                 ExitCode.USAGE)
    spec = f"{first}:{target}" if target else first
    return tuple(recipes.parse(s, force=args.force) for s in (spec, *args.then))


def run(args: argparse.Namespace) -> int:
    numbers.check_options(args, NUMBERS)
    outputs = load_repair_outputs(args.outputs_file)
    timing = Timing(timeout_s=max(60, math.ceil(args.timeout_minutes * 60)), agent_wait_s=args.agent_wait_minutes * 60,
                    poll_s=args.poll_seconds)
    if args.recipe == "rollback":
        if args.manifest is None and not args.evidence_blob:
            raise CrashcartError("rollback needs the fix manifest", "pass --manifest PATH (or --evidence-blob NAME)",
                                 ExitCode.USAGE)
        report = rollback_fix(FixRollbackRequest(outputs=outputs, manifest_path=args.manifest,
                                                 evidence_blob=args.evidence_blob, timing=timing,
                                                 poll_s=max(0.01, args.poll_seconds)))
    else:
        verify = None
        if args.verify:
            verify = BootOptions(timeout_s=args.boot_timeout_minutes * 60, settle_s=args.settle_seconds,
                                 poll_s=max(0.01, args.poll_seconds), leave_stopped=args.leave_stopped)
        report = fix(FixRequest(outputs=outputs, recipes=recipes_from(args, outputs.source_vm_id),
                                dry_run=args.dry_run, verify=verify, timing=timing, out_dir=args.out_dir))
    emit_json(report.document)
    if report.error is not None:
        report_error(report.error)
    return int(report.exit_code)
