"""`pipenv run sweep`: list (and with --delete, delete) repair resource groups past their expiry
(scripts.run.sweep)."""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping

from scripts.azure import ids
from scripts.base.console import emit_json
from scripts.base.errors import CrashcartError, ExitCode
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
    check_subscription_env(args, os.environ)
    subscription = sweep.resolve_subscription(args, os.environ)
    report = sweep.sweep(sweep.resource_client(subscription), subscription, now, delete=args.delete,
                         wait=not args.no_wait)
    emit_json(report.to_dict())
    failure = report.failure()
    if failure is not None:
        raise failure
    return int(ExitCode.OK)


SUBSCRIPTION_ENV = ("CRASHCART_SOURCE_SUBSCRIPTION_ID", "AZURE_SUBSCRIPTION_ID")  # resolve_subscription's order


def check_subscription_env(args: argparse.Namespace, env: Mapping[str, str]) -> None:
    """A subscription taken from the environment that is not a GUID is told by the variable's name (the
    operator may not know it is set)."""
    if args.subscription:
        return
    for name in SUBSCRIPTION_ENV:
        value = (env.get(name) or "").strip()
        if value:
            if not ids.is_subscription_id(value):
                raise CrashcartError(f'{name}="{value}" is not a subscription ID',
                                     f"set {name} to a GUID like 00000000-0000-0000-0000-000000000000, unset it, or "
                                     "pass --subscription <id>", ExitCode.USAGE)
            return
