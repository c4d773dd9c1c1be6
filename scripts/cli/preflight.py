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
from scripts.base.endpoints import token_refusal
from scripts.base.errors import CrashcartError, ExitCode
from scripts.base.rangeio import check_url
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


def check_endpoint(url: str) -> str:
    """--evidence-endpoint: a URL (host, valid port) that may receive the sign-in's token, or a usage error."""
    hint = "give the evidence account's Blob endpoint, e.g. https://<account>.blob.core.windows.net"
    if not url.startswith(("http://", "https://")):
        raise CrashcartError(f"--evidence-endpoint {url.split('?', 1)[0]!r} is not an http(s) URL", hint,
                             ExitCode.USAGE)
    try:
        check_url(url)
    except CrashcartError as err:
        raise CrashcartError(f"--evidence-endpoint {err.message}", hint, ExitCode.USAGE) from None
    refusal = token_refusal(url)
    if refusal:
        raise CrashcartError(f"--evidence-endpoint: {refusal}", hint, ExitCode.USAGE)
    return url


def run(args: argparse.Namespace) -> int:
    if args.evidence_endpoint:
        check_endpoint(args.evidence_endpoint)
    config = Config.load(args.config)
    requested, forced_by = requested_strategy(config, os.environ, args.strategy)
    verdict = run_preflight(config, requested, forced_by, evidence_endpoint=args.evidence_endpoint or "")
    render(verdict)
    emit_json(verdict.to_dict())
    return verdict.exit_code
