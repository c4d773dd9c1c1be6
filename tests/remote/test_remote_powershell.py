"""The Windows rescue script (scripts/remote/collect.ps1.j2): it cannot run here (no Windows, no
PowerShell), so it is held to what can be checked: it renders for every supported input, parses as
PowerShell with zero ERROR/MISSING nodes (tree-sitter-powershell), carries the Windows PowerShell 5.1
settings the service needs, declares every parameter the collector passes, and no value from outside
ever becomes part of its text — hostile values travel only as Run Command parameters.
"""

from __future__ import annotations

import re

import pytest
import tree_sitter
import tree_sitter_powershell

from scripts import remote
from scripts.collection.rescue_vm import remote_parameters
from scripts.config.stackoutputs import RepairOutputs

LANGUAGE = tree_sitter.Language(tree_sitter_powershell.language())

HOSTILE = "x'; $(Remove-Item C:\\ -Recurse) `$env:PATH \"dq\" ; & calc.exe\n#<# @' '@ ${env:x}"


def parse_errors(source: str) -> list[str]:
    tree = tree_sitter.Parser(LANGUAGE).parse(source.encode("utf-8"))
    lines = source.splitlines()
    problems: list[str] = []

    def walk(node) -> None:
        if node.type == "ERROR" or node.is_missing:
            row = node.start_point[0]
            problems.append(f"{node.type}{' (missing)' if node.is_missing else ''} at line {row + 1}: "
                            f"{lines[row].strip() if row < len(lines) else ''}")
        for child in node.children:
            walk(child)

    walk(tree.root_node)
    return problems


def hostile_outputs(value: str = HOSTILE) -> RepairOutputs:
    return RepairOutputs(
        subscription_id="00000000-0000-0000-0000-000000000001", resource_group_name="crashcart-repair-web-01",
        rescue_vm_id="/subscriptions/00000000-0000-0000-0000-000000000001/resourceGroups/crashcart-repair-web-01/"
                     "providers/Microsoft.Compute/virtualMachines/crashcart-rescue",
        rescue_vm_name="crashcart-rescue", rescue_vm_principal_id="p", rescue_os="windows",
        disk_copy_id=value, disk_copy_lun=0, snapshot_id=value,
        source_vm_id="/subscriptions/00000000-0000-0000-0000-000000000001/resourceGroups/prod-web/providers/"
                     "Microsoft.Compute/virtualMachines/web-01",
        source_os_disk_id=value, evidence_account_name="crashcartabc",
        evidence_blob_endpoint="https://crashcartabc.blob.core.windows.net/", evidence_container="dumps")


SETTINGS = [
    remote.UploadSettings(),
    remote.UploadSettings(block_size=4096, parallel=1, max_attempts=1, auth_wait_seconds=1),
    remote.UploadSettings(block_size=remote.MAX_BLOCK_SIZE, parallel=16, max_attempts=20, auth_wait_seconds=3600),
]


@pytest.mark.parametrize("settings", SETTINGS, ids=["default", "smallest", "largest"])
def test_renders_and_parses_clean(settings):
    script = remote.render("windows", settings)
    assert parse_errors(script) == []
    assert "{{" not in script and "{%" not in script and "{##" not in script
    assert f"[string]$BlockSize = '{settings.block_size}'" in script


def test_the_parser_does_find_errors():
    """A check that finds nothing must be able to find something: break the script and look."""
    script = remote.render("windows")
    broken = script.replace("function Get-BlobUrl([string]$Name) {", "function Get-BlobUrl([string]$Name) {{", 1)
    assert parse_errors(broken)
    assert parse_errors('$x = "unterminated\nWrite-Output (1 + )\n')


def test_windows_powershell_51_settings():
    script = remote.render("windows")
    assert "[Net.ServicePointManager]::SecurityProtocol = [Net.SecurityProtocolType]::Tls12" in script
    assert "$ProgressPreference = 'SilentlyContinue'" in script
    assert "Invoke-WebRequest" not in script  # slow and buffering: blocks go through HttpClient
    assert "System.Net.Http.HttpClient" in script and "ContentMD5" in script
    assert "x-ms-version" in script and f"'{remote.X_MS_VERSION}'" in script
    assert remote.X_MS_VERSION >= "2017-11-09"  # the first version that accepts bearer tokens
    assert "AuthorizationPermissionMismatch" in script
    assert "DoNotExpandEnvironmentNames" in script  # %SystemRoot% must map to the broken volume, not C:
    assert "Set-Disk -Number $number -IsReadOnly $true" in script


def test_every_parameter_passed_is_declared():
    script = remote.render("windows")
    declared = set(re.findall(r"^\s+\[string\]\$(\w+)\s*=", script[: script.index("Set-StrictMode")], re.M))
    passed = set(remote_parameters(hostile_outputs("v"), "web-01/20250101T000000Z", remote.UploadSettings()))
    assert passed <= declared, passed - declared
    assert {"DiskNumber", "ImdsEndpoint", "ClientId"} <= declared


@pytest.mark.parametrize("value", [
    HOSTILE,
    "'; exit 0; '",
    "$(whoami)",
    "`n`r`0",
    "line1\nline2\r\nline3",
    "a;b|c&d>e<f",
    "@\"\nhere\n\"@",
])
def test_hostile_values_travel_as_parameters_only(value):
    outputs = hostile_outputs(value)
    prefix = f"web-01/{value}"
    params = remote_parameters(outputs, prefix, remote.UploadSettings())
    for settings in SETTINGS:
        script = remote.render("windows", settings)
        assert value not in script
        assert parse_errors(script) == []
    assert params["SourceDiskId"] == value
    assert params["DiskCopyId"] == value
    assert params["SnapshotId"] == value
    assert params["Prefix"] == prefix
    assert all(isinstance(v, str) for v in params.values())


def test_render_takes_no_values_from_outside():
    with pytest.raises(ValueError):
        remote.UploadSettings(block_size="1'; Remove-Item C:\\")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        remote.UploadSettings(parallel=0)
    with pytest.raises(ValueError):
        remote.UploadSettings(block_size=200 * remote.MiB)
    with pytest.raises(ValueError):
        remote.render("macos")


def test_both_scripts_share_the_contract():
    """Same parameters, same markers, same exit codes, same blob names on both rescue OSes."""
    ps, sh = remote.render("windows"), remote.render("linux")
    for name in ("BlobEndpoint", "Container", "Prefix", "DiskLun", "DiskCopyId", "SourceDiskId", "SnapshotId",
                 "BlockSize", "Parallel", "MaxAttempts", "AuthWaitSeconds", "ClientId", "ImdsEndpoint"):
        assert f"${name}" in ps and f"${{{name}:-" in sh, name
    for text in (remote.RESULT_MARKER, remote.PROGRESS_MARKER, "/MEMORY.DMP", "/Minidump/", "/PAGEFILE.DMP",
                 ".manifest.json", "crashcart.manifest/1", "comp=blocklist", "crashcart-{0:d8}"[:10]):
        assert text in ps and text in sh, text
    for status, code in (("'no_dump' 10", "no_dump 10"), ("'disk_not_found' 11", "disk_not_found 11"),
                         ("'upload_failed' 12", "upload_failed 12"), ("'collected' 0", "collected 0")):
        assert status in ps and code in sh
