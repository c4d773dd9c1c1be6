"""DiskCopy: a snapshot of the broken OS disk and a managed disk made from it.

The source disk is only read (the snapshot's create option is Copy). Every later step works on the
copy, so whatever goes wrong, the original disk is as the crash left it.

A source encrypted with a customer-managed key (source.os_disk_encryption_set_id, which discover reads
from the disk) gives the copy the same disk encryption set. azurerm_snapshot (provider 4.55) has no
disk_encryption_set_id argument, so the snapshot's encryption is what Azure gives a Copy of that disk.
"""

from __future__ import annotations

from cdktf import TerraformResourceLifecycle
from cdktf_cdktf_provider_azurerm.managed_disk import ManagedDisk
from cdktf_cdktf_provider_azurerm.snapshot import Snapshot
from constructs import Construct

from scripts.config.model import Config

# What a Copy takes from its snapshot and azurerm reads back into attributes that force replacement.
INHERITED_FROM_SNAPSHOT = ("trusted_launch_enabled", "security_type")


class DiskCopy(Construct):
    """Exposes `snapshot_id` and `disk_id`."""

    def __init__(self, scope: Construct, id: str, config: Config, group_name: str, tags: dict[str, str]):
        super().__init__(scope, id)
        source = config.source
        # snapshot-export reads the snapshot over a short-lived SAS (grant access), which a DenyAll
        # network access policy forbids; the rescue-vm path never exports anything.
        exportable = config.repair.strategy == "snapshot-export"
        snapshot = Snapshot(
            self, "snapshot", name=f"{source.vm_name}-crashcart-snapshot"[:80], resource_group_name=group_name,
            location=source.location, create_option="Copy", source_uri=source.os_disk_id,
            incremental_enabled=False,
            network_access_policy="AllowAll" if exportable else "DenyAll",
            public_network_access_enabled=exportable,
            tags=tags,
        )
        disk = ManagedDisk(
            self, "disk", name=f"{source.vm_name}-crashcart-copy"[:80], resource_group_name=group_name,
            location=source.location, create_option="Copy", source_resource_id=snapshot.id,
            storage_account_type=source.os_disk_sku, disk_size_gb=source.os_disk_size_gb,
            hyper_v_generation=source.hyper_v_generation, os_type="Windows",
            # A copy must sit in the zone of the VM it attaches to; ZRS disks have no zone of their own.
            zone=source.zone if source.zone and not source.os_disk_sku.endswith("_ZRS") else None,
            # Trusted Launch state travels with the snapshot: azurerm only accepts trusted_launch_enabled
            # for Import/FromImage, and a Copy inherits the source's security profile.
            network_access_policy="DenyAll",
            public_network_access_enabled=False,
            # A source encrypted with a customer-managed key: the copy is encrypted with the same disk
            # encryption set (the copy holds the same data; it stays under the customer's key).
            disk_encryption_set_id=source.os_disk_encryption_set_id or None,
            tags=tags,
            # ...and reads it back as trusted_launch_enabled = true (security_type for other profiles). Both
            # force a new disk when they differ from the config, which never sets them: without this, every
            # re-apply of a kept repair stack would replace the copy of a Trusted Launch source (and detach it
            # from the rescue VM). Azure decides them from the snapshot; the config has no say.
            lifecycle=TerraformResourceLifecycle(ignore_changes=list(INHERITED_FROM_SNAPSHOT)),
        )
        self.snapshot_id = snapshot.id
        self.disk_id = disk.id
