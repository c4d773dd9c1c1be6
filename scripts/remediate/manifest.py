"""The fix manifest: every change a fix made to the disk copy, old and new, and how to undo it.

One per `fix` run: `crashcart-out/<vm key>/<stamp>/fix-manifest.json` locally and
`<vm key>/<stamp>/fix/fix-manifest.json` in evidence. Each recipe applied is an entry with the script's
answer (changes with old/new values, quarantined files with SHA-256, the hive's SHA-256 before and after)
and the parameters that undo it. Evidence blobs are create-only (scripts.evidence.blobs.create_only):
each later state of the manifest is a new blob beside the first (`fix-manifest.<n>-<state>.json`) and a
reader takes the newest. The state follows the run: planned | applying | applied | undone, and with a
verified boot: verifying | kept | rolled-back.
"""

from __future__ import annotations

import datetime as dt
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from scripts.base.errors import CrashcartError, ExitCode
from scripts.evidence import series

log = logging.getLogger("crashcart.fix")

SCHEMA = "crashcart.fix/1"
MANIFEST_NAME = "fix-manifest.json"


@dataclass
class FixEntry:
    recipe: dict[str, Any]
    step: str  # names the run command and the backups (the script's RunId)
    result: dict[str, Any]  # the script's answer
    undo: dict[str, str] | None  # the parameters that put it back; None: nothing to undo
    undone: bool = False
    undo_result: dict[str, Any] | None = None


@dataclass
class FixManifest:
    run: str  # <vm key>/<stamp>
    source_vm_id: str
    disk_copy_id: str
    rescue_vm_id: str
    rescue_os: str
    disk_lun: int
    dry_run: bool
    evidence_blob_endpoint: str
    evidence_container: str
    state: str = "planned"
    entries: list[FixEntry] = field(default_factory=list)
    verify: dict[str, Any] | None = None
    rollback_manifest: str = ""  # the swap's rollback manifest (local path), when the fixed copy was booted
    # after a failed verified boot: the dump the crash wrote on the fixed copy, collected beside the first dumps
    # (scripts.run.fix_dump: first_dumps, dumps, same_as_first, run, message), or why there is none
    new_dump: dict[str, Any] | None = None
    created_at: str = ""
    history: list[dict[str, str]] = field(default_factory=list)
    local_path: str = ""
    evidence_blob: str = ""
    schema: str = SCHEMA

    def mark(self, state: str, note: str = "") -> None:
        self.state = state
        self.history.append({"at": _now(), "state": state, **({"note": note} if note else {})})

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Any, where: str) -> "FixManifest":
        if not isinstance(data, dict) or data.get("schema") != SCHEMA:
            raise CrashcartError(f"{where} is not a crashcart fix manifest ({SCHEMA})",
                                 "pass the fix-manifest.json `pipenv run fix` wrote", ExitCode.USAGE)
        try:
            entries = [FixEntry(**e) for e in data.get("entries") or []]
            names = set(cls.__dataclass_fields__) - {"entries"}
            return cls(**{k: v for k, v in data.items() if k in names}, entries=entries)
        except TypeError as err:
            raise CrashcartError(f"{where} is damaged ({err})", "use the copy in evidence (--evidence-blob)",
                                 ExitCode.USAGE) from None


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def new(*, run: str, out_dir: Path, outputs: Any, dry_run: bool) -> FixManifest:
    manifest = FixManifest(
        run=run, source_vm_id=outputs.source_vm_id, disk_copy_id=outputs.disk_copy_id,
        rescue_vm_id=outputs.rescue_vm_id, rescue_os=outputs.rescue_os, disk_lun=outputs.disk_copy_lun,
        dry_run=dry_run, evidence_blob_endpoint=outputs.evidence_blob_endpoint,
        evidence_container=outputs.evidence_container, created_at=_now(),
        local_path=str(out_dir / MANIFEST_NAME), evidence_blob=f"{run}/fix/{MANIFEST_NAME}")
    manifest.mark("planned" if dry_run else "applying")
    return manifest


# Stored as a series (scripts.evidence.series). save(manifest, container, require_evidence=): locally (rewritten
# in place), then a new create-only blob in evidence; with `require_evidence` a failed upload raises (before the
# first change: no change without the manifest), else it is told.
SERIES = series.Series(MANIFEST_NAME, "fix manifest", "pass the fix-manifest.json `pipenv run fix` wrote: the file "
                       "under crashcart-out/<vm key>/<stamp>/ (--manifest) or its blob (--evidence-blob)",
                       "the disk copy", FixManifest.from_dict, folder="fix/", logger=log.name)
save = SERIES.save


def load(*, path: Path | None, evidence_blob: str | None, container: Any | None) -> FixManifest:
    """The manifest from a local file, or the newest state of it in evidence."""
    if path is not None:
        return FixManifest.from_dict(SERIES.read_local(path), str(path))
    if not evidence_blob or container is None:
        raise CrashcartError("no fix manifest named", "pass --manifest PATH or --evidence-blob NAME", ExitCode.USAGE)
    return SERIES.load_newest(container, evidence_blob)
