"""The fleet manifest: one blob in the evidence container that says where every VM of a fleet run stands.

`fleets/<fleet id>/fleet.json` lists each VM (by its resource ID, keyed by scripts.azure.identity.vm_key)
with its state:

    pending         not started yet (or the fleet stopped before it started)
    running         a repair-run for it is under way (runner: host, pid, fleet run)
    collected       its dump is in evidence; `report_blob` and `dumps` say where, a re-run verifies them
    failed          the run ended without a dump, `reason` says why (exit code in `exit_code`)
    left-for-rerun  stopped, throttled past its retries, or another run held its lock: run the fleet again

The blob is created once with If-None-Match: * (two shards starting together: one creates, the other
adds its VMs) and every later change is a read-modify-write with If-Match on the blob's ETag, retried
on a conflict, so runners on several machines (CI shards) can share it without losing an update. It is,
with the VM locks (scripts.run.lock), the only evidence blob the kit changes after creating it; it holds
no secret and no dump, only names, states and counts.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable, Iterable
from typing import Any

from scripts.azure.errors import translate_azure_error
from scripts.azure.identity import vm_key
from scripts.azure.poll import poll
from scripts.base.errors import CrashcartError, ExitCode
from scripts.evidence.blobs import STORAGE_HINTS, BlobExists, create_only
from scripts.run.lock import now

log = logging.getLogger("crashcart.fleet")

SCHEMA = "crashcart.fleet/1"
PENDING, RUNNING, COLLECTED, FAILED, RERUN = "pending", "running", "collected", "failed", "left-for-rerun"
STATES = (PENDING, RUNNING, COLLECTED, FAILED, RERUN)
CONFLICT_SECONDS = 120  # how long a read-modify-write keeps trying while other runners write first


def manifest_blob(fleet_id: str) -> str:
    return f"fleets/{fleet_id}/fleet.json"


def new_entry(vm_id: str) -> dict[str, Any]:
    return {"vm_id": vm_id, "key": vm_key(vm_id), "state": PENDING, "reason": None, "exit_code": None,
            "attempts": 0, "runner": None, "run_id": None, "started_at": None, "finished_at": None,
            "report_blob": None, "dumps": [], "stop_code": None, "stop_name": None, "culprit": None,
            "fix": None, "log": None}


FIELDS = {"vm_id", "key", "state", "reason", "exit_code", "attempts", "runner", "run_id", "started_at",
          "finished_at", "report_blob", "dumps", "stop_code", "stop_name", "culprit", "fix", "log"}


class FleetManifest:
    """The manifest blob: `open()` creates or joins it, `update()` changes one VM's entry safely."""

    def __init__(self, container: Any, fleet_id: str):
        self.container = container
        self.fleet_id = fleet_id
        self.name = manifest_blob(fleet_id)
        self.blob = container.get_blob_client(self.name)
        self.document: dict[str, Any] = {}
        self._lock = threading.Lock()  # one writer per process; other processes meet at the ETag

    # ---- reading and writing -----------------------------------------------------------------------------
    def read(self) -> tuple[dict[str, Any], str] | None:
        """The document and its ETag, or None when the blob does not exist."""
        from azure.core.exceptions import AzureError, ResourceNotFoundError

        try:
            downloaded = self.blob.download_blob()
            data = downloaded.readall()
            etag = downloaded.properties.etag
        except ResourceNotFoundError:
            return None
        except AzureError as err:
            raise self._error(err, "read") from None
        try:
            document = json.loads(data)
            if not isinstance(document, dict) or document.get("schema") != SCHEMA:
                raise ValueError("not a fleet manifest")
        except (ValueError, RecursionError):
            raise CrashcartError(f"the evidence blob {self.name} is not a crashcart fleet manifest",
                                 "choose another --fleet-id (the blob is kept as it is)", ExitCode.USAGE) from None
        return document, etag

    def _write(self, document: dict[str, Any], etag: str) -> bool:
        """Replaces the blob if it is still at `etag`; False when another runner changed it first."""
        from azure.core import MatchConditions
        from azure.core.exceptions import AzureError, HttpResponseError
        from azure.storage.blob import ContentSettings

        document["updated_at"] = now()
        try:
            self.blob.upload_blob(json.dumps(document, indent=1, sort_keys=True).encode(), overwrite=True,
                                  etag=etag, match_condition=MatchConditions.IfNotModified,
                                  content_settings=ContentSettings(content_type="application/json"))
            return True
        except HttpResponseError as err:
            if err.status_code == 412:
                return False
            raise self._error(err, "update") from None
        except AzureError as err:
            raise self._error(err, "update") from None

    def open(self, vm_ids: Iterable[str], created_by: str = "") -> dict[str, Any]:
        """Creates the manifest with these VMs (If-None-Match: *), or joins the existing one and adds the
        VMs it does not list yet (a shard of the same fleet, or a longer list). Returns the document."""
        from azure.storage.blob import ContentSettings

        wanted = list(vm_ids)
        document = {"schema": SCHEMA, "fleet_id": self.fleet_id, "created_at": now(), "updated_at": now(),
                    "created_by": created_by, "vms": {vm_key(v): new_entry(v) for v in wanted}}
        data = json.dumps(document, indent=1, sort_keys=True).encode()
        with self._lock:
            if self.read() is None:
                try:
                    create_only(self.container, self.name, lambda conditions: self.blob.upload_blob(
                        data, content_settings=ContentSettings(content_type="application/json"), **conditions),
                        f"create {self.name}")
                    log.info("fleet %s: created its manifest %s (%d VMs)", self.fleet_id, self.name, len(wanted))
                    self.document = document
                    return document
                except BlobExists:
                    pass  # another runner created it a moment ago: joined below
        # It exists (now): add what it lacks.
        return self.change(lambda doc: [doc["vms"].setdefault(vm_key(v), new_entry(v)) for v in wanted])

    def change(self, mutate: Callable[[dict[str, Any]], Any]) -> dict[str, Any]:
        """Read, `mutate(document)`, write with If-Match; again on a conflict (another runner wrote in
        between), for up to CONFLICT_SECONDS. Returns the written document."""

        def attempt() -> dict[str, Any] | None:
            found = self.read()
            if found is None:
                raise CrashcartError(f"the fleet manifest {self.name} disappeared from the evidence container",
                                     "run the fleet again: it creates a new manifest", ExitCode.AZURE_FAILED)
            document, etag = found
            mutate(document)
            return document if self._write(document, etag) else None

        with self._lock:
            self.document = poll(attempt, timeout_s=CONFLICT_SECONDS, interval_s=0.02, max_interval_s=0.5,
                                 backoff=1.5, jitter=0.5, on_timeout=lambda: CrashcartError(
                                     f"could not update {self.name}: other runners kept changing it for "
                                     f"{CONFLICT_SECONDS}s", "too many runners share this fleet at once; run "
                                     "fewer shards", ExitCode.AZURE_FAILED))
            return self.document

    def update(self, key: str, **fields: Any) -> dict[str, Any]:
        """Sets fields of one VM's entry; returns the entry as written."""
        unknown = set(fields) - FIELDS
        if unknown or ("state" in fields and fields["state"] not in STATES):
            raise ValueError(f"bad manifest fields {sorted(unknown)} / state {fields.get('state')}")

        def mutate(document: dict[str, Any]) -> None:
            document["vms"][key].update(fields)

        return self.change(mutate)["vms"][key]

    def entries(self) -> dict[str, dict[str, Any]]:
        return dict(self.document.get("vms") or {})

    def _error(self, err: BaseException, doing: str) -> CrashcartError:
        return translate_azure_error(err, f"the fleet manifest {self.name}", doing=f"{doing} {self.name}",
                                     hints=STORAGE_HINTS)


def counts(entries: dict[str, dict[str, Any]]) -> dict[str, int]:
    """How many VMs are in each state."""
    found = {state: 0 for state in STATES}
    for entry in entries.values():
        found[entry.get("state") or PENDING] = found.get(entry.get("state") or PENDING, 0) + 1
    return found


def verify_collected(container: Any, entry: dict[str, Any]) -> str | None:
    """A collected VM's evidence, checked before the fleet skips it: its report blob and every dump it
    recorded exist, each dump at its recorded size. None when it holds; else what is wrong."""
    from azure.core.exceptions import AzureError, ResourceNotFoundError

    names = [entry.get("report_blob")] + [d.get("blob") for d in entry.get("dumps") or []]
    if not entry.get("report_blob") or not entry.get("dumps"):
        return "the manifest names no report or no dump for it"
    sizes = {d.get("blob"): d.get("size") for d in entry.get("dumps") or []}
    for name in names:
        try:
            props = container.get_blob_client(name).get_blob_properties()
        except ResourceNotFoundError:
            return f"{name} is missing from the evidence container"
        except AzureError as err:
            raise translate_azure_error(err, f"the evidence blob {name}", doing=f"verify {name}",
                                        hints=STORAGE_HINTS) from None
        expected = sizes.get(name)
        if expected is not None and props.size != expected:
            return f"{name} holds {props.size} bytes, the collection recorded {expected}"
    return None
