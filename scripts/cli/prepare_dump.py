"""`pipenv run prepare-dump`: configure the disk copy to write a dump, and with --swap trigger and collect it.

Parses the options into a PrepareDumpRequest, runs scripts.run.prepare_dump and prints its JSON
document on stdout; the exit code is the report's (see scripts.run.prepare_dump). With --live, the same
settings go onto the running source VM instead (scripts.run.prepare_live; needs --allow-source-write
unless --dry-run, and no repair stack).
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from scripts.base.console import emit_json, report_error
from scripts.base.errors import CrashcartError, ExitCode
from scripts.azure.runcommand import DEFAULT_AGENT_WAIT_MINUTES, DEFAULT_POLL_SECONDS
from scripts.collection.contract import OUT_DIR
from scripts.config.model import Config
from scripts.remote.winpaths import DEDICATED_DUMP_FILE, DEFAULT_DUMP_FILE
from scripts.run import numbers
from scripts.run.numbers import Range
from scripts.run.outputs import load_repair_outputs
from scripts.nodump.prepare import (DUMP_TYPES, PREPARE_TIMEOUT_MINUTES,
                                    PrepareSettings, Timing)
from scripts.nodump.prepare import check_windows_path
from scripts.run.prepare_dump import PrepareDumpRequest, TriggerOptions, prepare_dump
from scripts.run.prepare_live import LiveRequest, prepare_live


# Every number is checked by scripts.run.numbers (a finite number in range, or exit 2 with one line).
NUMBERS = {"memory_gb": Range(0, 24 * 1024, unit="GiB"),  # 0: unknown (told by the prepare step)
           "trigger_timeout_minutes": numbers.TIMEOUT_MINUTES,
           "nmi_after_minutes": Range(-numbers.WEEK_MINUTES, numbers.WEEK_MINUTES, unit="minutes (negative: never)"),
           "dump_wait_minutes": numbers.WAIT_MINUTES, "timeout_minutes": numbers.TIMEOUT_MINUTES,
           "agent_wait_minutes": numbers.WAIT_MINUTES, "poll_seconds": numbers.POLL_SECONDS}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="config file (default: CRASHCART_CONFIG or repair.toml)")
    parser.add_argument("--outputs-file", type=Path, help="outputs written by `cdktf deploy repair --outputs-file`")
    parser.add_argument("--type", choices=tuple(DUMP_TYPES), default="kernel",
                        help="dump to configure: kernel (CrashDumpEnabled 2, default), complete (1), automatic (7)")
    parser.add_argument("--memory-gb", help="the VM's RAM (default: source.memory_gb)")
    parser.add_argument("--dump-file", default=DEFAULT_DUMP_FILE, help="DumpFile on the system volume (default: %(default)s)")
    parser.add_argument("--auto-reboot", action="store_true",
                        help="AutoReboot 1 (default 0: stay on the stop screen so the dump is not overwritten)")
    parser.add_argument("--no-nmi-crash-dump", action="store_true", help="leave NMICrashDump 0 (older Windows need 1)")
    parser.add_argument("--dedicated-dump", choices=("auto", "always", "never"), default="auto",
                        help="configure a DedicatedDumpFile: when the page file is too small (auto), always or never")
    parser.add_argument("--dedicated-dump-file", default=DEDICATED_DUMP_FILE, help="(default: %(default)s)")
    parser.add_argument("--no-ems", action="store_true", help="do not enable EMS/SAC in the BCD store")
    parser.add_argument("--allow-dirty-hive", action="store_true",
                        help="Linux rescue VM: write a SYSTEM hive whose transaction logs are not merged (loses them)")
    parser.add_argument("--dry-run", action="store_true", help="read the disk copy (with --live: the running VM) and show "
                                                               "what would change; write nothing")
    parser.add_argument("--live", action="store_true",
                        help="configure the RUNNING source VM (a VM that still boots) through Run Command instead of "
                             "the disk copy: CrashControl, a dedicated dump file when the page file is too small, "
                             "NMICrashDump, AutoReboot; old values saved in a manifest first (`rollback --live`); "
                             "no repair stack needed")
    parser.add_argument("--allow-source-write", action="store_true",
                        help="with --live: allow crashcart to change the source VM's registry (required unless --dry-run)")
    parser.add_argument("--swap", action="store_true",
                        help="then swap the prepared copy in as the VM's OS disk, trigger the crash, collect the dump "
                             "and roll back (the only change crashcart makes to the source VM)")
    parser.add_argument("--trigger-timeout-minutes", default=30.0,
                        help="how long to wait for the crash after the swap (default: %(default)s)")
    parser.add_argument("--nmi-after-minutes", default=10.0,
                        help="no crash by then: send (--send-nmi) or print the serial console NMI command (default: "
                             "%(default)s; negative: never)")
    parser.add_argument("--send-nmi", action="store_true",
                        help="send the NMI with `az serial-console send nmi` (needs the Azure CLI and its extension)")
    parser.add_argument("--dump-wait-minutes",
                        help="after the crash, how long Windows gets to write the dump (default: 3, plus 1 per 8 GB "
                             "of RAM for a complete dump)")
    parser.add_argument("--leave-stopped", action="store_true",
                        help="after rolling back, leave the VM deallocated even if it was running")
    parser.add_argument("--no-collect", action="store_true", help="after the swap run, do not collect the dump")
    parser.add_argument("--timeout-minutes",
                        help=f"remote command timeout (default: {PREPARE_TIMEOUT_MINUTES} to prepare, "
                             "repair.collect_timeout_minutes to collect)")
    parser.add_argument("--agent-wait-minutes", default=DEFAULT_AGENT_WAIT_MINUTES)
    parser.add_argument("--poll-seconds", default=DEFAULT_POLL_SECONDS)
    parser.add_argument("--out-dir", type=Path, default=OUT_DIR, help="local output folder (default: %(default)s)")


def settings_from(args: argparse.Namespace, config: Config) -> PrepareSettings:
    memory_gb = args.memory_gb if args.memory_gb is not None else config.source.memory_gb
    return PrepareSettings(
        dump_type=DUMP_TYPES[args.type], memory_mb=int(round(memory_gb * 1024)), dump_file=args.dump_file,
        auto_reboot=args.auto_reboot, nmi_crash_dump=not args.no_nmi_crash_dump, dedicated=args.dedicated_dump,
        dedicated_file=args.dedicated_dump_file, ems=not args.no_ems, allow_dirty_hive=args.allow_dirty_hive)


def trigger_options(args: argparse.Namespace, settings: PrepareSettings) -> TriggerOptions:
    wait = args.dump_wait_minutes
    if wait is None:
        wait = 3.0 + (settings.memory_mb / 1024 / 8 if settings.dump_type == 1 else 0.0)
    if args.trigger_timeout_minutes <= 0:
        raise CrashcartError("--trigger-timeout-minutes must be positive", "e.g. 30", ExitCode.USAGE)
    return TriggerOptions(timeout_s=args.trigger_timeout_minutes * 60,
                          nmi_after_s=None if args.nmi_after_minutes < 0 else args.nmi_after_minutes * 60,
                          auto_nmi=args.send_nmi, dump_wait_s=max(0.0, wait * 60), poll_s=max(0.01, args.poll_seconds),
                          leave_stopped=args.leave_stopped)


def run_live(args: argparse.Namespace, config: Config) -> int:
    """prepare-dump --live: the settings on the running source VM (scripts.run.prepare_live)."""
    if args.swap:
        raise CrashcartError("--live and --swap exclude each other", "--live configures the running VM; drop one",
                             ExitCode.USAGE)
    check_windows_path("--dump-file", args.dump_file)
    check_windows_path("--dedicated-dump-file", args.dedicated_dump_file)
    memory_gb = args.memory_gb if args.memory_gb is not None else config.source.memory_gb
    report = prepare_live(LiveRequest(
        config=config, memory_mb=int(round(memory_gb * 1024)), dry_run=args.dry_run,
        allow_source_write=args.allow_source_write, out_dir=args.out_dir,
        settings={"dump_type": DUMP_TYPES[args.type], "dump_file": args.dump_file, "auto_reboot": args.auto_reboot,
                  "nmi_crash_dump": not args.no_nmi_crash_dump, "dedicated": args.dedicated_dump,
                  "dedicated_file": args.dedicated_dump_file, "ems": False},
        timing=Timing(timeout_s=max(60, math.ceil((args.timeout_minutes or PREPARE_TIMEOUT_MINUTES) * 60)),
                      agent_wait_s=args.agent_wait_minutes * 60, poll_s=args.poll_seconds)))
    emit_json(report.document)
    if report.error is not None:
        report_error(report.error)
    return int(report.exit_code)


def run(args: argparse.Namespace) -> int:
    numbers.check_options(args, NUMBERS)
    if args.allow_source_write and not args.live:
        raise CrashcartError("--allow-source-write goes with --live", "add --live, or drop --allow-source-write",
                             ExitCode.USAGE)
    if args.leave_stopped and not args.swap:  # it applies to the rollback after the swap run, nothing else
        raise CrashcartError("--leave-stopped goes with --swap", "add --swap, or drop --leave-stopped",
                             ExitCode.USAGE)
    config = Config.load(args.config)
    if args.live:
        return run_live(args, config)
    outputs = load_repair_outputs(args.outputs_file)
    settings = settings_from(args, config)
    trigger = trigger_options(args, settings) if args.swap else None
    if args.swap and args.dry_run:
        raise CrashcartError("--swap and --dry-run exclude each other", "drop one of them", ExitCode.USAGE)
    # preparing edits two small hives: it gets its own, shorter limit
    timing = Timing(timeout_s=max(60, math.ceil((args.timeout_minutes or PREPARE_TIMEOUT_MINUTES) * 60)),
                    agent_wait_s=args.agent_wait_minutes * 60, poll_s=args.poll_seconds)
    report = prepare_dump(PrepareDumpRequest(
        config=config, outputs=outputs, settings=settings, timing=timing, dry_run=args.dry_run, trigger=trigger,
        collect=not args.no_collect,
        collect_timeout_minutes=args.timeout_minutes or config.repair.collect_timeout_minutes, out_dir=args.out_dir))
    emit_json(report.document)
    if report.error is not None:
        report_error(report.error)
    return int(report.exit_code)
