"""RescueVm: the short-lived VM the disk copy is attached to, driven only by Run Command.

It matches the source where that matters for reading its disk: the Hyper-V generation (image) and Trusted
Launch (secure boot + vTPM). It declares no disk controller: the copy is only read, as a data disk, and a
data disk is presented through whatever controller the VM has (a disk's `diskControllerTypes` is what it
supports as an *OS* disk: "The disk controllers that an OS disk supports", Compute REST API). Left
undeclared, Azure gives the VM its size's default controller, one the size has by definition ("the
platform will automatically choose the default controller based on the VM size configuration"): SCSI on
Standard_D4s_v5, NVMe on the NVMe-only v6 sizes. Declaring the source's NVMe instead would make the
default size refuse the VM (InvalidParameter: "The VM size 'Standard_D4s_v5' cannot boot with
DiskControllerType 'NVMe'"), and declaring SCSI would make a v6 size refuse it. The remote scripts find
the copy at its LUN on either controller. It has a system-assigned identity, which is what uploads the
dump: no storage key or SAS ever reaches the VM.
"""

from __future__ import annotations

from typing import Any

from cdktf_cdktf_provider_azurerm import linux_virtual_machine as linux
from cdktf_cdktf_provider_azurerm import windows_virtual_machine as windows
from cdktf_cdktf_provider_azurerm.virtual_machine_data_disk_attachment import VirtualMachineDataDiskAttachment
from constructs import Construct

from scripts.config.model import Config

DISK_COPY_LUN = 0


class RescueVm(Construct):
    """Exposes `vm_id`, `vm_name` and `principal_id` (the identity the role assignment is for).

    `admin_secret` is a Terraform variable's value: the Windows admin password or the Linux SSH public
    key. It reaches Terraform from the environment at deploy time, never through cdk.tf.json.
    """

    def __init__(self, scope: Construct, id: str, config: Config, group_name: str, nic_id: str,
                 disk_id: str, admin_secret: str, tags: dict[str, str]):
        super().__init__(scope, id)
        source, rescue = config.source, config.rescue
        trusted_launch = source.security_type == "TrustedLaunch"
        common: dict[str, Any] = dict(
            name=rescue.name,
            resource_group_name=group_name,
            location=source.location,
            zone=source.zone or None,
            size=rescue.size,
            admin_username=rescue.admin_username,
            network_interface_ids=[nic_id],
            # Run Command is a VM extension: this VM is useless without extension operations.
            allow_extension_operations=True,
            provision_vm_agent=True,
            secure_boot_enabled=trusted_launch or None,
            vtpm_enabled=trusted_launch or None,
            tags=tags,
        )
        if rescue.os == "windows":
            vm: Any = windows.WindowsVirtualMachine(
                self, "vm", admin_password=admin_secret,
                computer_name="ccrescue",  # NetBIOS: 15 characters at most, whatever the resource name
                patch_mode="AutomaticByOS", automatic_updates_enabled=True,
                **common, **self._parts(windows, "WindowsVirtualMachine", config))
        else:
            vm = linux.LinuxVirtualMachine(
                self, "vm", computer_name="crashcart-rescue", disable_password_authentication=True,
                admin_ssh_key=[linux.LinuxVirtualMachineAdminSshKey(username=rescue.admin_username,
                                                                     public_key=admin_secret)],
                **common, **self._parts(linux, "LinuxVirtualMachine", config))
        VirtualMachineDataDiskAttachment(
            self, "disk_copy", managed_disk_id=disk_id, virtual_machine_id=vm.id, lun=DISK_COPY_LUN,
            # No host caching: the copy is read once, sequentially, and may be larger than the cache allows.
            caching="None",
        )
        self.vm_id = vm.id
        self.vm_name = vm.name
        self.principal_id = vm.identity.principal_id

    @staticmethod
    def _parts(module: Any, prefix: str, config: Config) -> dict[str, Any]:
        """The nested blocks both VM kinds share, built from the module's own struct classes."""
        image = config.rescue_image
        return dict(
            os_disk=getattr(module, f"{prefix}OsDisk")(
                name=f"{config.rescue.name}-os", caching="ReadWrite", storage_account_type="StandardSSD_LRS"),
            source_image_reference=getattr(module, f"{prefix}SourceImageReference")(
                publisher=image.publisher, offer=image.offer, sku=image.sku, version=image.version),
            identity=getattr(module, f"{prefix}Identity")(type="SystemAssigned"),
            # Managed boot diagnostics: the serial log is there when the rescue VM itself misbehaves.
            boot_diagnostics=getattr(module, f"{prefix}BootDiagnostics")(),
        )
