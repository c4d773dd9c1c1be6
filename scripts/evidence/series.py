"""A manifest kept as a series of states: rewritten in place locally, create-only in the evidence container.

The one way the kit keeps a manifest that changes as a run goes on (the swap's rollback manifest, the live
prepare's manifest, the fix manifest under `fix/`): each keeps its own dataclass and fields (the rollback and
live manifests take their bookkeeping fields and `mark` from `Tracked`); this module stores and finds them. In evidence nothing is ever replaced (scripts.evidence.blobs writes If-None-Match: *),
so every state is a new blob beside the first:

    <folder>/<name>.json               the first state
    <folder>/<name>.01-<state>.json    each later state, numbered in the order written
    <folder>/<name>.02-<state>.json    ...

The numbers come from listing the container, so a later process (a re-run of `rollback`) continues the
series, and a reader takes the newest by listing too (named by the first blob, any later one, or the folder). Locally the file is one, rewritten through a
temporary file (never half written).
"""

from __future__ import annotations

import datetime as dt
import json
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from scripts.azure.identity import vm_key
from scripts.base import userfiles
from scripts.base.errors import CrashcartError, ExitCode
from scripts.evidence import blobs as evidence

LIST_HINT = "list them with `az storage blob list --auth-mode login ... --prefix <vm key>/`"


def now() -> str:
    """A manifest's time stamp (UTC, to the second)."""
    return dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass(kw_only=True)
class Tracked:
    """What a manifest of a series keeps about itself (each manifest adds its own fields and `state`)."""

    created_at: str = ""
    updated_at: str = ""
    history: list[dict[str, str]] = field(default_factory=list)
    local_path: str = ""
    evidence_blob: str = ""

    def mark(self, state: str, note: str = "") -> None:
        """The run reached `state`: it becomes the state, and a line of the history."""
        at = now()
        self.state, self.updated_at = state, at  # type: ignore[attr-defined]
        self.history.append({"at": at, "state": state, **({"note": note} if note else {})})


@dataclass(frozen=True)
class Series:
    """One kind of manifest: its file name, what the errors call it, and what a user does about an
    unreadable one (`hint`). A manifest is any object with `run` (<vm key>/<stamp>), `state`, `local_path`,
    `evidence_blob` and `to_dict()`."""

    name: str  # e.g. "rollback-manifest.json": the first blob's and the local file's name
    what: str  # e.g. "rollback manifest"
    hint: str
    untouched: str  # what a failed first save leaves unchanged: "the VM"
    from_dict: Callable[[Any, str], Any]  # the manifest from its JSON (checked), given where it was read
    folder: str = ""  # below the run's prefix in evidence ("fix/"); locally the file is in the run's folder
    logger: str = "crashcart"

    @property
    def stem(self) -> str:
        return self.name.removesuffix(".json")

    def first(self, blob: str) -> str:
        """The run's first blob, given it, any later state's blob or the run's folder (ending in "/")."""
        folder, _, base = blob.rpartition("/")
        return f"{folder}/{self.name}" if folder and (not base or base.startswith(self.stem)) else blob

    @staticmethod
    def later(names: Iterable[str], first: str) -> list[str]:
        """The blobs of the states after `first`, in the order they were written."""
        stem = first.removesuffix(".json")
        return sorted(n for n in names if n != first and n.startswith(stem + ".") and n.endswith(".json"))

    def next_blob(self, container: Any, first: str, state: str) -> str:
        """Where the next state goes: `first` while it is not there, else a new numbered blob."""
        stem = first.removesuffix(".json")
        names = set(evidence.list_names(container, stem))
        return first if first not in names else f"{stem}.{len(self.later(names, first)) + 1:02d}-{state}.json"

    def save(self, manifest: Any, container: Any | None, *, require_evidence: bool) -> None:
        """Writes the manifest to its `local_path`, then as the next blob of its series in evidence (and
        points `evidence_blob` at it). With `require_evidence` a failed upload raises: the caller changes
        nothing without both copies; else it is told and the local copy stands."""
        path = Path(manifest.local_path)
        path.parent.mkdir(parents=True, exist_ok=True)
        text = json.dumps(manifest.to_dict(), indent=2, sort_keys=True, default=str)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(text + "\n", encoding="utf-8")
        tmp.replace(path)
        if container is None:
            return
        first = (self.first(manifest.evidence_blob) if manifest.evidence_blob
                 else f"{manifest.run}/{self.folder}{self.name}")
        try:
            blob = self.next_blob(container, first, manifest.state)
            evidence.upload_text(container, blob, text, "application/json")
            manifest.evidence_blob = blob
        except CrashcartError as err:
            if require_evidence:
                raise CrashcartError(f"the {self.what} could not be stored in evidence: {err.message}",
                                     f"nothing was changed on {self.untouched}; " + _then_rerun(err.hint),
                                     err.exit_code) from None
            logging.getLogger(self.logger).warning(
                "the %s could not be updated in evidence (%s); the local copy %s is current", self.what,
                err.message, path)

    def load_local(self, path: Path) -> Any:
        """The manifest in a local file, kept there."""
        manifest = self.from_dict(self.read_local(path), str(path))
        manifest.local_path = str(path)
        return manifest

    def load_newest(self, container: Any, blob: str, out_dir: Path | None = None) -> Any:
        """The newest state in evidence of the series `blob` belongs to (its first blob, any later one, or
        the folder); kept locally under `out_dir`/<run>/ when given."""
        newest, data = self.read_newest(container, blob)
        manifest = self.from_dict(data, newest)
        if out_dir is not None:
            manifest.local_path = str(out_dir / manifest.run / self.name)
        manifest.evidence_blob = newest
        return manifest

    def newest_local(self, out_dir: Path, vm_id: str) -> Path:
        """The newest local manifest of a VM: `out_dir`/<vm key>/<stamp>/<name>."""
        folder = out_dir / vm_key(vm_id)
        found = sorted(folder.glob(f"*/{self.name}"))
        if not found:
            raise CrashcartError(f"no {self.what} under {folder}", self.hint, ExitCode.USAGE)
        return found[-1]

    def read_local(self, path: Path) -> Any:
        """The JSON of a local manifest file."""
        text = userfiles.read_text(path, "--manifest", self.hint, f"the {self.what}")  # not a pipe, UTF-8, a BOM dropped
        try:
            return json.loads(text)
        except ValueError as err:
            raise CrashcartError(f"cannot read the {self.what} {path}: {err}", self.hint, ExitCode.USAGE) from None

    def read_newest(self, container: Any, blob: str) -> tuple[str, Any]:
        """The newest blob of the series `blob` belongs to (see `first`), and its JSON."""
        first = self.first(blob)
        later = self.later(evidence.list_names(container, first.removesuffix(".json")), first)
        newest = later[-1] if later else first
        raw = evidence.read_bytes(container, newest)
        if raw is None:
            raise CrashcartError(f"no {self.what} at {newest} in the evidence container", LIST_HINT,
                                 ExitCode.AZURE_NOT_FOUND)
        try:
            return newest, json.loads(raw)
        except ValueError as err:  # not JSON, or not UTF-8
            raise CrashcartError(f"{newest} is not JSON: {err}", self.hint, ExitCode.USAGE) from None


def _then_rerun(hint: str) -> str:
    """What to do about the evidence container, ending in one "re-run" (the storage hints often end in one)."""
    hint = hint.strip().rstrip(".")
    return f"{hint}, then re-run" if "re-run" not in hint else hint
