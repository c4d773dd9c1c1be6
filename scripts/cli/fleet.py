"""`pipenv run fleet`: many VMs in one run (scripts.run.fleet), or sharded over CI jobs, with one report.

    fleet run    (--vms FILE | --selector TERMS) [--max-parallel N] [--shard I/N]
                 [--fix SPEC [--canary N] [--max-failure-rate R]]   the per-VM repair-run for each VM
    fleet plan   (--vms FILE | --selector TERMS) --shards N     the job matrix for GitHub Actions / Azure DevOps
    fleet report (--vms FILE | --fleet-id ID)                  the fleet report from the manifest in evidence

Output: one JSON document on stdout; the human log on stderr; the report as
<work-dir>/<fleet id>/fleet-report.{json,html}. Exit codes: scripts.run.fleet.fleet_exit_code.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from scripts.base import userfiles
from scripts.base.console import emit_json, log
from scripts.base.errors import CrashcartError, ExitCode
from scripts.collection.contract import STRATEGIES
from scripts.config.model import DEFAULT_PATH
from scripts.run import fleet, fleetcanary, fleetplan, fleetquota, fleetreport, fleetselect
from scripts.run.fleetjob import JobSettings
from scripts.run.fleetmanifest import FleetManifest
from scripts.run.settings import LEFTOVER_POLICIES, parse_duration
from scripts.run.stop import StopGuard

DEFAULT_WORK_DIR = "crashcart-fleet"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    commands = parser.add_subparsers(dest="command", metavar="{run,plan,report}")
    commands.required = True
    run = commands.add_parser("run", help="run the per-VM job (repair-run) for every VM of the list")
    plan = commands.add_parser("plan", help="write the VM list as a CI job matrix (one job per shard)")
    report = commands.add_parser("report", help="write the fleet report from the manifest in evidence")
    for sub in (run, plan, report):
        sub.add_argument("--vms", metavar="FILE",
                         help="a text file with one VM resource ID a line (# comments allowed)")
        sub.add_argument("--fleet-id", metavar="ID",
                         help="names the fleet's manifest (fleets/<ID>/fleet.json in evidence); default: derived "
                              "from the VM list, so the same list resumes the same fleet")
        sub.add_argument("--project-dir", metavar="PATH",
                         help="the crashcart folder: main.py, the config every VM starts from, the deployed "
                              "evidence stack (default: current folder)")
        sub.add_argument("--work-dir", metavar="PATH",
                         help=f"one folder per VM under <work-dir>/<fleet id>/ (default {DEFAULT_WORK_DIR} in the "
                              "project folder)")
    for sub in (run, plan):
        sub.add_argument("--selector", metavar="TERMS",
                         help="instead of --vms: the Windows VMs Azure Resource Graph finds for 'subscription=<id>[,<id>] "
                              "[resourceGroup=<name>[,<name>]] [location=<region>] [tag:<name>=<value> ...]' (terms "
                              "AND, comma-separated values OR)")
    run.add_argument("--max-parallel", metavar="N", type=int,
                     help="jobs at a time (default: what the vCPU quota of the VMs' regions leaves for rescue VMs, "
                          f"at most {fleetquota.QUOTA_CAP}; {fleet.DEFAULT_MAX_PARALLEL} when it cannot be read)")
    run.add_argument("--fix", metavar="SPEC", help="each VM's repair-run --fix SPEC: fix it and prove it boots")
    run.add_argument("--canary", metavar="N", type=int, default=0,
                     help="with --fix: fix N VMs first and start the rest only when they booted")
    run.add_argument("--max-failure-rate", metavar="R", default="0",
                     help="with --fix: stop the rollout once more than R of the fixed VMs did not boot (0.1 or 10%%; "
                          "default 0: any failure stops it)")
    run.add_argument("--shard", metavar="I/N", help="run only shard I of N (what `fleet plan` gives each CI job)")
    run.add_argument("--config", metavar="PATH",
                     help=f"the config every VM starts from ([source] is discovered per VM; default {DEFAULT_PATH})")
    run.add_argument("--skip-failed", action="store_true", help="do not retry VMs that failed in an earlier run")
    run.add_argument("--no-triage", action="store_true",
                     help="do not read the stop code and culprit from collected dumps the collection did not triage")
    run.add_argument("--timeout", metavar="DURATION", help="each VM's repair-run --timeout")
    run.add_argument("--strategy", choices=STRATEGIES, help="each VM's repair-run --strategy")
    run.add_argument("--on-leftovers", choices=LEFTOVER_POLICIES, help="each VM's repair-run --on-leftovers")
    run.add_argument("--skip-synth", action="store_true",
                     help="each VM's repair-run --skip-synth (stacks already in its folder's cdktf.out)")
    plan.add_argument("--shards", metavar="N", type=int, required=True, help="how many CI jobs share the fleet")
    plan.add_argument("--out", metavar="PATH", default="fleet-plan", help="where the matrices go (default fleet-plan)")


def run(args: argparse.Namespace) -> int:
    project = Path(args.project_dir or os.environ.get("CRASHCART_PROJECT_DIR") or ".").absolute()
    selector = getattr(args, "selector", None)
    if args.command != "report" and bool(args.vms) == bool(selector):
        raise CrashcartError(f"fleet {args.command} needs the VMs: either --vms FILE or --selector TERMS",
                             "e.g. --selector 'subscription=<id> resourceGroup=<name> tag:env=prod'", ExitCode.USAGE)
    if args.command == "run":
        _check_rollout(args)
    if args.command != "plan":
        userfiles.require_folder(project, "--project-dir")
        userfiles.require_folder(_under(project, args.work_dir or DEFAULT_WORK_DIR), "--work-dir", create=True)
    selection = fleetselect.select(selector) if selector else None
    vm_ids = selection.vm_ids if selection else fleet.read_vm_file(Path(args.vms)) if args.vms else ()
    if not vm_ids and not args.fleet_id:
        raise CrashcartError("fleet report needs the fleet: --vms FILE or --fleet-id ID", "", ExitCode.USAGE)
    fleet_id = fleet.check_fleet_id(args.fleet_id or fleet.default_fleet_id(vm_ids))
    work_dir = _under(project, args.work_dir or DEFAULT_WORK_DIR) / fleet_id
    if args.command == "plan":
        out_dir = userfiles.require_folder(_under(Path.cwd(), args.out), "--out", create=True)
        vms_file = args.vms or fleetplan.write_list(vm_ids, out_dir)  # every shard runs the same selection
        planned = fleetplan.plan(vm_ids, args.shards, fleet_id, str(vms_file), out_dir)
        emit_json({**planned, "selection": selection.summary() if selection else None})
        return int(ExitCode.OK)
    with StopGuard(None) as stop:
        evidence = fleet.read_evidence(project, stop)
        container = fleet.evidence_container(evidence)
        if args.command == "report":
            return _report(FleetManifest(container, fleet_id), work_dir)
        why, settings = _settings(args, project, work_dir, vm_ids, fleet_id, selection, evidence)
        result = fleet.FleetRun(settings, stop, container).execute()
        result["selection"] = selection.summary() if selection else None
        result["max_parallel"] = {"jobs": settings.max_parallel, "why": why}
        report = fleetreport.build(_document(FleetManifest(container, fleet_id)))
        result["report"] = fleetreport.write(report, work_dir)
        emit_json(result)
        _tell(result)
        return int(result["exit_code"])


def _check_rollout(args: argparse.Namespace) -> None:
    """--shard/--fix/--canary/--max-failure-rate/--max-parallel, refused before anything is read or run."""
    if args.shard:
        fleetplan.parse_shard(args.shard)  # not after the stacks, the evidence state and the VM list
    if args.max_parallel is not None and not 1 <= args.max_parallel <= fleet.MAX_PARALLEL:
        raise CrashcartError(f"--max-parallel {args.max_parallel} is out of range", f"use 1 to {fleet.MAX_PARALLEL}",
                             ExitCode.USAGE)
    args.max_failure_rate = fleetcanary.parse_rate(args.max_failure_rate)
    if (args.canary or args.max_failure_rate) and not args.fix:
        raise CrashcartError("--canary and --max-failure-rate go with --fix", "add --fix SPEC (the recipe every VM "
                             "gets), or drop them", ExitCode.USAGE)
    if not 0 <= args.canary <= fleet.MAX_VMS:
        raise CrashcartError(f"--canary {args.canary} is out of range", "use 0 (no canary) or a number of VMs",
                             ExitCode.USAGE)
    if args.fix:
        try:
            from scripts.run.repair_fix import check_spec
        except ImportError:  # repair-run without --fix: its children refuse the flag, each VM fails with it
            return
        check_spec(args.fix)  # refused once here, not in every child


def _settings(args: argparse.Namespace, project: Path, work_dir: Path, vm_ids: tuple[str, ...],
              fleet_id: str, selection: Any = None, evidence: Any = None) -> tuple[str, fleet.FleetSettings]:
    if args.timeout:
        parse_duration(args.timeout, "--timeout")  # refused here, not 50 times in the children
    passed: list[str] = []
    for flag, value in (("--timeout", args.timeout), ("--strategy", args.strategy),
                        ("--on-leftovers", args.on_leftovers)):
        if value:
            passed += [flag, value]
    if args.skip_synth:
        passed.append("--skip-synth")
    if args.shard:
        vm_ids = fleetplan.shard_of(vm_ids, fleetplan.parse_shard(args.shard))
    config = _under(project, str(Path(args.config or os.environ.get("CRASHCART_CONFIG") or DEFAULT_PATH)))
    job = JobSettings(project_dir=project, work_dir=work_dir, base_config=config,
                      child_args=tuple(passed), triage=not args.no_triage, fix=args.fix, evidence=evidence)
    parallel, why = args.max_parallel, "--max-parallel as given"
    if parallel is None:
        parallel, why = fleetquota.default_parallel(vm_ids, _locations(vm_ids, selection),
                                                    fleetquota.rescue_size(config), len(vm_ids))
    return why, fleet.FleetSettings(vm_ids=vm_ids, fleet_id=fleet_id, job=job, max_parallel=parallel,
                               retry_failed=not args.skip_failed, fix=args.fix, canary=args.canary,
                               max_failure_rate=args.max_failure_rate)


def _locations(vm_ids: tuple[str, ...], selection: Any) -> dict[str, str]:
    """The VMs' regions: the selection's rows, else one Resource Graph query (none when it fails: the default
    then says the quota was not consulted)."""
    if selection is not None:
        return selection.locations
    try:
        return fleetselect.locate(vm_ids)
    except CrashcartError as err:
        log.warning("fleet: could not read the VMs' regions through Resource Graph (%s)", err.message)
        return {}


def _report(manifest: FleetManifest, work_dir: Path) -> int:
    document = _document(manifest)
    report = fleetreport.build(document)
    files = fleetreport.write(report, work_dir)
    emit_json({**report, "files": files})
    entries = document.get("vms") or {}
    return fleet.fleet_exit_code(entries, None)


def _document(manifest: FleetManifest) -> dict[str, Any]:
    found = manifest.read()
    if found is None:
        raise CrashcartError(f"there is no fleet manifest {manifest.name} in the evidence container",
                             "check --fleet-id (or --vms: the same list as the fleet run), or run the fleet first",
                             ExitCode.AZURE_NOT_FOUND)
    return found[0]


def _tell(result: dict[str, Any]) -> None:
    counts = ", ".join(f"{n} {state}" for state, n in result["counts"].items() if n)
    log.info("fleet %s: %s; report: %s", result["fleet_id"], counts, result["report"]["html"])


def _under(base: Path, path: str) -> Path:
    p = Path(path)
    return p if p.is_absolute() else base / p
