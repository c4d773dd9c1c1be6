"""Issue #13, config: invalid values are refused (defect 7), no input gives a traceback (defect 6), every
message is one escaped line, and the repair group is keyed by the VM's resource ID (deliver 1)."""

from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest

from scripts.azure.identity import vm_key
from scripts.base.errors import ConfigError, CrashcartError, ExitCode
from scripts.config.model import Config
from tests.support.synth import EXAMPLE, REPO, SUB, example_data

DISK = f"/subscriptions/{SUB}/resourceGroups/prod-web/providers/Microsoft.Compute/disks/web-01_OsDisk_1"
FORGED = "web-01\nerror: config OK, deploying to production\x1b[2K"


def refused(section: str, key: str, value) -> ConfigError:
    data = example_data()
    data[section][key] = value
    with pytest.raises(ConfigError) as info:
        Config.from_dict(data)
    return info.value


def one_clean_line(err: CrashcartError) -> None:
    for text in (err.message, err.hint):
        assert text.isprintable(), repr(text)  # no newline, escape sequence, bidi or zero-width character


# ---- defect 7: invalid values accepted ----------------------------------------------------------------------
INVALID = [
    ("source", "vm_name", "web\u202e10-bew", "printable characters on one line"),  # right-to-left override
    ("source", "vm_name", "web\u200b01", "printable characters on one line"),  # zero-width space
    ("source", "os_disk_id", DISK + "\n", "printable characters on one line"),
    ("source", "vm_size", "Standard_D4s_v5\rStandard_M416", "printable characters on one line"),
    ("source", "memory_gb", math.inf, "0-65536"),
    ("source", "memory_gb", -math.inf, "0-65536"),
    ("source", "memory_gb", math.nan, "0-65536"),
    ("source", "memory_gb", True, "a number"),
    ("source", "memory_gb", 1e300, "0-65536"),
    ("evidence", "allowed_ip_ranges", ["203.0.113.300/24"], "public IPv4 address or CIDR"),
    ("evidence", "allowed_ip_ranges", ["203.0.113.7/24"], "public IPv4 address or CIDR"),  # host bits set
    ("evidence", "allowed_ip_ranges", ["10.0.0.0/8"], "no private"),
    ("evidence", "allowed_ip_ranges", ["203.0.113.0/31"], "/8 to /30"),
    ("network", "address_space", "10.250.0.0/24/8", "IPv4 CIDR"),
    ("backend", "storage_account", "CrashcartState01", "3-24 lowercase"),
    ("backend", "container", "TF_State", "container name"),
    ("rescue", "image", "MicrosoftWindowsServer:WindowsServer:$(id):latest", "image URN"),
    ("rescue", "image", "Canonical:ubuntu-24_04-lts:server:latest;reboot", "image URN"),
    ("rescue", "admin_username", "\u017fupport", "1-20 letters"),  # long s: 'support' to a case-folding regex
    ("tags", "team", {"name": "ops"}, "flat"),
    ("tags", "ticket", ["a", "b"], "flat"),
    ("tags", "o" * 129, "x", "1-128"),
    ("tags", "Owner", "x", "used once"),  # the example has owner; Azure tag names ignore case
]


@pytest.mark.parametrize("section,key,value,expected", INVALID,
                         ids=[f"{s}.{k[:10]}={v!r:.30}" for s, k, v, _ in INVALID])
def test_an_invalid_value_is_refused_in_one_line(section, key, value, expected):
    err = refused(section, key, value)
    assert err.field.split("[")[0].startswith(f"{section}.{key}"[:60])
    assert expected in err.message
    assert err.exit_code == ExitCode.USAGE
    one_clean_line(err)


@pytest.mark.parametrize("variable,value,field", [
    ("CRASHCART_REPAIR_TTL_HOURS", "\u0663", "repair.ttl_hours"),  # an Arabic-Indic 3 is no hour count
    ("CRASHCART_SOURCE_OS_DISK_SIZE_GB", "1" * 5000, "source.os_disk_size_gb"),
    ("CRASHCART_SOURCE_MEMORY_GB", "nan", "source.memory_gb"),
    ("CRASHCART_SOURCE_MEMORY_GB", "inf", "source.memory_gb"),
    ("CRASHCART_EVIDENCE_FIREWALL", "2", "evidence.firewall"),
    ("CRASHCART_SOURCE_VM_NAME", FORGED, "source.vm_name"),
])
def test_a_bad_environment_override_names_its_variable(variable, value, field):
    with pytest.raises(ConfigError) as info:
        Config.load(EXAMPLE, env={variable: value})
    assert info.value.field == field and variable in info.value.hint
    one_clean_line(info.value)


def test_a_misspelt_override_is_not_silently_ignored():
    with pytest.raises(ConfigError, match='did you mean "vm_name"') as info:
        Config.load(EXAMPLE, env={"CRASHCART_SOURCE_VMNAME": "web-02"})
    assert "CRASHCART_SOURCE_VMNAME" in info.value.hint


def test_a_raw_newline_cannot_forge_a_line_of_the_message():
    err = refused("source", "vm_name", FORGED)
    assert "\n" not in err.message and "\x1b" not in err.message
    assert 'web-01\\nerror: config OK, deploying to production\\x1b[2K' in err.message


def test_an_unknown_key_with_control_characters_is_shown_escaped():
    err = refused("source", "vm_name\x1b]0;owned\x07", "x")
    assert err.field == "source.vm_name\\x1b]0;owned\\x07"
    one_clean_line(err)


def test_numbers_from_toml_and_the_environment_are_typed():
    config = Config.load(EXAMPLE, env={"CRASHCART_SOURCE_MEMORY_GB": "32", "CRASHCART_REPAIR_TTL_HOURS": " 4 ",
                                       "CRASHCART_EVIDENCE_SOFT_DELETE_DAYS": "+7"})
    assert config.source.memory_gb == 32.0 and isinstance(config.source.memory_gb, float)
    assert (config.repair.ttl_hours, config.evidence.soft_delete_days) == (4, 7)


# ---- defect 6: tracebacks instead of exit 2 -----------------------------------------------------------------
def summary(config_path, **env: str) -> subprocess.CompletedProcess:
    """`python -m scripts summary --config F`: the real entry, where a traceback would show."""
    return subprocess.run([sys.executable, "-m", "scripts", "summary", "--config", str(config_path)], cwd=REPO,
                          capture_output=True, text=True, timeout=60,
                          env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO), **env})


def assert_usage_error(result: subprocess.CompletedProcess, *phrases: str) -> None:
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    assert [line[:6] for line in lines] == ["error:", "next: "], result.stderr
    for phrase in phrases:
        assert phrase in lines[0], lines[0]


def example_with(old: str, new: str) -> str:
    text = EXAMPLE.read_text()
    assert old in text
    return text.replace(old, new)


CASES = {
    "directory": (None, "is a directory"),
    "latin-1": (example_with('owner = "ops"', 'owner = "M\u00fcller"').encode("latin-1"), "not UTF-8"),
    "string-for-a-table": (('source = "x"\n[rescue]' + EXAMPLE.read_text().split("[rescue]", 1)[1]).encode(),
                           'source = "x"'),
    "huge-integer": (example_with("os_disk_size_gb = 127", "os_disk_size_gb = " + "9" * 5000).encode(),
                     "4300 digits"),
    "nan": (example_with("memory_gb = 16.0", "memory_gb = nan").encode(), "source.memory_gb = nan"),
    "inf": (example_with("memory_gb = 16.0", "memory_gb = inf").encode(), "source.memory_gb = inf"),
    "bool-for-a-number": (example_with("memory_gb = 16.0", "memory_gb = true").encode(), "source.memory_gb = True"),
}


@pytest.mark.parametrize("case", CASES)
def test_a_broken_config_file_is_exit_2_without_a_traceback(case, tmp_path):
    content, phrase = CASES[case]
    path = tmp_path / "repair.toml"
    if content is None:
        path.mkdir()
    else:
        path.write_bytes(content)
    override = {"CRASHCART_SOURCE_VM_NAME": "web-02"}  # an override of a key of the broken table, too
    with pytest.raises(CrashcartError, match=phrase.replace("(", r"\(")) as info:
        Config.load(path, env=override)
    assert info.value.exit_code == ExitCode.USAGE
    if case in ("string-for-a-table", "inf", "latin-1"):
        assert_usage_error(summary(path, **override), phrase)


def test_a_named_pipe_is_refused_at_once(tmp_path):
    path = tmp_path / "repair.toml"
    os.mkfifo(path)
    assert_usage_error(summary(path), "not a regular file")  # reading it would wait for a writer forever


def test_unicode_digits_in_extra_regions_are_exit_2():
    with pytest.raises(ConfigError, match="CRASHCART_EXTRA_REGIONS"):
        Config.load(EXAMPLE, env={"CRASHCART_EXTRA_REGIONS": "newregion:\u00b2"})
    assert_usage_error(summary(EXAMPLE, CRASHCART_EXTRA_REGIONS="newregion:\u00b2"), "CRASHCART_EXTRA_REGIONS")


def test_synth_refuses_a_directory_as_config_with_exit_2(tmp_path):
    result = subprocess.run([sys.executable, "main.py"], cwd=REPO, capture_output=True, text=True, timeout=60,
                            env={"CRASHCART_CONFIG": str(tmp_path), "PATH": "/usr/bin:/bin"})
    assert_usage_error(result, "is a directory")


def test_a_new_region_with_zones_is_allowed_through_the_environment():
    data = example_data()
    data["source"]["location"] = "marsnorth"
    config = Config.from_dict(data, env={"CRASHCART_EXTRA_REGIONS": "marsnorth:3"})
    assert config.source.location == "marsnorth" and config.source.zone == "1"


# ---- deliver 1: the repair group is keyed by the VM's resource ID ------------------------------------------
def test_same_named_vms_in_other_groups_get_distinct_repair_groups():
    first = Config.from_dict(example_data())
    data = example_data()
    data["source"]["resource_group"] = "prod-web-2"
    second = Config.from_dict(data)
    assert first.source.vm_name == second.source.vm_name
    assert first.repair_resource_group != second.repair_resource_group
    assert second.repair_resource_group == f"crashcart-repair-{vm_key(second.source.vm_id)}"


def test_the_repair_group_name_of_a_64_character_vm_name_fits_azure():
    data = example_data()
    data["source"]["vm_name"] = "V" * 63 + "9"
    config = Config.from_dict(data)
    assert len(config.repair_resource_group) <= 90
    assert config.repair_resource_group.startswith("crashcart-repair-vvvv")
    data["repair"]["resource_group"] = "my-repairs"
    assert Config.from_dict(data).repair_resource_group == "my-repairs"


def test_tags_with_quotes_and_unicode_read_back_identical(tmp_path):
    data = example_data()
    data["tags"] = {"team": 'M\u00fcller "ops" \\ east', "cost center": "4711"}
    config = Config.from_dict(data)
    path = tmp_path / "repair.toml"
    path.write_text(config.to_toml(), encoding="utf-8")
    assert Config.load(path, env={}) == config


def test_a_config_saved_by_notepad_with_a_byte_order_mark_is_read(tmp_path):
    """It used to be "Invalid statement (at line 1, column 1)"."""
    path = tmp_path / "repair.toml"
    path.write_bytes(b"\xef\xbb\xbf" + EXAMPLE.read_text().replace("\n", "\r\n").encode())
    assert Config.load(path) == Config.load(EXAMPLE)
