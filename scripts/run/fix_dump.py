"""After the fixed copy crashed again: the dump that crash wrote, collected from the copy beside the first.

When `fix --verify` sees a new bugcheck, the verified boot rolls the VM back to its original OS disk, and
the rollback (scripts.nodump.rollback.restore) puts the fixed copy back on the rescue VM at its LUN. The
crash may have written a dump onto the copy (CrashControl decides: MEMORY.DMP, a minidump, or none). It is
collected with the rescue-vm strategy, the stack's own collect script as a Run Command, because that is what
a fix run always has: the repair stack's rescue VM (the fix's recipes ran there a moment ago), the copy
attached to it, and the rescue VM identity's write access to the evidence container. A snapshot export of the
copy would need rights the fix does not otherwise use (snapshot create and grant-access in the repair group)
and a snapshot made and deleted; `pipenv run collect --strategy snapshot-export` remains the way to do it by
hand.

Nothing is overwritten: the collection has its own run prefix (`<vm key>/<UTC stamp>/`: a prefix that holds
a report is refused before anything runs, every blob is create-only), so the first collection's dump stays as
it was. A collected dump whose SHA-256 or CRC-64 is a first dump's is the earlier crash's, still on the copy,
not a new one: it is said so. The record (`new_dump` in the fix manifest and the fix report) names the first
dumps and the new ones with their blob names, sizes and hashes, or says why there is none.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
from pathlib import Path
from typing import Any

from scripts.base.console import step
from scripts.base.errors import CrashcartError
from scripts.base.stop import StopRequest
from scripts.collection.contract import CollectError, CollectRequest, CollectResult, run_prefix
from scripts.config.stackoutputs import RepairOutputs

log = logging.getLogger("crashcart.fix")

STRATEGY = "rescue-vm"
KEPT = ("name", "kind", "size", "sha256", "crc64", "crc64_by", "source_path")


def _dump(blob: dict[str, Any]) -> dict[str, Any]:
    """One dump as recorded here, from a CollectResult blob (name, ok) or a report.json dump (blob, verified)."""
    return {k: blob.get(k) for k in KEPT} | {"name": blob.get("name") or blob.get("blob")}


def _dumps_of(document: dict[str, Any] | None) -> list[dict[str, Any]]:
    """The verified dumps of a collection: its result (`blobs`) or its report.json (`dumps`)."""
    if not isinstance(document, dict):
        return []
    if isinstance(document.get("blobs"), list):
        return [_dump(b) for b in document["blobs"] if isinstance(b, dict) and b.get("ok") and b.get("name")]
    return [_dump(d) for d in document.get("dumps") or [] if isinstance(d, dict) and d.get("verified") and d.get("blob")]


def first_dumps(collect: dict[str, Any] | None, out_dir: Path, vm_id: str) -> list[dict[str, Any]]:
    """The dumps collected before the fix (blob name, kind, size, SHA-256, CRC-64): repair-run's collection
    result when given, else the newest collection report of this VM under `out_dir` ([] when none is known)."""
    if collect is not None:
        return _dumps_of(collect)
    folder = out_dir / run_prefix(vm_id, "x").split("/")[0]
    for path in reversed(sorted(folder.glob("*/report.json")) if folder.is_dir() else []):
        try:
            found = _dumps_of(json.loads(path.read_text(encoding="utf-8")))
        except (OSError, ValueError):
            continue
        if found:
            return found
    return []


def _same(blob: dict[str, Any], first: list[dict[str, Any]]) -> dict[str, Any] | None:
    for old in first:
        if (blob.get("sha256") and blob.get("sha256") == old.get("sha256")) or \
                (blob.get("crc64") and blob.get("crc64") == old.get("crc64") and blob.get("size") == old.get("size")):
            return old
    return None


def collect_new_dump(outputs: RepairOutputs, *, first: list[dict[str, Any]], out_dir: Path, agent_wait_s: float,
                     poll_s: float, stop: StopRequest | None = None, now: dt.datetime | None = None) -> dict[str, Any]:
    """Collects what the crash left on the fixed copy (now back on the rescue VM); never raises for the
    collection's own failures: the record says what happened and what to run."""
    from scripts.collection.rescue_vm import RescueVmCollector

    record: dict[str, Any] = {"strategy": STRATEGY, "first_dumps": first, "collected": False, "run": None,
                              "dumps": [], "same_as_first": [], "report": None, "message": ""}
    request = CollectRequest(outputs, None, progress=False, out_dir=out_dir, agent_wait_minutes=agent_wait_s / 60,
                             poll_seconds=poll_s, now=now, stop=stop, symptoms_folder="bootdiag/after-rollback")
    result: CollectResult | None
    with step("collect the dump the crash wrote on the fixed copy (rescue-vm, beside the first dump)"):
        try:
            result = RescueVmCollector().collect(request)
            failure: CrashcartError | None = None
        except CollectError as err:
            result, failure = err.result, err
        except CrashcartError as err:
            result, failure = None, err
    again = ("collect it by hand: `pipenv run collect --strategy rescue-vm --outputs-file <the repair stack's "
             "outputs>` (the fixed copy is on the rescue VM at LUN "
             f"{outputs.disk_copy_lun}); the first dump stays as it is")
    if result is not None:
        record.update(run=result.run, report=result.report_files.get("json"), status=result.status)
    if result is not None and result.status == "no_dump":
        record["message"] = "the crash wrote no dump on the fixed copy (none found there; see its CrashControl)"
    elif failure is not None:
        record["message"] = f"the new dump could not be collected ({failure.message}): {again}"
    if result is None or not result.ok:
        log.warning("    %s", record["message"])
        return record
    for blob in (b.to_dict() for b in result.dumps):
        old = _same(blob, first)
        if old is None:
            record["dumps"].append(_dump(blob))
        else:
            record["same_as_first"].append({**_dump(blob), "first": old.get("name")})
    record["collected"] = bool(record["dumps"])
    if record["dumps"]:
        record["message"] = (f"the new dump is in evidence: {', '.join(d['name'] for d in record['dumps'])} "
                             f"(the first: {', '.join(d['name'] for d in first) or 'not known to this run'})")
    else:
        record["message"] = ("the crash wrote no new dump: the fixed copy holds only the dump collected before "
                             f"({', '.join(d['first'] for d in record['same_as_first'])})")
    log.info("    %s", record["message"])
    return record
