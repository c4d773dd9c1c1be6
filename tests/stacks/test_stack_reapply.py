"""Re-applying a kept repair stack changes nothing that forces a replacement (issue 12: the Trusted Launch
disk copy and the rescue VM were replaced), and the evidence stack needs no storage data plane.

A second run synthesizes the stack again (a fresh app) with a fresh admin credential, and applies it over the
first run's state. Terraform replaces a resource when an attribute its provider marks ForceNew differs
between the state (what was applied, plus what azurerm reads back from Azure) and the new config, unless the
resource's lifecycle ignores it, and then everything that refers to the replaced resource's ID. `_plan` does
that comparison over cdk.tf.json, with the ForceNew attributes of azurerm 4.x's documentation ("Changing this
forces a new resource to be created")."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest

from tests.support.synth import variant_data

# azurerm 4.x, the resources of the repair stack that hold the disk copy and the VM, and their ForceNew arguments
FORCE_NEW: dict[str, tuple[str, ...]] = {
    "azurerm_resource_group": ("name", "location"),
    "azurerm_snapshot": ("name", "resource_group_name", "location", "create_option", "source_uri",
                         "source_resource_id", "storage_account_id", "incremental_enabled"),
    "azurerm_managed_disk": ("name", "resource_group_name", "location", "create_option", "source_resource_id",
                             "source_uri", "storage_account_id", "image_reference_id", "hyper_v_generation", "zone",
                             "trusted_launch_enabled", "security_type", "logical_sector_size", "edge_zone"),
    "azurerm_windows_virtual_machine": ("name", "resource_group_name", "location", "admin_username", "admin_password",
                                        "computer_name", "zone", "secure_boot_enabled", "vtpm_enabled",
                                        "source_image_reference", "availability_set_id", "edge_zone"),
    "azurerm_linux_virtual_machine": ("name", "resource_group_name", "location", "admin_username", "admin_ssh_key",
                                      "computer_name", "disable_password_authentication", "zone",
                                      "secure_boot_enabled", "vtpm_enabled", "source_image_reference",
                                      "availability_set_id", "edge_zone"),
    "azurerm_virtual_machine_data_disk_attachment": ("managed_disk_id", "virtual_machine_id", "lun", "create_option"),
    "azurerm_role_assignment": ("name", "scope", "role_definition_name", "principal_id"),
}
# What azurerm reads back from Azure into those attributes after the first apply, for a Trusted Launch source:
# a Copy inherits the snapshot's security profile (managed_disk read: trusted_launch_enabled = true).
READ_BACK = {"TrustedLaunch": {"azurerm_managed_disk": {"trusted_launch_enabled": True, "security_type": ""}}}
_UNKNOWN_AT_PLAN = re.compile(r"\b(timestamp|uuid|bcrypt)\(")


def _resolve(value: Any, variables: dict[str, str]) -> Any:
    text = json.dumps(value, sort_keys=True)
    if _UNKNOWN_AT_PLAN.search(text):
        return object()  # known only at apply: never equal to what the state holds
    for name, secret in variables.items():
        text = text.replace(f"${{var.{name}}}", secret)
    return json.loads(text)


def _zero(value: Any) -> Any:
    """An unset optional argument is its zero value in the plan (SDKv2 providers)."""
    return None if value in (None, False, "", [], {}) else value


def _plan(applied: dict, read_back: dict, old_vars: dict, new: dict, new_vars: dict) -> dict[str, list[str]]:
    """address -> the reasons it would be replaced when `new` is applied over the state `applied` left."""
    replaced: dict[str, list[str]] = {}
    new_resources = new["resource"]
    for rtype, attributes in FORCE_NEW.items():
        for name, before in applied["resource"].get(rtype, {}).items():
            after = new_resources[rtype][name]
            ignored = set(after.get("lifecycle", {}).get("ignore_changes", []))
            for attribute in attributes:
                if attribute in ignored:
                    continue
                state = read_back.get(rtype, {}).get(attribute, _resolve(before.get(attribute), old_vars))
                if _zero(state) != _zero(_resolve(after.get(attribute), new_vars)):
                    replaced.setdefault(f"{rtype}.{name}", []).append(attribute)
    changed = True
    while changed:  # a new ID for everything that refers to a replaced resource's ID
        changed = False
        for rtype, attributes in FORCE_NEW.items():
            for name, after in new_resources.get(rtype, {}).items():
                address = f"{rtype}.{name}"
                for attribute in attributes:
                    text = json.dumps(after.get(attribute))
                    hit = next((r for r in replaced if f"${{{r}." in text), None)
                    if hit and address not in replaced:
                        replaced[address] = [f"{attribute} (refers to {hit})"]
                        changed = True
    return replaced


def _synth(data: dict, outdir) -> dict:
    from main import build_app
    from scripts.config.model import Config

    build_app(Config.from_dict(data), str(outdir)).synth()
    return json.loads((outdir / "stacks/repair/cdk.tf.json").read_text())


@pytest.mark.parametrize("variant, secret", [
    ("default", "rescue_admin_password"),  # Windows rescue VM, Trusted Launch source (the example config)
    ("linux", "rescue_admin_ssh_public_key"),
])
def test_a_kept_repair_stack_reapplied_by_a_later_run_replaces_nothing(variant, secret, tmp_path):
    data = variant_data(variant)
    assert data["source"]["security_type"] == "TrustedLaunch"
    first, second = _synth(data, tmp_path / "run1"), _synth(data, tmp_path / "run2")
    # two synths of one config: the same replacement-forcing inputs (no timestamp, no random name)
    for rtype, attributes in FORCE_NEW.items():
        for name, resource in first["resource"].get(rtype, {}).items():
            assert {a: resource.get(a) for a in attributes} == {
                a: second["resource"][rtype][name].get(a) for a in attributes}, f"{rtype}.{name}"
            assert not _UNKNOWN_AT_PLAN.search(json.dumps({a: resource.get(a) for a in attributes}))
    # each run generates its own admin credential (scripts.run.credential): the second run's differs
    plan = _plan(first, READ_BACK["TrustedLaunch"], {secret: "first-run-credential"}, second,
                 {secret: "second-run-credential"})
    assert plan == {}, f"re-applying would replace: {plan}"


def test_the_check_sees_a_replacement_when_there_is_one(tmp_path):
    """The plan model is not vacuous: a different source disk (a ForceNew change) replaces the snapshot, and
    with it the disk copy and its attachment."""
    data = variant_data("default")
    first = _synth(data, tmp_path / "run1")
    data["source"]["os_disk_id"] = data["source"]["os_disk_id"] + "-2"
    second = _synth(data, tmp_path / "run2")
    plan = _plan(first, READ_BACK["TrustedLaunch"], {}, second, {})
    kinds = {address.split(".")[0] for address in plan}
    assert {"azurerm_snapshot", "azurerm_managed_disk", "azurerm_virtual_machine_data_disk_attachment"} <= kinds


def test_the_disk_copy_and_the_vm_ignore_what_azure_or_each_run_decides(synthesized):
    default, linux = synthesized["default"], synthesized["linux"]
    disk = default.resource("repair", "azurerm_managed_disk")
    assert {"trusted_launch_enabled", "security_type"} <= set(disk["lifecycle"]["ignore_changes"])
    windows_vm = default.resource("repair", "azurerm_windows_virtual_machine")
    assert windows_vm["lifecycle"]["ignore_changes"] == ["admin_password"]
    linux_vm = linux.resource("repair", "azurerm_linux_virtual_machine")
    assert linux_vm["lifecycle"]["ignore_changes"] == ["admin_ssh_key"]


# ---- the evidence stack: ARM only (issue 12, break 2) ---------------------------------------------------------
DATA_PLANE_ARGUMENTS = ("queue_properties", "static_website", "share_properties")


@pytest.mark.parametrize("variant", ["default", "existing", "pipeline"])
def test_the_evidence_stack_never_needs_the_storage_data_plane(synthesized, variant):
    """azurerm 4.x reads queue properties / static website and polls the blob endpoint of a storage account
    unless features.storage.data_plane_available is false: with shared keys off and storage_use_azuread that
    needs data roles a Contributor deployer lacks, and a default-deny firewall refuses it. The stack sets the
    feature off and declares nothing that would need the data plane."""
    stack = synthesized[variant].json("evidence")
    (provider,) = stack["provider"]["azurerm"]
    assert provider["storage_use_azuread"] is True
    (features,) = provider["features"]
    assert features["storage"] == [{"data_plane_available": False}]
    for account in stack.get("resource", {}).get("azurerm_storage_account", {}).values():
        assert not set(DATA_PLANE_ARGUMENTS) & set(account)
    for container in stack["resource"]["azurerm_storage_container"].values():
        assert "storage_account_id" in container and "storage_account_name" not in container
    assert not any(t in stack["resource"] for t in ("azurerm_storage_blob", "azurerm_storage_queue",
                                                    "azurerm_storage_share", "azurerm_storage_table"))


def test_the_repair_stack_keeps_its_own_provider_features_and_no_data_plane(synthesized):
    (provider,) = synthesized["default"].json("repair")["provider"]["azurerm"]
    (features,) = provider["features"]
    assert features["storage"] == [{"data_plane_available": False}]
    assert features["resource_group"] == [{"prevent_deletion_if_contains_resources": False}]
    assert features["virtual_machine"][0]["skip_shutdown_and_force_delete"] is True


def test_an_immutability_policy_still_allows_protected_appends(synthesized):
    """Run Command's output/error logs are append blobs in the evidence container: a time-based policy without
    protected append writes refuses every append (and new blocks of block blobs)."""
    policy = synthesized["pipeline"].resource("evidence", "azurerm_storage_container_immutability_policy")
    assert policy["immutability_period_in_days"] == 365
    assert policy["protected_append_writes_all_enabled"] is True
    # the two flags exclude each other in the Storage API: "All" covers append blobs as well
    assert policy.get("protected_append_writes_enabled") in (None, False)

