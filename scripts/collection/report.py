"""The collection report: report.json for pipelines, report.md for the support ticket.

Written to `crashcart-out/<vm key>/<run stamp>/` and uploaded beside the dumps as
`<vm key>/<run stamp>/report.{json,md}` (the key: scripts.azure.identity.vm_key, the VM's name plus a hash
of its resource ID), once per run and never over an earlier file or blob (If-None-Match: *; a local file
is created, never replaced). It names every blob with its URL, size, SHA-256, CRC-64 (and who computed it), stop code
and whether verification passed, plus what the rescue VM noticed (CrashControl, page file location).
It never holds a secret: SAS links go to the verb's stdout only, the report just says that they were
made and until when. It is built from the contract's CollectResult (and the repair stack's outputs)
alone, so both strategies get the same report.
"""

from __future__ import annotations

import datetime as dt
import functools
import json
import logging
from pathlib import Path
from typing import Any

from scripts.azure import ids
from scripts.base.errors import CrashcartError, ExitCode
from scripts.collection.contract import CollectError, CollectResult, failure_status
from scripts.config.stackoutputs import RepairOutputs

SCHEMA = "crashcart.report/1"


def _bugcheck_name(code: str | None) -> str | None:
    if not code:
        return None
    try:
        from scripts.dumpfile.bugcheck import bugcheck_name

        return bugcheck_name(int(code, 0))
    except (ImportError, ValueError):
        return None


def build(result: CollectResult, outputs: RepairOutputs, now: dt.datetime | None = None) -> dict[str, Any]:
    """The report document (JSON-ready) of one collection."""
    vm = ids.try_parse(outputs.source_vm_id, "vm")
    dumps = []
    for blob in result.blobs:
        header = blob.header or {}
        dumps.append({
            "blob": blob.name, "url": blob.url, "kind": blob.kind, "source_path": blob.source_path,
            "size": blob.size, "sha256": blob.sha256, "sha256_checked": blob.sha256_checked,
            # the CRC-64 Azure Storage computes: composed from the service's per-block answers (service), or
            # computed where the dump was read (rescue-vm, kit); checked = recomputed from the stored blob
            "crc64": blob.crc64, "crc64_by": blob.crc64_by, "crc64_checked": blob.crc64_checked,
            "dump_type": header.get("dump_type"), "dump_kind": header.get("kind"),
            "bugcheck_code": header.get("bugcheck_code"), "bugcheck_name": _bugcheck_name(header.get("bugcheck_code")),
            "bugcheck_parameters": header.get("bugcheck_parameters"), "system_time": header.get("system_time"),
            "verified": blob.ok, "problems": list(blob.problems),
        })
    primary = next((d for d in dumps if d["verified"] and d["bugcheck_code"]), None)
    return {
        "schema": SCHEMA,
        "generated_at": (now or dt.datetime.now(dt.timezone.utc)).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "run": result.run,
        "status": result.status,
        "exit_code": result.exit_code,
        "message": result.message,
        "hint": result.hint,
        "source": {"vm_id": outputs.source_vm_id, "vm_name": vm.name if vm else result.run.split("/")[0],
                   "resource_group": vm.resource_group if vm else None,
                   "subscription_id": vm.subscription if vm else None, "vm_key": result.run.split("/")[0],
                   "os_disk_id": outputs.source_os_disk_id, "snapshot_id": outputs.snapshot_id,
                   "disk_copy_id": outputs.disk_copy_id},
        "rescue": {"vm_id": outputs.rescue_vm_id, "os": outputs.rescue_os},
        "evidence": {"account": outputs.evidence_account_name, "container": outputs.evidence_container,
                     "container_url": result.container_url, "prefix": result.run},
        "bugcheck": None if primary is None else {
            "code": primary["bugcheck_code"], "name": primary["bugcheck_name"],
            "parameters": primary["bugcheck_parameters"], "blob": primary["blob"]},
        "dumps": dumps,
        "notes": list(result.notes),
        "crash_control": result.crash_control,
        "volume": result.volume,
        "symptoms": result.symptoms,
        "triage": result.triage,
        "strategy": result.strategy,
        # snapshot-export's account of what it read, copied and cleaned up (absent for rescue-vm)
        "export": result.export or None,
        "run_command": dict(result.run_command),
        "logs": dict(result.logs),
        "sas": {"count": len(result.sas), "expiry": result.sas_expiry} if result.sas else None,
    }


@functools.lru_cache(maxsize=1)
def _template():
    import jinja2

    env = jinja2.Environment(loader=jinja2.FileSystemLoader(str(Path(__file__).parent / "templates")),
                             undefined=jinja2.ChainableUndefined, autoescape=False, trim_blocks=True,
                             keep_trailing_newline=True)
    env.filters["md"] = lambda text: str(text or "").replace("|", "\\|").replace("\n", " ")
    return env.get_template("report.md.j2")


def markdown(report: dict[str, Any]) -> str:
    return _template().render(r=report)


def write(report: dict[str, Any], folder: Path) -> dict[str, str]:
    """report.json and report.md in `folder` (created); returns their paths. An existing report there is
    another run's: a CrashcartError, and neither file is touched."""
    folder.mkdir(parents=True, exist_ok=True)
    files = {"json": (folder / "report.json", json.dumps(report, indent=2, sort_keys=True) + "\n"),
             "markdown": (folder / "report.md", markdown(report))}
    taken = [str(path) for path, _ in files.values() if path.exists()]
    if taken:
        raise CrashcartError(f"{taken[0]} already exists: an earlier run with the same stamp wrote it; it was kept",
                             "this run's result is the JSON on stdout", ExitCode.COLLECT_FAILED)
    for path, text in files.values():
        with path.open("x", encoding="utf-8") as handle:  # created, never replaced
            handle.write(text)
    return {key: str(path) for key, (path, _) in files.items()}


def upload(container: Any, prefix: str, report: dict[str, Any]) -> dict[str, str]:
    """Uploads report.json and report.md beside the dumps; returns their URLs."""
    from scripts.evidence import blobs as evidence

    return {
        "json": evidence.upload_text(container, f"{prefix}/report.json", json.dumps(report, indent=2, sort_keys=True),
                                     "application/json"),
        "markdown": evidence.upload_text(container, f"{prefix}/report.md", markdown(report), "text/markdown"),
    }


def refuse_if_reported(container: Any, prefix: str) -> None:
    """Before a collection starts: a report under `prefix` means a run of this VM with this stamp already
    ended there. Refused (BlobExists, exit 12) before anything is done, so nothing of it is touched."""
    from scripts.evidence import blobs as evidence

    name = f"{prefix}/report.json"
    if evidence.properties(container, name) is not None:
        raise evidence.BlobExists(name, f"a collection of this VM with the same run stamp already stored its report "
                                        f"({name}): this run was refused before it started, nothing was overwritten")


def claim(result: CollectResult, container: Any, prefix: str) -> None:
    """refuse_if_reported for a collector about to start: the refusal becomes the run's result (CollectError)."""
    try:
        refuse_if_reported(container, prefix)
    except CrashcartError as err:  # a run of this VM with this stamp ended here: touch nothing of it
        result.conclude(failure_status(err), err.message, err.hint, cause=err)
        raise CollectError.of(result) from None


def store(result: CollectResult, outputs: RepairOutputs, folder: Path, container: Any, prefix: str) -> None:
    """The report of a collection, written once: locally first (it survives an upload failure), then beside
    the dumps. Either one failing is a warning, never the reason a run with stored dumps fails."""
    document = build(result, outputs)
    log = logging.getLogger("crashcart")
    try:
        result.report_files = write(document, folder)
    except (CrashcartError, OSError) as err:
        log.warning("the report could not be written locally: %s", getattr(err, "message", None) or err)
    try:
        result.report_blobs = upload(container, prefix, document)
    except CrashcartError as err:
        log.warning("the report could not be stored in the container: %s", err.message)
