"""Config loading: the example is valid, env overrides apply, and every bad value gets one clear message."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from scripts.azure.identity import vm_key
from scripts.config.model import Config
from scripts.base.errors import ConfigError, CrashcartError, ExitCode
from tests.support.synth import EXAMPLE, REPO, example_data


def with_change(section: str, **changes):
    data = example_data()
    data[section].update(changes)
    return data


def test_example_config_loads_with_derived_defaults():
    config = Config.load(EXAMPLE)
    assert config.source.vm_name == "web-01"
    # issue #13: keyed by the VM's resource ID (readable name + 8 hex of its hash), not by the name alone
    assert config.repair_resource_group == f"crashcart-repair-{vm_key(config.source.vm_id)}"
    assert re.fullmatch(r"crashcart-repair-web-01-[0-9a-f]{8}", config.repair_resource_group)
    assert str(config.rescue_image) == "MicrosoftWindowsServer:WindowsServer:2022-datacenter-g2:latest"
    assert config.evidence_location == "westeurope"
    name = config.evidence_account_name
    assert name.startswith("crashcart") and len(name) <= 24 and name == Config.load(EXAMPLE).evidence_account_name


def test_environment_overrides_the_file():
    env = {"CRASHCART_RESCUE_OS": "linux", "CRASHCART_REPAIR_TTL_HOURS": "2", "CRASHCART_TAGS": "ticket=42,env=prod",
           "CRASHCART_EVIDENCE_ALLOWED_IP_RANGES": "203.0.113.7,198.51.100.0/24", "CRASHCART_EVIDENCE_FIREWALL": "false"}
    config = Config.load(EXAMPLE, env=env)
    assert config.rescue.os == "linux"
    assert config.repair.ttl_hours == 2
    assert config.tags == {"owner": "ops", "ticket": "42", "env": "prod"}
    assert config.evidence.allowed_ip_ranges == ("203.0.113.7", "198.51.100.0/24")
    assert str(config.rescue_image) == "Canonical:ubuntu-24_04-lts:server:latest"


def test_config_file_is_found_through_crashcart_config(tmp_path):
    path = tmp_path / "other.toml"
    path.write_text(EXAMPLE.read_text())
    assert Config.load(env={"CRASHCART_CONFIG": str(path)}).source.vm_name == "web-01"


def test_written_config_reads_back_identical(tmp_path):
    config = Config.load(EXAMPLE)
    path = tmp_path / "repair.toml"
    path.write_text(config.to_toml())
    assert Config.load(path) == config


SUB = "00000000-0000-0000-0000-000000000001"
BAD = [
    ("source", {"subscription_id": "not-a-guid"}, "source.subscription_id", "GUID"),
    ("source", {"os_disk_id": "/subscriptions/x/disks/y"}, "source.os_disk_id", "managed disk resource ID"),
    ("source", {"os_disk_id": "https://acct.blob.core.windows.net/vhds/osdisk.vhd"}, "source.os_disk_id", "unmanaged"),
    ("source", {"location": "westeuropa"}, "source.location", "did you mean westeurope"),
    ("source", {"location": "westus", "zone": "1"}, "source.zone", "no availability zones"),
    ("source", {"zone": "4"}, "source.zone", '"1", "2" or "3"'),
    ("source", {"os_type": "Linux"}, "source.os_type", "Windows"),
    ("source", {"security_type": "ConfidentialVM"}, "source.security_type", "Confidential VM"),
    ("source", {"hyper_v_generation": "V1"}, "source.hyper_v_generation", "Trusted Launch"),
    ("source", {"resource_group": "x" * 91}, "source.resource_group", "1-90"),
    ("source", {"resource_group": "bad name!"}, "source.resource_group", "resource group name"),
    ("source", {"vm_name": "web 01"}, "source.vm_name", "VM name"),
    ("source", {"vm_name": "v" * 65}, "source.vm_name", "1-64"),
    ("source", {"os_disk_sku": "UltraSSD_LRS"}, "source.os_disk_sku", "Premium_LRS"),
    ("source", {"os_disk_size_gb": "big"}, "source.os_disk_size_gb", "whole number"),
    ("source", {"disk_controller": "IDE"}, "source.disk_controller", "SCSI, NVMe"),
    ("rescue", {"os": "freebsd"}, "rescue.os", "windows, linux"),
    ("rescue", {"admin_username": "administrator"}, "rescue.admin_username", "reserved"),
    ("rescue", {"image": "just-a-sku"}, "rescue.image", "publisher:offer:sku:version"),
    ("rescue", {"size": "D4s_v5"}, "rescue.size", "Standard_D4s_v5"),
    ("network", {"subnet_id": "/subscriptions/x/subnets/y"}, "network.subnet_id", "subnet resource ID"),
    ("network", {"address_space": "10.0.0.0/8"}, "network.address_space", "/16 and /28"),
    ("evidence", {"account_name": "Has_Upper"}, "evidence.account_name", "3-24 lowercase"),
    ("evidence", {"account_name": "a" * 25}, "evidence.account_name", "3-24 lowercase"),
    ("evidence", {"container": "Dumps"}, "evidence.container", "container name"),
    ("evidence", {"container": "a--b"}, "evidence.container", "single hyphens"),
    ("evidence", {"account_id": f"/subscriptions/{SUB}/resourceGroups/rg/providers/Microsoft.Storage/x"},
     "evidence.account_id", "storage account resource ID"),
    ("evidence", {"firewall": True}, "evidence.firewall", "rescue subnet"),
    ("evidence", {"location": "mars"}, "evidence.location", "Azure region"),
    ("repair", {"ttl_hours": 0}, "repair.ttl_hours", "1-168"),
    ("repair", {"strategy": "rdp"}, "repair.strategy", "rescue-vm, snapshot-export"),
    ("backend", {"kind": "azurerm"}, "backend.resource_group", "resource group name"),
    ("tags", {"crashcart": "mine"}, "tags.crashcart", "does not set itself"),
]


@pytest.mark.parametrize("section,change,field,expected", BAD, ids=[b[2] + ":" + str(b[1])[:30] for b in BAD])
def test_bad_value_names_field_value_and_expected_form(section, change, field, expected):
    data = example_data()
    data[section].update(change)
    with pytest.raises(ConfigError) as info:
        Config.from_dict(data)
    err = info.value
    assert err.field == field
    text = f"{err.message} {err.hint}"
    assert expected in text
    assert err.exit_code == ExitCode.USAGE


def test_unknown_key_suggests_the_right_one():
    data = example_data()
    data["source"]["vmname"] = "x"
    with pytest.raises(ConfigError, match='did you mean "vm_name"'):
        Config.from_dict(data)


def test_missing_source_key_points_at_discover():
    data = example_data()
    del data["source"]["os_disk_id"]
    with pytest.raises(ConfigError) as info:
        Config.from_dict(data)
    assert "discover" in info.value.hint


def test_missing_file_and_broken_toml_are_usage_errors(tmp_path):
    with pytest.raises(CrashcartError, match="no config file") as info:
        Config.load(tmp_path / "nope.toml")
    assert "discover" in info.value.hint and info.value.exit_code == ExitCode.USAGE
    broken = tmp_path / "broken.toml"
    broken.write_text("[source\nvm_name = ")
    with pytest.raises(CrashcartError, match="not valid TOML"):
        Config.load(broken)


def test_bad_env_override_is_reported_with_its_variable_name():
    with pytest.raises(ConfigError, match="CRASHCART_TAGS"):
        Config.load(EXAMPLE, env={"CRASHCART_TAGS": "novalue"})
    with pytest.raises(ConfigError, match="repair.ttl_hours"):
        Config.load(EXAMPLE, env={"CRASHCART_REPAIR_TTL_HOURS": "soon"})


def test_synth_with_a_bad_config_prints_one_message_and_exits_2(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text(EXAMPLE.read_text().replace('location = "westeurope"', 'location = "atlantis"'))
    result = subprocess.run([sys.executable, "main.py"], cwd=REPO, capture_output=True, text=True,
                            env={"CRASHCART_CONFIG": str(bad), "PATH": "/usr/bin:/bin"}, timeout=60)
    assert result.returncode == 2
    assert 'source.location = "atlantis" is not valid' in result.stderr
    assert "Traceback" not in result.stderr
