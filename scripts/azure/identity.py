"""A VM is its resource ID: the one derivation of every name the kit keys by VM.

Two VMs may share a name in another resource group or subscription. Everything the kit keeps per VM -
Terraform state key and local state file, repair resource group, evidence prefix, the ABAC prefix of the
rescue VM's role assignment, the run lock, the report folder - is named by `vm_key(vm_id)`: a readable
part (the VM name, lower-cased, reduced to letters, digits and hyphens) and the first 8 hex digits of the
SHA-256 of the lower-cased ID (ARM compares IDs case-insensitively, so the same VM always gets the same
key however its ID is spelled). 8 hex digits keep a collision between two VMs of one operator at about
one in four billion while the names stay short enough for Azure's limits (a resource group name is at
most 90 characters).
"""

from __future__ import annotations

import hashlib
import re

from scripts.azure import ids

READABLE_CHARS = 40  # of the VM name, before the hash
HASH_CHARS = 8


def vm_key(vm_id: str) -> str:
    """`web-01-1a2b3c4d` for .../virtualMachines/WEB-01 (ValueError for anything that is not a VM ID)."""
    vm = ids.parse(vm_id, "vm")
    digest = hashlib.sha256(vm.key.encode("utf-8")).hexdigest()[:HASH_CHARS]
    readable = re.sub(r"[^a-z0-9]+", "-", vm.name.lower()).strip("-")[:READABLE_CHARS].strip("-") or "vm"
    return f"{readable}-{digest}"
