"""`pipenv run collect`: get the dump out with the configured strategy and prove it reached evidence storage whole.

Parses the options, reads the repair stack's outputs (and the config when there is one), hands a
CollectRequest to the strategy's collector (scripts.collection.strategies) and prints the
CollectResult as JSON on stdout; the exit code is the result's (README "Exit codes": 0 OK, 10 NO_DUMP,
11 DISK_NOT_FOUND, 12 COLLECT_FAILED, 13 TIMED_OUT, 14 AGENT_NOT_READY, 15 VERIFY_FAILED, 2-5 for
usage and Azure errors).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from scripts.base.console import emit_json, log, report_error
from scripts.base.errors import ExitCode
from scripts.collection.contract import (DEFAULT_AGENT_WAIT_MINUTES, DEFAULT_POLL_SECONDS, DEFAULT_TIMEOUT_MINUTES,
                                         OUT_DIR, STRATEGIES, CollectError, CollectRequest)
from scripts.collection.strategies import AUTO, AUTO_RULE, collector_for, resolve
from scripts.config.model import DEFAULT_PATH, Config
from scripts.run import numbers
from scripts.run.numbers import Range
from scripts.run.outputs import load_repair_outputs
from scripts.evidence.blobs import SAS_MAX_DAYS

# Every number is checked by scripts.run.numbers (a finite number in range, or exit 2 with one line).
NUMBERS = {"timeout_minutes": numbers.TIMEOUT_MINUTES, "agent_wait_minutes": numbers.WAIT_MINUTES,
           "poll_seconds": numbers.POLL_SECONDS, "sas_days": Range(1, SAS_MAX_DAYS, integer=True, unit="days")}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--strategy", choices=(AUTO, *STRATEGIES),
                        help="rescue-vm (Run Command on the rescue VM) or snapshot-export (server-side copy from "
                             "the snapshot, no VM involved); default: repair.strategy, else rescue-vm. auto (the "
                             "config's default) means rescue-vm here: repair-run's preflight is what chooses "
                             "snapshot-export when the disk allows it")
    parser.add_argument("--outputs-file", type=Path,
                        help="outputs written by `cdktf deploy repair --outputs-file` (default: terraform output "
                             "in cdktf.out/stacks/repair)")
    parser.add_argument("--config", help="config file (default: CRASHCART_CONFIG or repair.toml; optional)")
    parser.add_argument("--timeout-minutes",
                        help=f"how long the remote collection may run (default: repair.collect_timeout_minutes, "
                             f"{DEFAULT_TIMEOUT_MINUTES})")
    parser.add_argument("--agent-wait-minutes", default=DEFAULT_AGENT_WAIT_MINUTES,
                        help="how long to wait for the rescue VM's agent to be Ready (default: %(default)s)")
    parser.add_argument("--poll-seconds", default=DEFAULT_POLL_SECONDS,
                        help="how often to poll Azure (default: %(default)s)")
    parser.add_argument("--out-dir", type=Path, default=OUT_DIR, help="local folder for the report (default: %(default)s)")
    parser.add_argument("--full-hash", action="store_true",
                        help="re-hash every blob by downloading it (default: only blobs up to 256 MiB)")
    parser.add_argument("--sas", action="store_true",
                        help="print read-only user-delegation SAS links to the dumps (for a support ticket)")
    parser.add_argument("--sas-days", default=SAS_MAX_DAYS,
                        help=f"validity of the SAS links, 1-{SAS_MAX_DAYS} days (default: %(default)s)")


def _load_config(path: str | None) -> Config | None:
    """The config when there is one: collect works from the stack outputs alone."""
    if path is None and not os.environ.get("CRASHCART_CONFIG") and not Path(DEFAULT_PATH).exists():
        return None
    return Config.load(path)


def run(args: argparse.Namespace) -> int:
    numbers.check_options(args, NUMBERS)
    config = _load_config(args.config)
    outputs = load_repair_outputs(args.outputs_file)
    strategy = args.strategy or (config.repair.strategy if config else "rescue-vm")
    if strategy == AUTO:
        log.info("strategy: %s (%s)", resolve(AUTO), AUTO_RULE)
    collector = collector_for(strategy)
    request = CollectRequest(
        outputs, config,
        timeout_minutes=args.timeout_minutes or (config.repair.collect_timeout_minutes if config
                                                 else DEFAULT_TIMEOUT_MINUTES),
        agent_wait_minutes=args.agent_wait_minutes, poll_seconds=args.poll_seconds, out_dir=args.out_dir,
        full_hash=args.full_hash, sas_days=args.sas_days if args.sas else None)
    try:
        result = collector.collect(request)
    except CollectError as err:
        if err.result is not None:
            emit_json({**err.result.to_dict(), "error": err.message, "hint": err.hint})
        report_error(err)
        return int(err.exit_code)
    emit_json(result.to_dict())
    return int(ExitCode.OK)
