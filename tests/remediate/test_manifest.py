"""The fix manifest (scripts/remediate/manifest.py): stored locally and in evidence, create-only.

Every state of a fix is a new blob beside the first (nothing the kit writes to evidence is replaced), and
a reader given any of them gets the newest; a manifest that is not one is refused with exit 2.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from scripts.base.errors import CrashcartError, ExitCode
from scripts.evidence import blobs as evidence
from scripts.remediate import manifest as fixmanifest


class Outputs:
    source_vm_id = "/subscriptions/s/resourceGroups/prod/providers/Microsoft.Compute/virtualMachines/web-01"
    disk_copy_id = "/subscriptions/s/resourceGroups/r/providers/Microsoft.Compute/disks/copy"
    rescue_vm_id = "/subscriptions/s/resourceGroups/r/providers/Microsoft.Compute/virtualMachines/rescue"
    rescue_os = "linux"
    disk_copy_lun = 0
    evidence_blob_endpoint = "http://127.0.0.1:10000/devstoreaccount1"
    evidence_container = "dumps"


def test_every_state_is_a_new_blob_and_the_reader_takes_the_newest(evidence_container, tmp_path):
    m = fixmanifest.new(run="web-01-1a2b3c4d/20250517T031245Z", out_dir=tmp_path, outputs=Outputs, dry_run=False)
    fixmanifest.save(m, evidence_container, require_evidence=True)
    m.entries.append(fixmanifest.FixEntry(recipe={"name": "disable-driver", "driver": "csagent"}, step="fix-1",
                                          result={"status": "applied", "changes": []},
                                          undo={"Recipe": "disable-driver", "StartValues": "ControlSet001=1"}))
    m.mark("applied")
    fixmanifest.save(m, evidence_container, require_evidence=False)
    m.mark("kept")
    fixmanifest.save(m, evidence_container, require_evidence=False)
    names = sorted(b.name for b in evidence_container.list_blobs())
    assert [n.rsplit("/", 1)[-1] for n in names] == ["fix-manifest.01-applied.json", "fix-manifest.02-kept.json",
                                                      "fix-manifest.json"]
    first = json.loads(evidence.read_bytes(evidence_container, "web-01-1a2b3c4d/20250517T031245Z/fix/fix-manifest.json"))
    assert first["state"] == "applying" and first["entries"] == []  # the first write stands, never replaced
    loaded = fixmanifest.load(path=None, evidence_blob="web-01-1a2b3c4d/20250517T031245Z/fix/fix-manifest.json",
                              container=evidence_container)
    assert loaded.state == "kept" and loaded.entries[0].undo["StartValues"] == "ControlSet001=1"
    assert fixmanifest.load(path=Path(m.local_path), evidence_blob=None, container=None).state == "kept"


def test_a_manifest_that_cannot_be_stored_first_stops_the_fix(evidence_container, tmp_path):
    m = fixmanifest.new(run="web-01-1a2b3c4d/20250517T031245Z", out_dir=tmp_path, outputs=Outputs, dry_run=False)
    evidence_container.delete_container()
    with pytest.raises(CrashcartError, match="the fix manifest could not be stored in evidence") as err:
        fixmanifest.save(m, evidence_container, require_evidence=True)
    assert "nothing was changed on the disk copy" in err.value.hint


class _NotSignedIn:
    """A container client whose every call fails as the storage SDK does when no credential can sign in."""

    container_name = "evidence"

    def __getattr__(self, name):
        def refuse(*args, **kwargs):
            from azure.core.exceptions import ClientAuthenticationError

            raise ClientAuthenticationError("DefaultAzureCredential failed to retrieve a token")
        return refuse


def test_not_signed_in_the_manifest_says_so_with_one_way_forward(tmp_path):
    """The CLI review: "... (run `az login` ... and re-run) and re-run"."""
    m = fixmanifest.new(run="web-01-1a2b3c4d/20250517T031245Z", out_dir=tmp_path, outputs=Outputs, dry_run=False)
    with pytest.raises(CrashcartError, match="could not be stored in evidence: could not sign in") as err:
        fixmanifest.save(m, _NotSignedIn(), require_evidence=True)
    assert err.value.hint.startswith("nothing was changed on the disk copy; run `az login`")
    assert err.value.hint.count("re-run") == 1 and "(" + "run `az login`" not in err.value.hint


def test_what_is_not_a_fix_manifest_is_refused(tmp_path):
    for text in ("{}", "[]", json.dumps({"schema": "crashcart.rollback/1"}), "not json",
                 json.dumps({"schema": fixmanifest.SCHEMA, "entries": [{"nonsense": 1}]})):
        path = tmp_path / "m.json"
        path.write_text(text)
        with pytest.raises(CrashcartError) as err:
            fixmanifest.load(path=path, evidence_blob=None, container=None)
        assert err.value.exit_code == ExitCode.USAGE
