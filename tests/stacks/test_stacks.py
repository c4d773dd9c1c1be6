"""The evidence and repair stacks, asserted on the synthesized JSON with cdktf's Testing matchers."""

from __future__ import annotations

import json

import pytest
from cdktf import Testing as CdktfTesting

from scripts.azure.identity import vm_key
from scripts.devkit import arm_skus
from tests.support.synth import EXISTING_SUBNET, VARIANTS


def has(synth, stack: str, rtype: str, props: dict) -> bool:
    return CdktfTesting.to_have_resource_with_properties(synth.text(stack), rtype, props)


# ---- evidence -------------------------------------------------------------------------------------
def test_evidence_account_is_private_azure_ad_only_and_keeps_deleted_blobs(synthesized):
    default = synthesized["default"]
    assert has(default, "evidence", "azurerm_storage_account", {
        "https_traffic_only_enabled": True,
        "min_tls_version": "TLS1_2",
        "allow_nested_items_to_be_public": False,
        "shared_access_key_enabled": False,
        "default_to_oauth_authentication": True,
        "blob_properties": {"versioning_enabled": True, "delete_retention_policy": {"days": 30},
                            "container_delete_retention_policy": {"days": 30}},
    })
    account = default.resource("evidence", "azurerm_storage_account")
    assert account["name"] == default.config.evidence_account_name
    assert account["lifecycle"]["prevent_destroy"] is True


def test_evidence_container_is_private_created_through_arm_and_protected(synthesized):
    container = synthesized["default"].resource("evidence", "azurerm_storage_container")
    assert container["container_access_type"] == "private"
    assert container["storage_account_id"].startswith("${azurerm_storage_account.")
    assert "storage_account_name" not in container  # the data-plane way needs shared keys
    assert container["lifecycle"]["prevent_destroy"] is True


def test_providers_use_azure_ad_for_storage(synthesized):
    for stack in ("evidence", "repair"):
        assert CdktfTesting.to_have_provider_with_properties(
            synthesized["default"].text(stack), "azurerm",
            {"storage_use_azuread": True, "subscription_id": "00000000-0000-0000-0000-000000000001",
             # no subscription-wide provider registration rights needed
             "resource_provider_registrations": "none"})


def test_immutability_is_off_by_default_and_time_based_when_asked(synthesized):
    assert synthesized["default"].resources("evidence", "azurerm_storage_container_immutability_policy") == []
    policy = synthesized["pipeline"].resource("evidence", "azurerm_storage_container_immutability_policy")
    assert policy["immutability_period_in_days"] == 365
    assert policy["storage_container_resource_manager_id"].endswith("/blobServices/default/containers/dumps")


def test_existing_account_is_referenced_not_created_and_firewalled_config_is_honoured(synthesized):
    existing = synthesized["existing"]
    assert existing.resources("evidence", "azurerm_storage_account") == []
    assert existing.resources("evidence", "azurerm_resource_group") == []
    assert CdktfTesting.to_have_data_source_with_properties(
        existing.text("evidence"), "azurerm_storage_account",
        {"name": "secdumps01", "resource_group_name": "sec-evidence"})
    container = existing.resource("evidence", "azurerm_storage_container")
    assert container["storage_account_id"].startswith("${data.azurerm_storage_account.")


def test_firewall_denies_by_default_and_allows_the_configured_subnet(synthesized, tmp_path):
    from main import build_app
    from scripts.config.model import Config
    from tests.support.synth import variant_data

    data = variant_data("existing")
    data["evidence"]["account_id"] = ""  # create the account, firewalled, with the long-lived subnet
    config = Config.from_dict(data)
    build_app(config, str(tmp_path)).synth()
    stack = json.loads((tmp_path / "stacks/evidence/cdk.tf.json").read_text())
    rules = next(iter(stack["resource"]["azurerm_storage_account"].values()))["network_rules"]
    assert rules["default_action"] == "Deny"
    assert rules["virtual_network_subnet_ids"] == [EXISTING_SUBNET]
    assert rules["ip_rules"] == ["203.0.113.0/24"]


# ---- repair: group, snapshot, disk copy ------------------------------------------------------------
def test_repair_group_is_tagged_with_source_kit_and_expiry(synthesized):
    default = synthesized["default"]
    group = default.resource("repair", "azurerm_resource_group")
    # keyed by the VM's resource ID (#13): the config's default crashcart-repair-<vm key>
    assert group["name"] == f"crashcart-repair-{vm_key(default.config.source.vm_id)}"
    assert group["tags"]["crashcart"] == "repair"
    assert group["tags"]["crashcart-source-vm"] == default.config.source.vm_id
    assert group["tags"]["owner"] == "ops"
    assert group["tags"]["crashcart-expires-at"] == '${timeadd(timestamp(), "8h")}'
    assert group["lifecycle"]["ignore_changes"] == ['tags["crashcart-expires-at"]']


def test_snapshot_copies_the_source_disk_and_nothing_else_touches_it(synthesized):
    default = synthesized["default"]
    source = default.config.source
    assert has(default, "repair", "azurerm_snapshot", {
        "create_option": "Copy", "source_uri": source.os_disk_id, "network_access_policy": "DenyAll"})
    # The source disk and VM appear only as the snapshot's source, in tags and in outputs.
    for rtype, items in default.json("repair")["resource"].items():
        for item in items.values():
            text = json.dumps({k: v for k, v in item.items() if k not in ("tags",)})
            if rtype != "azurerm_snapshot":
                assert source.os_disk_id not in text, rtype
            assert source.vm_id not in text.replace(f"rescue VM of {source.vm_name}", ""), rtype
    assert not any(t in default.json("repair")["resource"] for t in (
        "azurerm_virtual_machine_extension", "azurerm_managed_disk_sas_token"))


def test_disk_copy_matches_the_source(synthesized):
    default = synthesized["default"]
    disk = default.resource("repair", "azurerm_managed_disk")
    assert disk["create_option"] == "Copy"
    assert disk["source_resource_id"].startswith("${azurerm_snapshot.")
    assert (disk["disk_size_gb"], disk["storage_account_type"], disk["hyper_v_generation"], disk["zone"]) == (
        127, "Premium_LRS", "V2", "1")
    assert disk["network_access_policy"] == "DenyAll" and disk["public_network_access_enabled"] is False
    gen1 = synthesized["gen1"].resource("repair", "azurerm_managed_disk")
    assert (gen1["hyper_v_generation"], gen1["storage_account_type"], "zone" in gen1) == ("V1", "Standard_LRS", False)


def test_zrs_disk_copy_has_no_zone_of_its_own(synthesized):
    assert "zone" not in synthesized["nvme"].resource("repair", "azurerm_managed_disk")


def test_snapshot_export_strategy_leaves_the_snapshot_exportable(synthesized):
    snapshot = synthesized["pipeline"].resource("repair", "azurerm_snapshot")
    assert snapshot["network_access_policy"] == "AllowAll"


# ---- repair: network ---------------------------------------------------------------------------------
def test_created_network_has_storage_endpoint_deny_all_inbound_and_no_public_ip(synthesized):
    default = synthesized["default"]
    assert has(default, "repair", "azurerm_subnet", {"service_endpoints": ["Microsoft.Storage"]})
    nsg = default.resource("repair", "azurerm_network_security_group")
    rule = nsg["security_rule"][0]
    assert (rule["direction"], rule["access"], rule["source_address_prefix"], rule["destination_port_range"]) == (
        "Inbound", "Deny", "*", "*")
    assert default.resource("repair", "azurerm_subnet_network_security_group_association")
    assert "azurerm_public_ip" not in default.json("repair")["resource"]
    nic = default.resource("repair", "azurerm_network_interface")
    assert "public_ip_address_id" not in nic["ip_configuration"][0]


def test_evidence_in_another_region_uses_the_global_storage_endpoint(synthesized):
    subnet = synthesized["pipeline"].resource("repair", "azurerm_subnet")
    assert subnet["service_endpoints"] == ["Microsoft.Storage.Global"]


def test_existing_subnet_is_used_and_no_network_is_created(synthesized):
    existing = synthesized["existing"]
    for rtype in ("azurerm_virtual_network", "azurerm_subnet", "azurerm_network_security_group"):
        assert existing.resources("repair", rtype) == []
    nic = existing.resource("repair", "azurerm_network_interface")
    assert nic["ip_configuration"][0]["subnet_id"] == EXISTING_SUBNET


# ---- repair: rescue VM -----------------------------------------------------------------------------
def test_windows_rescue_vm_matches_a_gen2_trusted_launch_source(synthesized):
    vm = synthesized["default"].resource("repair", "azurerm_windows_virtual_machine")
    assert vm["source_image_reference"] == {"publisher": "MicrosoftWindowsServer", "offer": "WindowsServer",
                                            "sku": "2022-datacenter-g2", "version": "latest"}
    assert vm["secure_boot_enabled"] is True and vm["vtpm_enabled"] is True
    assert vm["identity"] == {"type": "SystemAssigned"}
    assert vm["boot_diagnostics"] == {}
    assert vm["allow_extension_operations"] is True
    assert vm["zone"] == "1"
    assert vm["admin_password"] == "${var.rescue_admin_password}"
    assert "disk_controller_type" not in vm


def test_gen1_source_gets_a_gen1_image_without_trusted_launch(synthesized):
    vm = synthesized["gen1"].resource("repair", "azurerm_windows_virtual_machine")
    assert vm["source_image_reference"]["sku"] == "2022-datacenter"
    assert "secure_boot_enabled" not in vm and "vtpm_enabled" not in vm and "zone" not in vm


def test_nvme_source_leaves_the_rescue_vms_controller_to_its_size(synthesized):
    """#12 break 3: the copy is only read, as a data disk; the rescue VM declares no controller (it used to
    declare the source's NVMe) and gets its size's default: NVMe on this variant's NVMe-only Standard_D4ads_v6."""
    vm = synthesized["nvme"].resource("repair", "azurerm_windows_virtual_machine")
    assert "disk_controller_type" not in vm
    assert arm_skus.find(vm["size"]).default_controller == "NVMe"


# ---- the rescue VM is one its size can host (the SKU catalogue the ARM double enforces) -------------------
def _rescue_vm(synth) -> dict:
    return synth.resource("repair", f"azurerm_{synth.config.rescue.os}_virtual_machine")


def _arm_model(vm: dict, config) -> dict:
    """The properties of the synthesized rescue VM that its size decides on, as azurerm sends them to ARM."""
    model: dict = {"location": config.source.location,
                   "properties": {"hardwareProfile": {"vmSize": vm["size"]}, "storageProfile": {}}}
    if vm.get("zone"):
        model["zones"] = [vm["zone"]]
    if vm.get("disk_controller_type"):
        model["properties"]["storageProfile"]["diskControllerType"] = vm["disk_controller_type"]
    if vm.get("secure_boot_enabled") or vm.get("vtpm_enabled"):
        model["properties"]["securityProfile"] = {"securityType": "TrustedLaunch"}
    return model


def _refusal(vm: dict, config):
    """ARM's answer (scripts/devkit/arm_skus.py) to the rescue VM: None when its size can host it. The image
    is the source's generation (config.rescue_image)."""
    found = arm_skus.vm_refusal(f"/subscriptions/{config.source.subscription_id}/resourceGroups/"
                                f"{config.repair_resource_group}/providers/Microsoft.Compute/virtualMachines/"
                                f"{vm['name']}", _arm_model(vm, config), generation=config.source.hyper_v_generation)
    return None if found is None else found.body["error"]


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_variants_rescue_vm_fits_its_size_and_takes_the_copy(synthesized, variant):
    synth = synthesized[variant]
    vm = _rescue_vm(synth)
    assert _refusal(vm, synth.config) is None
    # the copy joins the rescue VM across zones as Azure allows: ZRS anywhere, else in the VM's own zone
    disk = synth.resource("repair", "azurerm_managed_disk")
    model = {"sku": {"name": disk["storage_account_type"]}, "zones": [disk["zone"]] if disk.get("zone") else []}
    assert arm_skus.attach_refusal(_arm_model(vm, synth.config), "copy", model) is None


def test_an_nvme_source_with_the_default_rescue_size_deploys(synthesized, tmp_path):
    """#12 break 3: an NVMe source with the default rescue size (Standard_D4s_v5: SCSI only). The extra synth
    reuses the session's jsii (the `synthesized` fixture), a fraction of a second."""
    from main import build_app
    from scripts.config.model import Config
    from tests.support.synth import variant_data

    data = variant_data("nvme")
    data["rescue"]["size"] = "Standard_D4s_v5"
    config = Config.from_dict(data)
    build_app(config, str(tmp_path)).synth()
    stack = json.loads((tmp_path / "stacks/repair/cdk.tf.json").read_text())
    vm = next(iter(stack["resource"]["azurerm_windows_virtual_machine"].values()))
    assert (vm["size"], "disk_controller_type" in vm) == ("Standard_D4s_v5", False)
    assert _refusal(vm, config) is None
    # what it used to declare is what Azure refuses on this size
    assert _refusal({**vm, "disk_controller_type": "NVMe"}, config)["code"] == "InvalidParameter"


def test_linux_rescue_is_ubuntu_2404_with_ssh_key_only(synthesized):
    linux = synthesized["linux"]
    assert linux.resources("repair", "azurerm_windows_virtual_machine") == []
    vm = linux.resource("repair", "azurerm_linux_virtual_machine")
    assert vm["source_image_reference"]["offer"] == "ubuntu-24_04-lts"
    assert vm["source_image_reference"]["sku"] == "server"
    assert vm["disable_password_authentication"] is True
    assert vm["admin_ssh_key"][0]["public_key"] == "${var.rescue_admin_ssh_public_key}"
    assert "rescue_admin_password" not in linux.json("repair").get("variable", {})


def test_disk_copy_is_attached_at_lun_0(synthesized):
    attachment = synthesized["default"].resource("repair", "azurerm_virtual_machine_data_disk_attachment")
    assert attachment["lun"] == 0
    assert attachment["managed_disk_id"].startswith("${azurerm_managed_disk.")
    assert attachment["virtual_machine_id"].startswith("${azurerm_windows_virtual_machine.")


def test_vm_identity_may_only_read_and_write_its_own_prefix_in_the_evidence_container(synthesized):
    default = synthesized["default"]
    role = default.resource("repair", "azurerm_role_assignment")
    assert role["role_definition_name"] == "Storage Blob Data Contributor"
    assert role["principal_id"].endswith(".identity[0].principal_id}")
    assert role["principal_type"] == "ServicePrincipal"
    # Cross-stack wiring: the scope is the evidence stack's container, read from its state.
    assert role["scope"].startswith("${data.terraform_remote_state.cross-stack-reference-input-evidence.outputs.")
    # The prefix is the VM's key (name + hash of its resource ID): a same-named VM elsewhere has another one.
    key = vm_key(default.config.source.vm_id)
    assert key.startswith("web-01-") and len(key) == len("web-01-") + 8
    blobs = "Microsoft.Storage/storageAccounts/blobServices/containers/blobs"
    assert role["condition"] == (
        f"((!(ActionMatches{{'{blobs}/read'}}) AND !(ActionMatches{{'{blobs}/write'}}) "
        f"AND !(ActionMatches{{'{blobs}/add/action'}})) "
        f"OR (@Resource[{blobs}:path] StringStartsWith '{key}/')) "
        f"AND (!(ActionMatches{{'{blobs}/delete'}}) AND !(ActionMatches{{'{blobs}/move/action'}}))")
    assert role["condition_version"] == "2.0"
    assert f"({key}/)" in role["description"]


def test_two_vms_of_the_same_name_get_separate_prefixes_and_repair_states(synthesized, tmp_path_factory):
    """web-01 in another resource group: its own ABAC prefix and its own repair state; the evidence stack
    (shared by every VM) keeps its one state."""
    from main import build_app
    from scripts.config.model import Config
    from tests.support.synth import Synthesized, variant_data

    data = variant_data("default")
    data["source"]["resource_group"] = "prod-web-2"
    config = Config.from_dict(data)
    outdir = tmp_path_factory.mktemp("other-web-01")
    build_app(config, str(outdir)).synth()
    other = Synthesized("other", config, outdir)

    first = synthesized["default"]
    assert config.source.vm_name == first.config.source.vm_name == "web-01"
    key, first_key = vm_key(config.source.vm_id), vm_key(first.config.source.vm_id)
    assert key != first_key
    condition = other.resource("repair", "azurerm_role_assignment")["condition"]
    assert f"StringStartsWith '{key}/'" in condition and first_key not in condition
    assert other.json("repair")["terraform"]["backend"] == {"local": {"path": f"../../../terraform.repair.{key}.tfstate"}}
    assert first.json("repair")["terraform"]["backend"] == {
        "local": {"path": f"../../../terraform.repair.{first_key}.tfstate"}}
    assert other.json("evidence")["terraform"]["backend"] == first.json("evidence")["terraform"]["backend"] == {
        "local": {"path": "../../../terraform.evidence.tfstate"}}


def test_cross_stack_wiring_reads_evidence_outputs_from_its_backend(synthesized):
    repair = synthesized["default"].json("repair")
    remote = repair["data"]["terraform_remote_state"]["cross-stack-reference-input-evidence"]
    assert remote == {"backend": "local", "config": {"path": "../../../terraform.evidence.tfstate"},
                      "workspace": "${terraform.workspace}"}
    # one repair state per VM, named by its key (scripts.azure.identity.vm_key); the evidence stack's is shared
    key = vm_key(synthesized["default"].config.source.vm_id)
    assert repair["terraform"]["backend"] == {"local": {"path": f"../../../terraform.repair.{key}.tfstate"}}
    evidence_outputs = synthesized["default"].json("evidence")["output"]
    assert any(name.startswith("cross-stack-output-") for name in evidence_outputs)
    pipeline = synthesized["pipeline"].json("repair")
    assert pipeline["terraform"]["backend"]["azurerm"]["key"] == f"crashcart/{key}/repair.tfstate"
    assert synthesized["pipeline"].json("evidence")["terraform"]["backend"]["azurerm"]["key"] == "crashcart/evidence.tfstate"
    assert pipeline["terraform"]["backend"]["azurerm"]["use_azuread_auth"] is True


REPAIR_OUTPUTS = ("subscription_id", "resource_group_name", "rescue_vm_id", "rescue_vm_name",
                  "rescue_vm_principal_id", "rescue_os", "disk_copy_id", "disk_copy_lun", "snapshot_id",
                  "source_vm_id", "source_os_disk_id", "evidence_account_name", "evidence_blob_endpoint",
                  "evidence_container")


def test_outputs_have_the_stable_names_the_runtime_reads(synthesized):
    import dataclasses

    from scripts.config.stackoutputs import EvidenceOutputs, RepairOutputs

    assert tuple(f.name for f in dataclasses.fields(RepairOutputs)) == REPAIR_OUTPUTS
    for variant in synthesized.values():
        outputs = variant.json("repair")["output"]
        assert set(REPAIR_OUTPUTS) <= set(outputs), variant.name
        assert outputs["rescue_os"]["value"] == variant.config.rescue.os
        evidence = variant.json("evidence")["output"]
        assert {f.name for f in dataclasses.fields(EvidenceOutputs)} <= set(evidence)


@pytest.mark.parametrize("variant", ["default", "linux"])
def test_no_secret_reaches_cdk_tf_json(synthesized, variant):
    repair = synthesized[variant].json("repair")
    for name, var in repair.get("variable", {}).items():
        assert "default" not in var, name
    if variant == "default":
        assert repair["variable"]["rescue_admin_password"]["sensitive"] is True
    text = synthesized[variant].text("repair") + synthesized[variant].text("evidence")
    assert "BEGIN" not in text and "ssh-rsa" not in text and "ssh-ed25519" not in text
    assert '"access_key":' not in text and '"sas_token":' not in text and '"client_secret":' not in text


def test_synth_is_a_pure_function_of_the_config(synthesized, tmp_path, monkeypatch):
    from main import build_app

    monkeypatch.setenv("TF_VAR_rescue_admin_password", "Sentinel-Password-123!")
    build_app(synthesized["default"].config, str(tmp_path)).synth()
    for stack in ("evidence", "repair"):
        again = (tmp_path / "stacks" / stack / "cdk.tf.json").read_text()
        assert "Sentinel-Password" not in again
        assert json.loads(again) == synthesized["default"].json(stack)
