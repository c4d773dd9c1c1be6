"""`pipenv run fleet`: many VMs in one run (scripts.run.fleet), or sharded over CI jobs, with one report.

    fleet run    --vms FILE [--max-parallel N] [--shard I/N]   the per-VM repair-run for each VM
    fleet plan   --vms FILE --shards N                         the job matrix for GitHub Actions / Azure DevOps
    fleet report (--vms FILE | --fleet-id ID)                  the fleet report from the manifest in evidence

Output: one JSON document on stdout; the human log on stderr; the report as
<work-dir>/<fleet id>/fleet-report.{json,html}. Exit codes: scripts.run.fleet.fleet_exit_code.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from scripts.base.console import emit_json, log
from scripts.base.errors import CrashcartError, ExitCode
from scripts.collection.contract import STRATEGIES
from scripts.config.model import DEFAULT_PATH
from scripts.run import fleet, fleetplan, fleetreport
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
        sub.add_argument("--vms", metavar="FILE", required=sub is not report,
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
    run.add_argument("--selector", metavar="QUERY",
                     help="VMs by subscription/resource group/tag through Azure Resource Graph (not available yet)")
    run.add_argument("--max-parallel", metavar="N", type=int, default=fleet.DEFAULT_MAX_PARALLEL,
                     help=f"jobs at a time (default {fleet.DEFAULT_MAX_PARALLEL}; each holds one rescue VM, so keep "
                          "it within the region's vCPU quota for the rescue VM size)")
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
    if args.command == "run" and args.selector:
        raise CrashcartError("--selector needs Azure Resource Graph (azure-mgmt-resourcegraph), which this "
                             "installation does not include", "list the VMs in a file instead: `az graph query -q "
                             "\"Resources | where type =~ 'microsoft.compute/virtualmachines'\" --query "
                             "'data[].id' -o tsv > vms.txt`, then --vms vms.txt", ExitCode.USAGE)
    vm_ids = fleet.read_vm_file(Path(args.vms)) if args.vms else ()
    if not vm_ids and not args.fleet_id:
        raise CrashcartError("fleet report needs the fleet: --vms FILE or --fleet-id ID", "", ExitCode.USAGE)
    fleet_id = fleet.check_fleet_id(args.fleet_id or fleet.default_fleet_id(vm_ids))
    work_dir = _under(project, args.work_dir or DEFAULT_WORK_DIR) / fleet_id
    if args.command == "plan":
        emit_json(fleetplan.plan(vm_ids, args.shards, fleet_id, args.vms, _under(Path.cwd(), args.out)))
        return int(ExitCode.OK)
    with StopGuard(None) as stop:
        container = fleet.evidence_container(project, stop)
        if args.command == "report":
            return _report(FleetManifest(container, fleet_id), work_dir)
        settings = _settings(args, project, work_dir, vm_ids, fleet_id)
        result = fleet.FleetRun(settings, stop, container).execute()
        report = fleetreport.build(_document(FleetManifest(container, fleet_id)))
        result["report"] = fleetreport.write(report, work_dir)
        emit_json(result)
        _tell(result)
        return int(result["exit_code"])


def _settings(args: argparse.Namespace, project: Path, work_dir: Path, vm_ids: tuple[str, ...],
              fleet_id: str) -> fleet.FleetSettings:
    if not 1 <= args.max_parallel <= fleet.MAX_PARALLEL:
        raise CrashcartError(f"--max-parallel {args.max_parallel} is out of range", f"use 1 to {fleet.MAX_PARALLEL}",
                             ExitCode.USAGE)
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
    config = Path(args.config or os.environ.get("CRASHCART_CONFIG") or DEFAULT_PATH)
    job = JobSettings(project_dir=project, work_dir=work_dir, base_config=_under(project, str(config)),
                      child_args=tuple(passed), triage=not args.no_triage)
    return fleet.FleetSettings(vm_ids=vm_ids, fleet_id=fleet_id, job=job, max_parallel=args.max_parallel,
                               retry_failed=not args.skip_failed)


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
