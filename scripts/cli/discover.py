"""`pipenv run discover --vm <id>`: read the broken VM and its OS disk (GETs only) and write the config
(scripts.run.discover)."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from scripts.base.console import emit_json, log
from scripts.base.errors import ExitCode
from scripts.config.model import DEFAULT_PATH
from scripts.run.discover import discover


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--vm", required=True, metavar="RESOURCE_ID",
                        help="the broken VM: /subscriptions/<sub>/resourceGroups/<rg>/providers/"
                             "Microsoft.Compute/virtualMachines/<name>")
    parser.add_argument("--config", default=None,
                        help=f"config file to write (default: CRASHCART_CONFIG or {DEFAULT_PATH})")
    parser.add_argument("--rescue-os", choices=("windows", "linux"), default=None,
                        help="rescue VM operating system (default: keep the file's, else windows)")


def run(args: argparse.Namespace) -> int:
    path = Path(args.config or os.environ.get("CRASHCART_CONFIG") or DEFAULT_PATH)
    config = discover(args.vm, path, args.rescue_os)
    source = config.source
    log.info("wrote %s for %s (%s, zone %s, %s %s GiB, %s, %s, %s)", path, source.vm_name, source.location,
             source.zone or "none", source.os_disk_sku, source.os_disk_size_gb, source.hyper_v_generation,
             source.security_type, source.disk_controller)
    log.info("next: review %s, then `npx cdktf deploy evidence repair` or `pipenv run repair-run`", path)
    emit_json({"config": str(path), "source": dict(vars(source)), "rescue_os": config.rescue.os})
    return int(ExitCode.OK)
