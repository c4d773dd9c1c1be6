"""`pipenv run sweep`: list (and with --delete, delete) repair resource groups past their expiry
(scripts.run.sweep)."""

from __future__ import annotations

import argparse
import os

from scripts.base.console import emit_json
from scripts.base.errors import ExitCode
from scripts.config.model import DEFAULT_PATH
from scripts.run import sweep


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--subscription", metavar="ID",
                        help="subscription to sweep (env CRASHCART_SOURCE_SUBSCRIPTION_ID or AZURE_SUBSCRIPTION_ID; "
                             "default: the config's source.subscription_id)")
    parser.add_argument("--config", metavar="PATH",
                        help=f"config file to take the subscription from (env CRASHCART_CONFIG; default {DEFAULT_PATH})")
    parser.add_argument("--delete", action="store_true",
                        help="delete the expired groups (default: only list them)")
    parser.add_argument("--now", metavar="ISO-8601",
                        help="judge expiry as of this time instead of now, e.g. 2025-01-31T06:00:00Z")
    parser.add_argument("--no-wait", action="store_true",
                        help="start the deletions and return without waiting for them to finish")


def run(args: argparse.Namespace) -> int:
    now = sweep.resolve_now(args.now)  # the command line first: a bad value is told before anything is looked up
    subscription = sweep.resolve_subscription(args, os.environ)
    report = sweep.sweep(sweep.resource_client(subscription), subscription, now, delete=args.delete,
                         wait=not args.no_wait)
    emit_json(report.to_dict())
    failure = report.failure()
    if failure is not None:
        raise failure
    return int(ExitCode.OK)

