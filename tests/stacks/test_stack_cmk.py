"""The repair stack's disk copy of an OS disk encrypted with a customer-managed key (issue #15): the copy names
the source's disk encryption set. Synthesized with cdktf's Testing scope (just the DiskCopy construct on the
example config), not another whole-app variant of tests/support/synth.py."""

from __future__ import annotations

import json

import pytest
from cdktf import TerraformStack, Testing

from scripts.base.errors import ConfigError
from scripts.config.model import Config
from stacks.disk_copy import DiskCopy
from tests.support.synth import SUB, variant_data

DES = f"/subscriptions/{SUB}/resourceGroups/keys/providers/Microsoft.Compute/diskEncryptionSets/des-web"


def _synth(des: str) -> dict:
    data = variant_data("default")
    data["source"]["os_disk_encryption_set_id"] = des
    data["repair"]["strategy"] = "rescue-vm"
    config = Config.from_dict(data)
    assert config.source.os_disk_encryption_set_id == des
    stack = TerraformStack(Testing.app(), "repair")
    DiskCopy(stack, "copy", config, "crashcart-repair-web-01", {})
    return json.loads(Testing.synth(stack))["resource"]


def test_the_copy_of_a_cmk_disk_uses_the_sources_disk_encryption_set():
    (disk,) = _synth(DES)["azurerm_managed_disk"].values()
    assert disk["disk_encryption_set_id"] == DES and disk["create_option"] == "Copy"


def test_the_copy_of_a_platform_key_disk_names_no_encryption_set():
    (disk,) = _synth("")["azurerm_managed_disk"].values()
    assert "disk_encryption_set_id" not in disk


def test_an_encryption_set_id_that_is_not_one_is_refused_by_the_config():
    data = variant_data("default")
    data["source"]["os_disk_encryption_set_id"] = DES.replace("diskEncryptionSets", "disks")
    data["repair"]["strategy"] = "rescue-vm"
    with pytest.raises(ConfigError, match="disk encryption set resource ID"):
        Config.from_dict(data)


def test_discover_carries_a_cmk_disks_encryption_set_into_the_config_and_the_copy():
    """What discover reads from the OS disk (the SDK's Disk, as ARM returns it) reaches the copy."""
    from azure.mgmt.compute.models import Disk, DiskSku, Encryption

    from scripts.run.discover import disk_section

    disk = Disk(location="westeurope", disk_size_gb=127, sku=DiskSku(name="Premium_LRS"), hyper_v_generation="V2",
                encryption=Encryption(type="EncryptionAtRestWithCustomerKey", disk_encryption_set_id=DES))
    section = disk_section(disk)
    assert section["os_disk_encryption_set_id"] == DES
    (copy,) = _synth(section["os_disk_encryption_set_id"])["azurerm_managed_disk"].values()
    assert copy["disk_encryption_set_id"] == DES
    platform = Disk(location="westeurope", disk_size_gb=127, sku=DiskSku(name="Premium_LRS"),
                    encryption=Encryption(type="EncryptionAtRestWithPlatformKey"))
    assert "os_disk_encryption_set_id" not in disk_section(platform)
