"""Boot diagnostics as symptom evidence (scripts/bootdiag.py), against the ARM double and Azurite.

The real azure-mgmt-compute client POSTs retrieveBootDiagnosticsData, gets two read-only SAS URIs (here
to Azurite blobs) and the kit stores what they hold in the evidence container, never the URIs.
"""

from __future__ import annotations

import json

import pytest

from scripts.evidence import bootdiag
from scripts.azure.clients import AzureClients
from scripts.devkit.arm_vmops import BLUESCREEN_XML, repair_world


def test_screenshot_and_serial_log_land_in_evidence(arm, azurite, evidence_container, tmp_path):
    world = repair_world(arm, azurite, evidence_container.container_name)
    world.sim.serial += "Boot failed\r\n" + BLUESCREEN_XML
    compute = AzureClients(world.outputs["subscription_id"]).compute
    result = bootdiag.capture_symptoms(compute, evidence_container, "prod-web", "web-01", "web-01/20250517T031245Z",
                                       out_dir=tmp_path)
    assert result.status == "captured", result.message
    shot = evidence_container.download_blob("web-01/20250517T031245Z/bootdiag/screenshot.bmp").readall()
    log = evidence_container.download_blob("web-01/20250517T031245Z/bootdiag/serial.log").readall()
    assert shot == world.sim.screenshot and log == world.sim.serial.encode()
    assert (tmp_path / "bootdiag" / "screenshot.bmp").read_bytes() == shot
    assert (result.screenshot.width, result.screenshot.height) == (32, 16)
    assert result.bugcheck["code"] == "0x0000007E" and result.bugcheck["source"] == "ems"
    assert result.bugcheck["parameters"][1] == "0xFFFFF8041FB41A2B"
    call = arm.calls("POST", "/retrieveBootDiagnosticsData")[0]
    assert call.query["sasUriExpirationTimeInMinutes"] == str(bootdiag.DEFAULT_SAS_MINUTES)
    # the SAS URIs are secrets: not in what the report gets
    assert "sig=" not in json.dumps(result.to_dict())


def test_a_second_capture_under_the_same_run_keeps_the_first_one(arm, azurite, evidence_container, tmp_path):
    """A capture never replaces an earlier one of the same run (If-None-Match: *, and a local file is created,
    never replaced); the second says so and the run goes on."""
    world = repair_world(arm, azurite, evidence_container.container_name)
    compute = AzureClients(world.outputs["subscription_id"]).compute
    prefix = "web-01-1a2b3c4d/20250517T031245Z"
    first = bootdiag.capture_symptoms(compute, evidence_container, "prod-web", "web-01", prefix, out_dir=tmp_path)
    assert first.status == "captured", first.message
    before = evidence_container.download_blob(f"{prefix}/bootdiag/serial.log").readall()
    world.sim.serial += "a later boot\r\n"
    second = bootdiag.capture_symptoms(compute, evidence_container, "prod-web", "web-01", prefix, out_dir=tmp_path)
    assert second.status == "unavailable"
    assert f"{prefix}/bootdiag/serial.log already exists" in second.message and "nothing was overwritten" in second.message
    assert evidence_container.download_blob(f"{prefix}/bootdiag/serial.log").readall() == before
    assert (tmp_path / "bootdiag" / "serial.log").read_bytes() == before


def test_disabled_boot_diagnostics_are_reported_not_fatal(arm, azurite, evidence_container):
    world = repair_world(arm, azurite, evidence_container.container_name, boot_diagnostics=False)
    compute = AzureClients(world.outputs["subscription_id"]).compute
    result = bootdiag.capture_symptoms(compute, evidence_container, "prod-web", "web-01", "web-01/x")
    assert result.status == "unavailable"
    assert "OperationNotAllowed" in result.message
    assert "az vm boot-diagnostics enable -g prod-web -n web-01" in result.hint
    assert list(evidence_container.list_blobs()) == []


def test_missing_vm_is_reported_not_fatal(arm, azurite, evidence_container):
    world = repair_world(arm, azurite, evidence_container.container_name)
    compute = AzureClients(world.outputs["subscription_id"]).compute
    arm.route("POST", r".*/virtualMachines/gone/retrieveBootDiagnosticsData",
              lambda d, req, m: d.not_found(req.path.rsplit("/", 1)[0]))
    result = bootdiag.capture_symptoms(compute, evidence_container, "prod-web", "gone", "gone/x")
    assert result.status == "unavailable" and "gone" in result.hint


@pytest.mark.parametrize("text, code, name", [
    (BLUESCREEN_XML, "0x0000007E", "SYSTEM_THREAD_EXCEPTION_NOT_HANDLED"),
    ("*** STOP: 0x0000007E (0xFFFFFFFFC0000005,0xFFFFF8041FB41A2B,0x0,0x0)\r\n", "0x0000007E",
     "SYSTEM_THREAD_EXCEPTION_NOT_HANDLED"),
    ("Your PC ran into a problem and needs to restart.\r\nStop code: SYSTEM_THREAD_EXCEPTION_NOT_HANDLED\r\n", None,
     "SYSTEM_THREAD_EXCEPTION_NOT_HANDLED"),
])
def test_serial_log_stop_forms(text, code, name):
    found = bootdiag.serial_bugcheck("SAC>\r\n" + text)
    assert found is not None and found["code"] == code
    assert found["name"] == name


def test_no_stop_in_a_healthy_log():
    assert bootdiag.serial_bugcheck("Computer is booting, SAC started and initialized.\r\nSAC>") is None
    assert bootdiag.serial_bugcheck("") is None
    assert bootdiag.bmp_size(b"not a bmp") is None
