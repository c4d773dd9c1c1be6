"""The BitLocker key of an Azure Disk Encryption (ADE) OS disk, for a collection that must read the volume.

Where the key is: the disk says it (`encryptionSettingsCollection`, single-pass ADE), or, for the older
dual-pass ADE, the VM (`storageProfile.osDisk.encryptionSettings`): read with compute.disks.get /
virtualMachines.get, turned into key references by scripts.azure.keyvault.references, and the .BEK file read
from the VM's Key Vault with the kit's own credential (keyvault.read_bek: unwrapped with the KEK when there is
one). Only asked when the volume turned out to be BitLocker and the disk names a key: a disk without
encryption settings costs nothing, and an encrypted volume whose disk names no key is refused (exit 11) with
the ways out (`NO_KEY_HINT`).

The key is held in memory for the one run, never logged or written; what a report shows is `Bek.describe()`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from scripts.azure import ids, keyvault
from scripts.azure.clients import AzureClients
from scripts.azure.errors import azure_call
from scripts.base.errors import ExitCode
from scripts.windisk.errors import ExtractError

log = logging.getLogger("crashcart.ade_key")

NO_KEY_HINT = (
    "Azure Disk Encryption: enable it so that the disk names its key (`az vm encryption show`), and give the identity "
    "that runs crashcart 'Key Vault Secrets User' (and 'Key Vault Crypto User' with a key encryption key) on the VM's "
    "Key Vault: crashcart then reads the BEK and unlocks the volume itself; BitLocker without ADE: unlock the disk "
    "copy on a Windows rescue VM with its recovery password (`manage-bde -unlock F: -RecoveryPassword <key>`) and "
    "collect with repair.strategy = \"rescue-vm\"; or decrypt the volume from a working boot (`manage-bde -off C:`)")


def key_references(disk_id: str, vm_id: str = "") -> list[keyvault.AdeKeyReference]:
    """The ADE key references the disk (or, failing that, its VM) names; [] when it is not ADE-encrypted."""
    disk_ref = ids.require(disk_id, "disk", "check source.os_disk_id (the broken VM's OS disk)")
    compute = AzureClients(disk_ref.subscription).compute
    disk = azure_call(lambda: compute.disks.get(disk_ref.resource_group, disk_ref.name),
                      f"read the OS disk {disk_ref.name}")
    found = keyvault.references(disk=disk)
    if found or not vm_id:
        return found
    vm_ref = ids.require(vm_id, "vm", "check the source VM's resource ID")
    vm = azure_call(lambda: AzureClients(vm_ref.subscription).compute.virtual_machines.get(
        vm_ref.resource_group, vm_ref.name), f"read the VM {vm_ref.name}")
    return keyvault.references(vm=vm)


def read_keys(disk_id: str, vm_id: str, credential: Callable[[], Any], **client_kwargs: Any) -> list[keyvault.Bek]:
    """Every BitLocker key the disk's encryption settings name, read from Key Vault (usually one: the OS
    volume's), with `credential()` (made only when there is a key to read). Raises ExtractError (exit 11) when the disk names none, the keyvault errors (exit 3: no access,
    naming the vault and the role; 4: deleted) otherwise."""
    references = key_references(disk_id, vm_id)
    if not references:
        raise ExtractError("the Windows volume is encrypted with BitLocker and the disk's encryption settings name no "
                           "Azure Disk Encryption key (encryptionSettingsCollection is empty), so crashcart has no key "
                           "to unlock it", NO_KEY_HINT, ExitCode.DISK_NOT_FOUND)
    keys = []
    for reference in references:
        log.info("    reading the BitLocker key from Key Vault %s (%s)", reference.vault_name,
                 reference.secret_url.split("?")[0])
        keys.append(keyvault.read_bek(reference, credential(), **client_kwargs))
    return keys
