"""Resource SKUs in the ARM double (scripts/devkit/arm_skus.py), through the real azure-mgmt-compute client:
the sizes' capabilities as ResourceSkus_List reports them, and a VM its size cannot host refused with
Azure's status, code and message (disk controller, Hyper-V generation, Trusted Launch, zone), as well as
a disk attached across zones (a ZRS disk attaches anywhere in the region)."""

from __future__ import annotations

import pytest
from azure.core.exceptions import HttpResponseError

from scripts.azure import roles
from scripts.azure.clients import AzureClients
from scripts.devkit import arm_skus
from scripts.devkit.arm_rbac import Grant
from scripts.devkit.arm_vm import SUB, add_broken_vm
from scripts.devkit.arm_vmops import VmOps

READER = roles.RoleDefinition("Reader", actions=("*/read",))


@pytest.fixture
def compute(arm):
    return AzureClients(SUB).compute


@pytest.fixture
def broken(arm, azurite):
    """The broken VM (Gen2, Trusted Launch, SCSI, zone 1, Standard_D4s_v5) with its PUT route."""
    vm = add_broken_vm(arm)
    VmOps(arm, azurite).add(vm.vm_id, power="deallocated")
    return vm


def caps(sku) -> dict[str, str]:
    return {c.name: c.value for c in sku.capabilities}


def test_resource_skus_report_each_sizes_capabilities_and_restrictions(arm, compute):
    arm_skus.install(arm)
    arm.rbac.grants.append(Grant(READER, f"/subscriptions/{SUB}"))
    skus = {s.name: s for s in compute.resource_skus.list(filter="location eq 'westeurope'")}
    assert {s.locations[0] for s in skus.values()} == {"westeurope"}
    assert caps(skus["Standard_D4s_v5"])["DiskControllerTypes"] == "SCSI"
    assert caps(skus["Standard_D4s_v5"])["HyperVGenerations"] == "V1,V2"
    assert "DiskControllerTypes" not in caps(skus["Standard_D2s_v5"])  # absent: SCSI only
    for name in ("Standard_D4s_v6", "Standard_D4ads_v6", "Standard_E4s_v6"):
        assert (caps(skus[name])["DiskControllerTypes"], caps(skus[name])["HyperVGenerations"]) == ("NVMe", "V2")
    assert caps(skus["Standard_E4bds_v5"])["DiskControllerTypes"] == "SCSI, NVMe"
    assert caps(skus["Standard_A2_v2"])["HyperVGenerations"] == "V1"
    assert caps(skus["Standard_NC6s_v3"])["TrustedLaunchDisabled"] == "True"
    restriction = skus["Standard_E4bds_v5"].restrictions[0]
    assert (restriction.type, restriction.reason_code, restriction.restriction_info.zones) == (
        "Zone", "NotAvailableForSubscription", ["1"])
    assert skus["Standard_D4s_v5"].location_info[0].zones == ["1", "2", "3"]
    everywhere = list(compute.resource_skus.list())
    assert len(everywhere) == 2 * len(skus)  # westeurope and northeurope


def test_the_operator_role_reads_skus_for_preflight_and_only_through_that_action(arm, compute):
    """Preflight checks the rescue size's availability and restrictions in the zone (resource SKUs) before a run
    creates anything, so the documented operator role now grants Microsoft.Compute/skus/read (it used to leave it
    out: crashcart listed no SKUs before preflight). Without that one action ARM refuses the list and names it."""
    assert "Microsoft.Compute/skus/read" in roles.operator().actions
    arm_skus.install(arm)
    assert {s.name for s in compute.resource_skus.list(filter="location eq 'westeurope'")} >= {"Standard_D4s_v5"}
    assert [d.granted_by for d in arm.rbac.decisions if d.operation.action == "Microsoft.Compute/skus/read"] == [
        (roles.operator().name,)]
    arm.rbac.remove_action("Microsoft.Compute/skus/read")
    with pytest.raises(HttpResponseError) as err:
        list(compute.resource_skus.list())
    assert err.value.status_code == 403 and "Microsoft.Compute/skus/read" in err.value.message


def test_vm_sizes_are_the_catalogues(broken, compute):
    listed = {s.name: s for s in compute.virtual_machine_sizes.list("westeurope")}
    assert set(listed) == {s.name for s in arm_skus.sizes_in("westeurope")}
    assert (listed["Standard_D4s_v5"].memory_in_mb, listed["Standard_D4s_v5"].number_of_cores) == (16384, 4)


def update(compute, vm, **change):
    model = compute.virtual_machines.get(vm.resource_group, vm.name)
    if "size" in change:
        model.hardware_profile.vm_size = change["size"]
    if "controller" in change:
        model.storage_profile.disk_controller_type = change["controller"]
    if "zone" in change:
        model.zones = [change["zone"]]
    return compute.virtual_machines.begin_create_or_update(vm.resource_group, vm.name, model,
                                                           polling_interval=0.01).result()


@pytest.mark.parametrize("change, status, code, message", [
    ({"controller": "NVMe"}, 400, "InvalidParameter",
     "The VM size 'Standard_D4s_v5' cannot boot with DiskControllerType 'NVMe'."),
    ({"size": "Standard_A2_v2"}, 400, "BadRequest",
     "The selected VM size 'Standard_A2_v2' cannot boot Hypervisor Generation '2'."),
    ({"size": "Standard_NC6s_v3"}, 400, "BadRequest",
     "The VM size 'Standard_NC6s_v3' is not supported for creation of VMs and Virtual Machine Scale Set with "
     "'TrustedLaunch' security type."),
    ({"size": "Standard_E4bds_v5"}, 409, "SkuNotAvailable",
     "is currently not available in location 'westeurope' zones '1'"),
    ({"size": "Standard_D4s_v6"}, 400, "InvalidParameter",  # NVMe-only, and the VM declares SCSI
     "The VM size 'Standard_D4s_v6' cannot boot with DiskControllerType 'SCSI'."),
], ids=["nvme-on-scsi-size", "gen2-on-gen1-size", "trusted-launch-disabled", "zone-restricted", "scsi-on-nvme-size"])
def test_a_vm_its_size_cannot_host_is_refused_as_azure_refuses_it(arm, broken, compute, change, status, code,
                                                                     message):
    before = arm.get(broken.vm_id)["properties"]["hardwareProfile"]["vmSize"]
    with pytest.raises(HttpResponseError) as err:
        update(compute, broken, **change)
    assert (err.value.status_code, err.value.error.code) == (status, code)
    assert message in err.value.message
    assert arm.get(broken.vm_id)["properties"]["hardwareProfile"]["vmSize"] == before


def test_what_the_size_can_host_is_accepted(arm, broken, compute):
    updated = update(compute, broken, size="Standard_D4s_v6", controller="NVMe")
    assert (updated.hardware_profile.vm_size, updated.storage_profile.disk_controller_type) == ("Standard_D4s_v6", "NVMe")
    # the same VM in zone 2 on the size restricted only in zone 1
    assert update(compute, broken, size="Standard_E4bds_v5", controller="SCSI", zone="2").zones == ["2"]


def put_disk(arm, name: str, sku: str, zone: str | None) -> str:
    disk_id = f"/subscriptions/{SUB}/resourceGroups/prod-web/providers/Microsoft.Compute/disks/{name}"
    disk = {"name": name, "location": "westeurope", "type": "Microsoft.Compute/disks",
            "sku": {"name": sku}, "properties": {"diskSizeGB": 32, "diskState": "Unattached"}}
    if zone:
        disk["zones"] = [zone]
    arm.put(disk_id, disk)
    return disk_id


@pytest.mark.parametrize("sku, zone, refusal", [
    ("Premium_ZRS", None, None),
    ("StandardSSD_ZRS", None, None),
    ("Premium_LRS", "1", None),
    ("Premium_LRS", "2", "is not in the same zone as the VM. VM zone: '1'. Disk zone: '2'."),
    ("Premium_LRS", None, "is not in zone '1'."),
], ids=["premium-zrs", "standardssd-zrs", "same-zone", "other-zone", "regional"])
def test_a_disk_joins_a_zonal_vm_only_as_azure_allows(arm, broken, compute, sku, zone, refusal):
    from azure.mgmt.compute import models

    disk_id = put_disk(arm, "data-1", sku, zone)
    model = compute.virtual_machines.get(broken.resource_group, broken.name)
    model.storage_profile.data_disks = [models.DataDisk(lun=1, create_option="Attach",
                                                        managed_disk=models.ManagedDiskParameters(id=disk_id))]
    call = compute.virtual_machines.begin_create_or_update
    if refusal is None:
        call(broken.resource_group, broken.name, model, polling_interval=0.01).result()
        assert arm.get(disk_id)["managedBy"] == broken.vm_id
        return
    with pytest.raises(HttpResponseError) as err:
        call(broken.resource_group, broken.name, model, polling_interval=0.01).result()
    assert (err.value.status_code, err.value.error.code) == (400, "BadRequest")
    assert f"Disk {disk_id} cannot be attached to the VM because it {refusal}" in err.value.message
    assert "managedBy" not in arm.get(disk_id)


def test_a_zone_redundant_os_disk_has_no_zone_and_a_zonal_vm_keeps_it():
    from scripts.devkit.armdouble import ArmDouble

    with ArmDouble() as double:
        vm = add_broken_vm(double, sku="Premium_ZRS")
        assert "zones" not in double.get(vm.disk_id) and double.get(vm.vm_id)["zones"] == ["1"]
        nvme = add_broken_vm(double, name="web-02", controller="NVMe")
        assert double.get(nvme.vm_id)["properties"]["hardwareProfile"]["vmSize"] == "Standard_D4s_v6"
