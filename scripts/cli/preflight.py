"""`pipenv run preflight`: everything that can be known before a repair creates anything, as a checklist
(scripts.run.preflight_run): permissions at every scope, resource providers, the disk's export policy and
encryption, the rescue size and its quota in the zone, the evidence container from this machine, the names
and TTL the run will use, and the strategy repair-run would pick. GETs only: nothing is created.

Output: the checklist on stderr (a table on a terminal, plain lines in CI), the verdict as JSON on stdout.
Exit 0 when nothing blocks (warnings included); else the first blocker's code (README "Exit codes",
scripts.run.preflight_checks.EXIT_CODES).
"""

from __future__ import annotations

import argparse
import os

from scripts.base.console import emit_json
from scripts.collection.contract import STRATEGIES
from scripts.collection.strategies import AUTO
from scripts.config.model import DEFAULT_PATH, Config
from scripts.run.preflight_checks import render
from scripts.run.preflight_run import requested_strategy, run_preflight


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", metavar="PATH",
                        help=f"config file (env CRASHCART_CONFIG; default {DEFAULT_PATH})")
    parser.add_argument("--strategy", choices=(AUTO, *STRATEGIES),
                        help="check for this strategy (default: repair.strategy when the config sets it, else "
                             "auto: snapshot-export when allowed, else rescue-vm)")
    parser.add_argument("--evidence-endpoint", metavar="URL",
                        help="the evidence account's Blob endpoint (default: https://<evidence account>.blob.core."
                             "windows.net from the config)")


def run(args: argparse.Namespace) -> int:
    config = Config.load(args.config)
    requested, forced_by = requested_strategy(config, os.environ, args.strategy)
    verdict = run_preflight(config, requested, forced_by, evidence_endpoint=args.evidence_endpoint or "")
    render(verdict)
    emit_json(verdict.to_dict())
    return verdict.exit_code
