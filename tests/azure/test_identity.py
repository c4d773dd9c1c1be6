"""scripts.azure.identity: every per-VM name comes from the resource ID, not the VM name."""

from __future__ import annotations

import re

import pytest

from scripts.azure.identity import vm_key

SUB = "00000000-0000-0000-0000-000000000001"


def vm(rg: str, name: str, sub: str = SUB) -> str:
    return f"/subscriptions/{sub}/resourceGroups/{rg}/providers/Microsoft.Compute/virtualMachines/{name}"


def test_same_name_in_another_group_or_subscription_gets_another_key():
    keys = {vm_key(vm("rg-a", "web-01")), vm_key(vm("rg-b", "web-01")),
            vm_key(vm("rg-a", "web-01", "00000000-0000-0000-0000-000000000002"))}
    assert len(keys) == 3 and all(k.startswith("web-01-") for k in keys)


def test_the_same_vm_spelled_differently_keeps_its_key():
    assert vm_key(vm("RG-A", "WEB-01").replace("Microsoft.Compute", "microsoft.compute")) == vm_key(vm("rg-a", "web-01"))


def test_keys_are_short_and_plain():
    key = vm_key(vm("rg", "A_very.long_VM.name_" + "x" * 60))
    assert re.fullmatch(r"[a-z0-9-]{1,40}-[0-9a-f]{8}", key) and len(key) <= 49


def test_only_vm_ids_have_keys():
    with pytest.raises(ValueError):
        vm_key("web-01")
