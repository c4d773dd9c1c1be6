"""Resource IDs in the config: their shape is read by scripts.azure.ids, their parts follow config's naming rules."""

from __future__ import annotations

import pytest

from scripts.azure import ids
from scripts.base.errors import ConfigError
from scripts.config.model import Config
from tests.support.synth import SUB, example_data

ACCOUNT = f"/subscriptions/{SUB}/resourceGroups/sec-evidence/providers/Microsoft.Storage/storageAccounts/secdumps01"


def _with(section: str, **changes):
    data = example_data()
    data[section].update(changes)
    return data


@pytest.mark.parametrize("section,key,value", [
    ("source", "os_disk_id", f"/subscriptions/{SUB}/resourceGroups/rg./providers/Microsoft.Compute/disks/d"),
    ("source", "os_disk_id", f"/subscriptions/{SUB}/resourceGroups/rg/providers/Microsoft.Compute/snapshots/d"),
    ("evidence", "account_id", ACCOUNT.replace("secdumps01", "ab")),
    ("evidence", "account_id", ACCOUNT.replace("secdumps01", "sec_dumps")),
    ("network", "subnet_id", f"/subscriptions/{SUB}/resourceGroups/rg/providers/Microsoft.Network/virtualNetworks/v"),
])
def test_a_bad_id_names_the_form_expected(section, key, value):
    kind = {"os_disk_id": "disk", "account_id": "storage_account", "subnet_id": "subnet"}[key]
    with pytest.raises(ConfigError) as info:
        Config.from_dict(_with(section, **{key: value}))
    assert info.value.field == f"{section}.{key}"
    assert ids.FORMS[kind] in info.value.message


def test_ids_match_case_insensitively_like_arm():
    config = Config.from_dict(_with("evidence", account_id=ACCOUNT.replace("storageAccounts/secdumps01",
                                                                           "storageaccounts/SECDUMPS01")))
    assert config.evidence_account_name == "SECDUMPS01"
    assert config.evidence_account_resource_group == "sec-evidence"


def test_the_evidence_group_is_the_created_one_without_an_account_id():
    config = Config.from_dict(example_data())
    assert config.evidence_account_resource_group == config.evidence.resource_group
    assert ids.parse(config.evidence_account_id, "storage_account").name == config.evidence_account_name
    assert ids.parse(config.source.vm_id, "vm").name == config.source.vm_name
