"""scripts.azure.ids: the one reader of resource IDs."""

from __future__ import annotations

import pytest

from scripts.azure import ids
from scripts.base.errors import CrashcartError, ExitCode

SUB = "00000000-0000-0000-0000-000000000001"
VM = f"/subscriptions/{SUB}/resourceGroups/rg-web/providers/Microsoft.Compute/virtualMachines/web-01"
SUBNET = f"/subscriptions/{SUB}/resourceGroups/net/providers/Microsoft.Network/virtualNetworks/hub/subnets/rescue"


def test_parts_of_a_vm_id():
    vm = ids.parse(VM, "vm")
    assert (vm.subscription, vm.resource_group, vm.name, vm.parent) == (SUB, "rg-web", "web-01", "")
    assert vm.id == VM and str(vm) == VM


def test_a_child_resource_keeps_its_parent():
    subnet = ids.parse(SUBNET, "subnet")
    assert (subnet.parent, subnet.name) == ("hub", "rescue") and subnet.id == SUBNET


def test_types_match_case_insensitively_as_arm_does():
    vm = ids.parse(VM.replace("Microsoft.Compute/virtualMachines", "microsoft.compute/VIRTUALMACHINES"), "vm")
    assert vm.name == "web-01" and ids.same(vm.id, VM.upper())


@pytest.mark.parametrize("value", [
    VM.replace("virtualMachines", "disks"),  # another type
    VM + "/extensions/x",  # a child of a VM is not a VM
    VM.replace(SUB, "not-a-guid"),
    VM + "\n",  # a newline would forge a second log line
    VM.replace("web-01", "web 01"),
    VM + "?x=1",  # a query pasted along (CLI review: discover --vm sent it to Azure)
    VM.replace("web-01", "web%2F01"), VM.replace("web-01", "web#01"),  # URL syntax no ARM name holds
    VM.replace("resourceGroups/rg", "resourceGroups/r&g"),
    "web-01", "", None, 42,
])
def test_anything_else_is_refused(value):
    assert ids.try_parse(value, "vm") is None
    with pytest.raises(ValueError, match="virtualMachines/<name>"):
        ids.parse(value, "vm")


def test_require_is_a_usage_error_with_the_form_and_the_hint():
    with pytest.raises(CrashcartError) as caught:
        ids.require("web-01", "vm", "check the stack's outputs")
    assert caught.value.exit_code == ExitCode.USAGE
    assert "/subscriptions/<guid>/resourceGroups/<rg>/providers/Microsoft.Compute/virtualMachines/<name>" in \
        caught.value.message and caught.value.hint == "check the stack's outputs"


def test_build_round_trips():
    built = ids.build("subnet", SUB, "net", "rescue", parent="hub")
    assert built == SUBNET and ids.parse(built, "subnet").name == "rescue"
    assert ids.is_subscription_id(SUB) and not ids.is_subscription_id("sub")
