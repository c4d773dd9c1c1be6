"""`pipenv run repair-run`: deploy, collect, tear down and report, unattended (scripts.run.repair_run).

Output: one JSON document on stdout (also written to <out-dir>/<vm key>/repair-run.json and
<out-dir>/repair-run.json, the report a pipeline publishes), the human log on stderr.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from scripts.base.console import emit_json
from scripts.base.errors import CrashcartError, ExitCode
from scripts.collection.contract import STRATEGIES
from scripts.collection.strategies import AUTO
from scripts.config.model import DEFAULT_PATH
from scripts.run.repair_run import RepairRun
from scripts.run.settings import DEFAULT_OUT_DIR, LEFTOVER_POLICIES, RunSettings
from scripts.run.stop import StopGuard


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", metavar="PATH",
                        help=f"config file (env CRASHCART_CONFIG; default {DEFAULT_PATH} in the project folder); "
                             "written by discover when it does not exist")
    parser.add_argument("--vm", metavar="RESOURCE_ID",
                        help="the broken VM, discovered when the config file does not exist yet (env CRASHCART_VM_ID)")
    parser.add_argument("--timeout", metavar="DURATION",
                        help="stop and tear down after this long: 90m, 2h, 45s, or minutes "
                             "(env CRASHCART_RUN_TIMEOUT; default: repair.collect_timeout_minutes + 60m). "
                             "The teardown itself is not counted")
    parser.add_argument("--keep", action="store_true", default=None,
                        help="leave the repair stack deployed at the end (env CRASHCART_KEEP=1)")
    parser.add_argument("--on-leftovers", choices=LEFTOVER_POLICIES, default=None,
                        help="when an earlier run left repair resources: resume (apply again and collect; "
                             "default) or destroy them first (env CRASHCART_ON_LEFTOVERS)")
    parser.add_argument("--cleanup", action="store_true",
                        help="only destroy what an earlier run left of the repair stack, then exit")
    parser.add_argument("--skip-synth", action="store_true", default=None,
                        help="use the stacks already in cdktf.out (env CRASHCART_SKIP_SYNTH=1)")
    parser.add_argument("--project-dir", metavar="PATH",
                        help="folder with main.py and cdktf.out (env CRASHCART_PROJECT_DIR; default: current folder)")
    parser.add_argument("--out-dir", metavar="PATH",
                        help=f"where the report is written (env CRASHCART_OUT_DIR; default {DEFAULT_OUT_DIR})")
    parser.add_argument("--strategy", choices=(AUTO, *STRATEGIES),
                        help="how the dump gets out (sets repair.strategy, like CRASHCART_REPAIR_STRATEGY); auto "
                             "(the default): preflight picks snapshot-export when the disk allows it, else rescue-vm")


    parser.add_argument("--fix", metavar="RECIPE[:ARG]",
                        help="after the collection, fix the disk copy and prove the VM boots from it (else it is "
                             "rolled back): disable-driver:auto (the driver the triage names), disable-driver:NAME, "
                             "safe-mode, ... (env CRASHCART_FIX). A VM that boots keeps the fixed disk, so the repair "
                             "stack stays: the report says so and what to do next")
    parser.add_argument("--evidence-outputs", metavar="FILE", type=Path,
                        help="the evidence stack's outputs as `fleet run` hands them to each VM's run (the file it "
                             "writes into the VM's folder): used instead of reading the evidence state; refused when "
                             "it is for another project's evidence state. Without it the run reads the state itself")


def run(args: argparse.Namespace) -> int:
    if args.strategy:
        # Through the documented override, so synth (a child process) and collect see the same value.
        os.environ["CRASHCART_REPAIR_STRATEGY"] = args.strategy
    settings = RunSettings.resolve(args, os.environ)
    if settings.fix:
        from scripts.run.repair_fix import check_spec

        if settings.cleanup_only:
            raise CrashcartError("--fix goes with a run that collects, not with --cleanup",
                                 "drop --fix (or --cleanup)", ExitCode.USAGE)
        check_spec(settings.fix)  # a spec that cannot work stops here, before anything is deployed
    with StopGuard(settings.timeout_seconds) as stop:  # held to the end: a late signal only says so
        handed = args.evidence_outputs
        if handed is not None and not handed.is_absolute():
            handed = settings.project_dir / handed  # like --config: relative to the project folder
        outcome = RepairRun(settings, stop, evidence_file=handed).execute()
        emit_json(outcome.report)
        if outcome.bug is not None:
            raise outcome.bug  # after the report: the traceback is what a maintainer needs (exit 70)
        return outcome.exit_code
