"""`pipenv run summary`: synthesize both stacks and list what `cdktf deploy` would create (scripts.run.summary)."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from scripts.base import userfiles
from scripts.base.console import emit_json, log
from scripts.base.errors import ExitCode
from scripts.config.model import DEFAULT_PATH, Config
from scripts.run.summary import summarize


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default=None, help=f"config file (default: CRASHCART_CONFIG or {DEFAULT_PATH})")
    parser.add_argument("--outdir", default="cdktf.out", help="where to synthesize (default: cdktf.out)")


def run(args: argparse.Namespace) -> int:
    config_path = args.config or os.environ.get("CRASHCART_CONFIG") or DEFAULT_PATH
    config = Config.load(config_path)  # a bad value is told here, before the 15 s synth
    outdir = userfiles.require_folder(args.outdir, "--outdir", create=True)
    stacks = summarize(Path(config_path), outdir)
    print_summary(config, stacks)
    emit_json({"config": str(config_path), "outdir": str(outdir), "stacks": stacks})
    return int(ExitCode.OK)


def print_summary(config: Config, stacks: dict[str, Any]) -> None:
    s = config.source
    log.info("")
    log.info("Rescue plan for %s (%s, %s, zone %s)", s.vm_name, s.resource_group, s.location, s.zone or "none")
    log.info("  source disk: %s GiB %s, %s, %s, %s controller", s.os_disk_size_gb, s.os_disk_sku,
             s.hyper_v_generation, s.security_type, s.disk_controller)
    log.info("  rescue VM: %s %s from %s", config.rescue.os, config.rescue.size, config.rescue_image)
    for name, stack in stacks.items():
        log.info("")
        log.info("cdktf deploy %s  (%s)", name, stack["file"])
        for item in stack["resources"]:
            log.info("  + %-62s %s", f"{item['type']}.{item['name']}", item["what"])
        if stack["variables"]:
            log.info("  variables supplied at deploy time: %s (TF_VAR_<name>)", ", ".join(stack["variables"]))
    log.info("")
    log.info("The source VM and its disk are only read. `cdktf destroy repair` removes the repair stack;")
    log.info("the evidence stack and its dumps stay.")
