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
import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from scripts.base.errors import CrashcartError, ExitCode
from scripts.evidence import blobs as evidence

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


def save(manifest: FixManifest, container: Any | None, *, require_evidence: bool) -> None:
    """Locally (rewritten in place), then a new create-only blob in evidence. With `require_evidence` a
    failed upload raises (before the first change: no change without the manifest); else it is told."""
    path = Path(manifest.local_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(manifest.to_dict(), indent=2, sort_keys=True, default=str)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text + "\n", encoding="utf-8")
    tmp.replace(path)
    if container is None:
        return
    try:
        first = f"{manifest.run}/fix/{MANIFEST_NAME}"
        stem = first.removesuffix(".json")
        names = set(evidence.list_names(container, stem))
        later = [n for n in names if n.startswith(stem + ".") and n != first]
        blob = first if first not in names else f"{stem}.{len(later) + 1:02d}-{manifest.state}.json"
        evidence.upload_text(container, blob, text, "application/json")
        manifest.evidence_blob = blob
    except CrashcartError as err:
        if require_evidence:
            raise CrashcartError(f"the fix manifest could not be stored in evidence: {err.message}",
                                 f"nothing was changed on the disk copy; fix access to the evidence container "
                                 f"({err.hint}) and re-run", err.exit_code) from None
        log.warning("the fix manifest could not be updated in evidence (%s); the local copy %s is current",
                    err.message, path)


def load(*, path: Path | None, evidence_blob: str | None, container: Any | None) -> FixManifest:
    """The manifest from a local file, or the newest state of it in evidence."""
    if path is not None:
        try:
            return FixManifest.from_dict(json.loads(path.read_text(encoding="utf-8")), str(path))
        except (OSError, ValueError) as err:
            raise CrashcartError(f"cannot read the fix manifest {path}: {err}",
                                 "pass the fix-manifest.json under crashcart-out/<vm>/<stamp>/", ExitCode.USAGE) from None
    if not evidence_blob or container is None:
        raise CrashcartError("no fix manifest named", "pass --manifest PATH or --evidence-blob NAME", ExitCode.USAGE)
    first = evidence_blob if evidence_blob.endswith(MANIFEST_NAME) else evidence_blob.rsplit(".", 2)[0] + ".json"
    stem = first.removesuffix(".json")
    later = sorted(n for n in evidence.list_names(container, stem + ".") if n.endswith(".json") and n != first)
    newest = later[-1] if later else first  # fix-manifest.<nn>-<state>.json: the numbers sort in order
    data = evidence.read_bytes(container, newest)
    if data is None:
        raise CrashcartError(f"evidence blob {first} does not exist", "check the name (<vm key>/<stamp>/fix/"
                             f"{MANIFEST_NAME})", ExitCode.AZURE_NOT_FOUND)
    try:
        return FixManifest.from_dict(json.loads(data), newest)
    except ValueError:
        raise CrashcartError(f"{newest} is not JSON", "use the local copy (--manifest)", ExitCode.USAGE) from None
