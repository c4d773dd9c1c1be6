"""`pipenv run rollback`: put the original OS disk back on the VM after a `prepare-dump --swap`.

Finds the rollback manifest (a file, a blob in evidence, or the newest one for the config's VM), runs
scripts.nodump.rollback.restore (idempotent) and prints what it did as JSON on stdout. With --live, the
same for a `prepare-dump --live`: the live manifest's old CrashControl values go back onto the running VM
(scripts.run.prepare_live.rollback_live).
"""

from __future__ import annotations

import argparse
import logging
import urllib.parse
from pathlib import Path

from scripts.azure.clients import AzureClients
from scripts.azure import ids
from scripts.base import userfiles
from scripts.base.console import emit_json, step
from scripts.base.errors import CrashcartError, ExitCode, printable
from scripts.collection.contract import OUT_DIR
from scripts.config.model import DEFAULT_PATH, Config
from scripts.evidence import blobs as evidence
from scripts.nodump import live, prepare, rollback, swap
from scripts.run import numbers
from scripts.run.prepare_live import rollback_live

log = logging.getLogger("crashcart.rollback")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--manifest", type=Path, help="the rollback-manifest.json prepare-dump wrote "
                                                      "(default: the newest under --out-dir for the config's VM)")
    parser.add_argument("--evidence-blob", help="read the manifest from the evidence container instead: "
                                                "<vm key>/<stamp>/rollback-manifest.json, e.g. "
                                                "web-01-1a2b3c4d/20250517T031245Z/rollback-manifest.json")
    parser.add_argument("--config", help="config file (default: CRASHCART_CONFIG or repair.toml)")
    parser.add_argument("--out-dir", type=Path, default=OUT_DIR, help="local output folder (default: %(default)s)")
    parser.add_argument("--delete-copy", action="store_true",
                        help="delete the prepared disk copy instead of putting it back on the rescue VM")
    parser.add_argument("--leave-stopped", action="store_true",
                        help="leave the VM deallocated even if it was running before the swap")
    parser.add_argument("--poll-seconds", default=swap.DEFAULT_POLL_S,
                        help="how often to poll Azure when it gives no Retry-After (default: %(default)s)")
    parser.add_argument("--live", action="store_true",
                        help="undo a `prepare-dump --live`: put the old CrashControl values back on the running VM "
                             "(--manifest/--evidence-blob name its live-manifest.json)")
    parser.add_argument("--agent-wait-minutes", default=5.0, help="--live: how long to wait for the VM agent")


def check_sources(args: argparse.Namespace) -> None:
    """--manifest and --evidence-blob name the same thing two ways: one at most; a --manifest file must be a
    regular file (a pipe would block the read forever)."""
    if args.manifest and args.evidence_blob:
        raise CrashcartError("--manifest and --evidence-blob both name the manifest", "pass one of them",
                             ExitCode.USAGE)
    if args.manifest:
        userfiles.require_file(args.manifest, "--manifest", "pass the manifest file prepare-dump wrote "
                               "(crashcart-out/<vm key>/<stamp>/...)", "the manifest")


def blob_name(given: str, endpoint: str, container: str) -> str:
    """The blob name in --evidence-blob: as given, or taken from the path of a pasted URL of a blob in the
    evidence container (`endpoint`/`container`); a URL of any other container is refused (exit 2)."""
    if not given.lower().startswith(("https://", "http://")):
        return given
    url = urllib.parse.urlsplit(given)
    base = urllib.parse.urlsplit(endpoint)
    path = urllib.parse.unquote(url.path).lstrip("/")
    own = f"{urllib.parse.unquote(base.path).strip('/')}/{container}/".lstrip("/")
    if url.netloc.lower() == base.netloc.lower() and path.startswith(own) and path[len(own):] and not url.query:
        return path[len(own):]
    raise CrashcartError(f"--evidence-blob {printable(given)[:300]} is a URL outside the evidence "
                         f"container {container} at {endpoint}",
                         "give the blob name <vm key>/<stamp>/rollback-manifest.json, not a URL of another container",
                         ExitCode.USAGE)


def run_live(args: argparse.Namespace) -> int:
    """rollback --live: the newest live manifest (file, evidence blob, or newest local for the config's VM)."""
    if args.delete_copy or args.leave_stopped:
        raise CrashcartError("--delete-copy and --leave-stopped are for the disk swap, not --live", "drop them",
                             ExitCode.USAGE)
    config = None
    if not args.manifest and (args.config or Path(DEFAULT_PATH).exists()):
        config = Config.load(args.config)
    if args.manifest:
        manifest = live.load_local(args.manifest)
    elif args.evidence_blob:
        if config is None:
            raise CrashcartError("--evidence-blob needs the config (for the evidence account)",
                                 "pass --config, or --manifest with a local copy", ExitCode.USAGE)
        name = blob_name(args.evidence_blob, config.evidence_blob_endpoint, config.evidence.container)
        container = evidence.container_client(config.evidence_blob_endpoint, config.evidence.container)
        manifest = live.load_from_evidence(container, name, args.out_dir)
    elif config is not None:
        manifest = live.load_local(live.newest_local(args.out_dir, config.source.vm_id))
    else:
        raise CrashcartError("no --manifest given and no config to find the newest live manifest",
                             "pass --manifest crashcart-out/<vm key>/<stamp>/live-manifest.json", ExitCode.USAGE)
    timing = prepare.Timing(agent_wait_s=args.agent_wait_minutes * 60, poll_s=args.poll_seconds)
    emit_json(rollback_live(manifest, timing=timing))
    return int(ExitCode.OK)


def run(args: argparse.Namespace) -> int:
    numbers.check_options(args, {"poll_seconds": numbers.POLL_SECONDS, "agent_wait_minutes": numbers.WAIT_MINUTES})
    check_sources(args)
    if args.live:
        return run_live(args)
    config = None
    if not args.manifest and (args.config or Path(DEFAULT_PATH).exists()):
        config = Config.load(args.config)
    wanted = args.evidence_blob
    if wanted and config is not None:
        wanted = blob_name(wanted, config.evidence_blob_endpoint, config.evidence.container)
    manifest = rollback.find_manifest(path=args.manifest, evidence_blob=wanted, config=config,
                                      out_dir=args.out_dir)
    vm = ids.require(manifest.source_vm_id, "vm", rollback.MANIFEST_HINT)
    compute = AzureClients(vm.subscription).compute
    with step(f"roll back VM {vm.name} to its original OS disk {manifest.original_os_disk_name}"):
        result = rollback.restore(compute, manifest, rollback.evidence_container(manifest),
                                  delete_copy=args.delete_copy, leave_stopped=args.leave_stopped,
                                  poll_s=args.poll_seconds)
    for line in result.steps:
        log.info("    %s", line)
    emit_json({"rollback": result.to_dict(), "manifest": manifest.local_path})
    return int(ExitCode.OK)
