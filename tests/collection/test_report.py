"""scripts/report.py: report.json and report.md from a collection's result."""

from __future__ import annotations

import json

from scripts.collection import report
from scripts.collection.contract import CollectResult
from scripts.config.stackoutputs import RepairOutputs
from scripts.evidence.verify import VerifiedBlob

SUB = "00000000-0000-0000-0000-000000000001"
OUTPUTS = RepairOutputs(
    subscription_id=SUB, resource_group_name="crashcart-repair-web-01",
    rescue_vm_id=f"/subscriptions/{SUB}/resourceGroups/crashcart-repair-web-01/providers/Microsoft.Compute/virtualMachines/crashcart-rescue",
    rescue_vm_name="crashcart-rescue", rescue_vm_principal_id="p", rescue_os="windows",
    disk_copy_id="copy-id", disk_copy_lun=0, snapshot_id="snap-id",
    source_vm_id=f"/subscriptions/{SUB}/resourceGroups/prod-web/providers/Microsoft.Compute/virtualMachines/web-01",
    source_os_disk_id="os-disk-id", evidence_account_name="crashcartabc",
    evidence_blob_endpoint="https://crashcartabc.blob.core.windows.net", evidence_container="dumps")
RUN = "web-01/20250517T031245Z"


def result(**changes) -> CollectResult:
    blob = VerifiedBlob(
        name=f"{RUN}/MEMORY.DMP", url=f"https://crashcartabc.blob.core.windows.net/dumps/{RUN}/MEMORY.DMP",
        kind="memory", source_path="%SystemRoot%\\MEMORY.DMP", size=2_147_483_648, sha256="ab" * 32,
        sha256_checked=True,
        header={"bugcheck_code": "0x7e", "bugcheck_parameters": ["0xc0000005", "0xfffff8041fb41a2b", "0x0", "0x0"],
                "dump_type": 5, "kind": "kernel or automatic memory dump (bitmap)"})
    bad = VerifiedBlob(name=f"{RUN}/Minidump/a.dmp", url="u", kind="minidump", source_path="p", size=10,
                       problems=["a | b is truncated"])
    values = dict(status="collected", exit_code=0, message="2 dump file(s) stored", run=RUN,
                  source_vm_id=OUTPUTS.source_vm_id, rescue_vm_id=OUTPUTS.rescue_vm_id, rescue_os="windows",
                  container_url="https://crashcartabc.blob.core.windows.net/dumps", blobs=[blob, bad],
                  notes=["the page file is configured on D: (D:\\pagefile.sys), not on the OS disk"],
                  crash_control={"DumpFile": "%SystemRoot%\\MEMORY.DMP", "CrashDumpEnabled": 7},
                  run_command={"name": "crashcart-collect-x", "state": "Succeeded", "exit_code": 0, "seconds": 42.0},
                  logs={"output": "https://x/output.log", "error": "https://x/error.log"},
                  sas={f"{RUN}/MEMORY.DMP": "https://crashcartabc.blob.core.windows.net/dumps/x?sig=SECRET"},
                  sas_expiry="2025-05-24T03:12:45+00:00")
    values.update(changes)
    return CollectResult(**values)


def test_report_names_blobs_hashes_and_the_stop_code():
    document = report.build(result(), OUTPUTS)
    assert document["schema"] == "crashcart.report/1" and document["run"] == RUN
    assert document["bugcheck"] == {"code": "0x7e", "name": "SYSTEM_THREAD_EXCEPTION_NOT_HANDLED",
                                    "parameters": ["0xc0000005", "0xfffff8041fb41a2b", "0x0", "0x0"],
                                    "blob": f"{RUN}/MEMORY.DMP"}
    memory, mini = document["dumps"]
    assert memory["url"].endswith("/MEMORY.DMP") and memory["size"] == 2_147_483_648 and memory["sha256"] == "ab" * 32
    assert memory["verified"] and not mini["verified"]
    assert document["source"]["vm_name"] == "web-01" and document["source"]["os_disk_id"] == "os-disk-id"
    json.dumps(document)


def test_no_secret_in_the_report():
    document = report.build(result(), OUTPUTS)
    text = json.dumps(document) + report.markdown(document)
    assert "SECRET" not in text and "sig=" not in text
    assert document["sas"] == {"count": 1, "expiry": "2025-05-24T03:12:45+00:00"}
    assert "not stored in this report" in report.markdown(document)


def test_markdown_for_a_support_ticket():
    text = report.markdown(report.build(result(), OUTPUTS))
    assert "# crashcart collection report — web-01" in text
    assert "**0x7e** `SYSTEM_THREAD_EXCEPTION_NOT_HANDLED`" in text
    assert f"| [{RUN}/MEMORY.DMP](https://crashcartabc.blob.core.windows.net/dumps/{RUN}/MEMORY.DMP) |" in text
    assert "`" + "ab" * 32 + "` (re-hashed)" in text
    assert "NO: a \\| b is truncated" in text  # a pipe in a problem does not break the table
    assert "- the page file is configured on D:" in text
    assert "- DumpFile: `%SystemRoot%\\MEMORY.DMP`" in text


def test_failed_run_report():
    failed = result(status="no_dump", exit_code=10, message="the broken volume holds no memory dump", blobs=[],
                    sas={}, sas_expiry=None, run_command={"name": "n"}, hint="run prepare-dump")
    document = report.build(failed, OUTPUTS)
    assert document["bugcheck"] is None and document["dumps"] == [] and document["hint"] == "run prepare-dump"
    text = report.markdown(document)
    assert "**no_dump** (exit 10)" in text and "No dump was stored." in text and "Next: run prepare-dump" in text


def test_written_locally_and_uploaded(tmp_path, azurite):
    document = report.build(result(), OUTPUTS)
    paths = report.write(document, tmp_path / "out" / RUN)
    assert json.loads((tmp_path / "out" / RUN / "report.json").read_text()) == document
    assert paths["markdown"].endswith("report.md")
    container = azurite.service_client().create_container("reports")
    urls = report.upload(container, RUN, document)
    assert urls["json"].endswith(f"/reports/{RUN}/report.json")
    assert container.get_blob_client(f"{RUN}/report.md").get_blob_properties().content_settings.content_type == "text/markdown"


def test_the_report_names_the_vm_by_its_resource_id_and_group():
    """Two VMs named web-01 in different groups: each report says which one it is."""
    document = report.build(result(), OUTPUTS)
    assert document["source"]["vm_id"] == OUTPUTS.source_vm_id
    assert (document["source"]["resource_group"], document["source"]["subscription_id"]) == ("prod-web", SUB)
    assert "# crashcart collection report — web-01 (resource group prod-web)" in report.markdown(document)


def test_a_report_is_written_once_never_over_an_earlier_one(tmp_path, evidence_container):
    import pytest

    from scripts.base.errors import CrashcartError, ExitCode
    from scripts.evidence import blobs as evidence

    first = report.build(result(), OUTPUTS)
    report.write(first, tmp_path / RUN)
    report.upload(evidence_container, RUN, first)
    report.refuse_if_reported(evidence_container, "web-01-0000aaaa/20250517T031245Z")  # no report there: goes on

    second = report.build(result(status="error", exit_code=12, message="a second run"), OUTPUTS)
    with pytest.raises(CrashcartError) as local:
        report.write(second, tmp_path / RUN)
    assert local.value.exit_code == ExitCode.COLLECT_FAILED and "already exists" in local.value.message
    with pytest.raises(evidence.BlobExists):
        report.upload(evidence_container, RUN, second)
    with pytest.raises(evidence.BlobExists) as refused:
        report.refuse_if_reported(evidence_container, RUN)
    assert refused.value.exit_code == ExitCode.COLLECT_FAILED and f"{RUN}/report.json" in refused.value.message
    # the first run's report, locally and in evidence, is untouched
    assert json.loads((tmp_path / RUN / "report.json").read_text()) == first
    assert json.loads(evidence.read_bytes(evidence_container, f"{RUN}/report.json")) == first
