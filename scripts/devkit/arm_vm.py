"""A broken VM, its OS disk and the region's VM sizes in the ARM double.

Bodies follow azure-rest-api-specs' examples (VirtualMachine_Get, Disk_Get, VirtualMachineSizes_List):
the sizes are the SKU catalogue's (scripts/devkit/arm_skus.py, which also serves ResourceSkus_List), and
the VM's size is one that can host it (Standard_D4s_v5, Standard_D4s_v6 for an NVMe VM). A ZRS OS disk has
no zone of its own, as Azure creates it. camelCase properties under `properties`, zones as a list, sku as
{name, tier}. Adding a broken VM also
gives the double's caller the source-side roles on it (README: Reader on its resource group, Disk Snapshot
Contributor on its OS disk), as the subscription owner does before a repair.
"""

from __future__ import annotations

from dataclasses import dataclass

from scripts.devkit import arm_skus
from scripts.devkit.armdouble import ArmDouble, Response

SUB = "00000000-0000-0000-0000-000000000001"


@dataclass
class BrokenVm:
    vm_id: str
    disk_id: str
    name: str
    resource_group: str
    subscription_id: str = SUB


def add_broken_vm(double: ArmDouble, name: str = "web-01", resource_group: str = "prod-web",
                  location: str = "westeurope", zone: str | None = "1", os_type: str = "Windows",
                  generation: str = "V2", security_type: str | None = "TrustedLaunch",
                  controller: str | None = "SCSI", sku: str = "Premium_LRS", size_gb: int = 127,
                  vm_size: str | None = None, unmanaged: bool = False,
                  disk_security_type: str | None = None) -> BrokenVm:
    # a size that can host the VM (scripts/devkit/arm_skus.py): the double refuses any update otherwise
    vm_size = vm_size or ("Standard_D4s_v6" if controller == "NVMe" else "Standard_D4s_v5")
    group = f"/subscriptions/{SUB}/resourceGroups/{resource_group}"
    vm_id = f"{group}/providers/Microsoft.Compute/virtualMachines/{name}"
    disk_name = f"{name}_OsDisk_1_0f4c2d"
    disk_id = f"{group}/providers/Microsoft.Compute/disks/{disk_name}"
    os_disk: dict = {"osType": os_type, "name": disk_name, "createOption": "FromImage", "caching": "ReadWrite",
                     "diskSizeGB": size_gb, "deleteOption": "Delete"}
    if unmanaged:
        os_disk["vhd"] = {"uri": f"https://{name.replace('-', '')}store.blob.core.windows.net/vhds/{name}.vhd"}
    else:
        os_disk["managedDisk"] = {"storageAccountType": sku, "id": disk_id}
    properties: dict = {
        "vmId": "0f47b100-583c-48e3-a4c0-aefc2c9bbcc1",
        "hardwareProfile": {"vmSize": vm_size},
        "storageProfile": {
            "imageReference": {"publisher": "MicrosoftWindowsServer", "offer": "WindowsServer",
                               "sku": "2019-datacenter-gensecond", "version": "latest"},
            "osDisk": os_disk, "dataDisks": [],
        },
        "osProfile": {"computerName": name, "adminUsername": "azureuser",
                      "windowsConfiguration": {"provisionVMAgent": True, "enableAutomaticUpdates": True}},
        "networkProfile": {"networkInterfaces": [{"id": f"{group}/providers/Microsoft.Network/networkInterfaces/{name}-nic"}]},
        "diagnosticsProfile": {"bootDiagnostics": {"enabled": True}},
        "provisioningState": "Succeeded",
    }
    if controller:
        properties["storageProfile"]["diskControllerType"] = controller
    if security_type:
        properties["securityProfile"] = {"securityType": security_type,
                                         "uefiSettings": {"secureBootEnabled": True, "vTpmEnabled": True}}
    vm: dict = {"name": name, "id": vm_id, "type": "Microsoft.Compute/virtualMachines", "location": location,
                "properties": properties, "tags": {"app": "web"}}
    if zone:
        vm["zones"] = [zone]
    double.put(vm_id, vm)
    disk_props: dict = {"osType": os_type, "hyperVGeneration": generation, "diskSizeGB": size_gb,
                        "diskSizeBytes": size_gb << 30, "diskState": "Attached", "provisioningState": "Succeeded",
                        "creationData": {"createOption": "FromImage"}, "networkAccessPolicy": "AllowAll",
                        "encryption": {"type": "EncryptionAtRestWithPlatformKey"}}
    if disk_security_type or security_type == "TrustedLaunch":
        disk_props["securityProfile"] = {"securityType": disk_security_type or "TrustedLaunch"}
    disk: dict = {"name": disk_name, "id": disk_id, "type": "Microsoft.Compute/disks", "location": location,
                  "sku": {"name": sku, "tier": sku.split("_")[0]}, "properties": disk_props,
                  "managedBy": vm_id}
    if zone and not sku.upper().endswith("_ZRS"):  # "A disk with sku 'Premium_ZRS' cannot be created in a zone"
        disk["zones"] = [zone]
    if not unmanaged:
        double.put(disk_id, disk)
    double.rbac.add_source(group, disk_id)
    double.route("GET", rf"/subscriptions/{SUB}/providers/Microsoft\.Compute/locations/{location}/vmSizes",
                 lambda d, req, m: Response(200, {"value": [s.vm_size() for s in arm_skus.sizes_in(location)]}))
    arm_skus.install(double)
    return BrokenVm(vm_id, disk_id, name, resource_group)
