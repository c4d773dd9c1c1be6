"""scripts.evidence.series: the one way the rollback, live and fix manifests are stored and found again."""

from __future__ import annotations

import json

import pytest

from scripts.base.errors import CrashcartError, ExitCode
from scripts.evidence import blobs as evidence
from scripts.nodump import live, rollback
from scripts.remediate import manifest as fixmanifest

RUN = "web-01-1a2b3c4d/20250517T031245Z"
VM = "/subscriptions/s/resourceGroups/g/providers/Microsoft.Compute/virtualMachines/web-01"


def _rollback(tmp_path):
    return rollback.RollbackManifest(
        source_vm_id=VM, original_os_disk_id=f"{VM}-os", original_os_disk_name="os", prepared_disk_id=f"{VM}-copy",
        rescue_vm_id=f"{VM}-rescue", rescue_lun=0, power_state_before="running", run=RUN,
        evidence_blob_endpoint="https://x", evidence_container="dumps",
        local_path=str(tmp_path / rollback.MANIFEST_NAME), evidence_blob=f"{RUN}/{rollback.MANIFEST_NAME}")


def _live(tmp_path):
    return live.LiveManifest(source_vm_id=VM, run=RUN, old={"AutoReboot": None}, new={"AutoReboot": None},
                             local_path=str(tmp_path / live.MANIFEST_NAME), evidence_blob=f"{RUN}/{live.MANIFEST_NAME}")


def _fix(tmp_path):
    class Outputs:
        source_vm_id, disk_copy_id, rescue_vm_id, rescue_os, disk_copy_lun = VM, f"{VM}-copy", f"{VM}-r", "linux", 0
        evidence_blob_endpoint, evidence_container = "https://x", "dumps"

    return fixmanifest.new(run=RUN, out_dir=tmp_path, outputs=Outputs, dry_run=False)


KINDS = {  # the manifest, its module, its folder under the run, how a state is read back
    "rollback": (_rollback, rollback, f"{RUN}/rollback-manifest",
                 lambda c, blob, out: rollback.load_from_evidence(c, blob, out)),
    "live": (_live, live, f"{RUN}/live-manifest", lambda c, blob, out: live.load_from_evidence(c, blob, out)),
    "fix": (_fix, fixmanifest, f"{RUN}/fix/fix-manifest",
            lambda c, blob, out: fixmanifest.load(path=None, evidence_blob=blob, container=c)),
}


def _first_and_applied(module, manifest, container):
    module.save(manifest, container, require_evidence=True)
    manifest.mark("applied")
    module.save(manifest, container, require_evidence=False)


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_every_manifest_numbers_its_states_alike_and_a_later_process_continues(kind, evidence_container, tmp_path):
    make, module, stem, load = KINDS[kind]
    _first_and_applied(module, make(tmp_path), evidence_container)
    again = load(evidence_container, f"{stem}.json", tmp_path / "again")  # another process, from the first blob
    assert again.state == "applied" and again.evidence_blob == f"{stem}.01-applied.json"
    again.local_path = str(tmp_path / "again.json")
    again.mark("restored")
    module.save(again, evidence_container, require_evidence=False)
    assert sorted(b.name for b in evidence_container.list_blobs()) == [
        f"{stem}.01-applied.json", f"{stem}.02-restored.json", f"{stem}.json"]
    assert json.loads(evidence.read_bytes(evidence_container, f"{stem}.json"))["state"] == make(tmp_path).state
    assert json.loads((tmp_path / "again.json").read_text())["state"] == "restored"


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_a_blob_beside_the_series_that_is_not_a_state_neither_counts_nor_is_read(kind, evidence_container, tmp_path):
    make, module, stem, load = KINDS[kind]
    manifest = make(tmp_path)
    module.save(manifest, evidence_container, require_evidence=True)
    evidence.upload_text(evidence_container, f"{stem}.json.bak", "not a state", "text/plain")
    manifest.mark("applied")
    module.save(manifest, evidence_container, require_evidence=False)
    assert manifest.evidence_blob == f"{stem}.01-applied.json"
    assert load(evidence_container, f"{stem}.json", tmp_path).state == "applied"


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_the_runs_folder_names_the_series_too(kind, evidence_container, tmp_path):
    make, module, stem, load = KINDS[kind]
    _first_and_applied(module, make(tmp_path), evidence_container)
    folder = stem.rpartition("/")[0] + "/"
    assert load(evidence_container, folder, tmp_path).state == "applied"


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_a_missing_or_damaged_blob_is_told_in_one_line(kind, evidence_container, tmp_path):
    make, module, stem, load = KINDS[kind]
    with pytest.raises(CrashcartError) as err:
        load(evidence_container, f"{stem}.json", tmp_path)
    assert err.value.exit_code == ExitCode.AZURE_NOT_FOUND
    assert f"no {module.SERIES.what} at {stem}.json in the evidence container" in err.value.message
    evidence.upload_text(evidence_container, f"{stem}.json", "\xff not json", "application/json")
    with pytest.raises(CrashcartError) as err:
        load(evidence_container, f"{stem}.json", tmp_path)
    assert err.value.exit_code == ExitCode.USAGE and "is not JSON" in err.value.message
