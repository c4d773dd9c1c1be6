"""`discover` driving the real azure-mgmt-compute client against the loopback ARM double."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tomllib

from scripts.config.model import Config
from scripts.run.discover import discover_config
from scripts.devkit.arm_vm import SUB, add_broken_vm
from tests.support.synth import EXAMPLE, REPO


def run_discover(arm, *args: str, config_path=None):
    env = {**os.environ, "CRASHCART_ARM_ENDPOINT": arm.url}
    cmd = [sys.executable, "-m", "scripts", "discover", *args]
    if config_path is not None:
        cmd += ["--config", str(config_path)]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=env, timeout=120)


def test_discover_writes_a_config_that_synth_can_use(arm, tmp_path):
    vm = add_broken_vm(arm)
    path = tmp_path / "repair.toml"
    result = run_discover(arm, "--vm", vm.vm_id, config_path=path)
    assert result.returncode == 0, result.stderr
    config = Config.load(path)
    s = config.source
    assert (s.subscription_id, s.resource_group, s.vm_name, s.location, s.zone) == (
        SUB, "prod-web", "web-01", "westeurope", "1")
    assert (s.os_disk_id, s.os_disk_size_gb, s.os_disk_sku) == (vm.disk_id, 127, "Premium_LRS")
    assert (s.hyper_v_generation, s.security_type, s.disk_controller, s.vm_size, s.memory_gb) == (
        "V2", "TrustedLaunch", "SCSI", "Standard_D4s_v5", 16.0)
    assert json.loads(result.stdout)["source"]["vm_name"] == "web-01"
    assert f"wrote {path}" in result.stderr
    # #18: the strategy is left to repair-run's preflight (snapshot-export when the disk allows it)
    assert tomllib.loads(path.read_text())["repair"]["strategy"] == "auto" == config.repair.strategy


def test_discover_only_reads_and_sends_api_versions(arm):
    vm = add_broken_vm(arm)
    discover_config(vm.vm_id)
    assert arm.requests, "no request reached the double"
    assert {r.method for r in arm.requests} == {"GET"}
    assert all("api-version" in r.query for r in arm.requests)
    paths = [r.path for r in arm.requests]
    assert vm.vm_id in paths and vm.disk_id in paths


def test_discover_keeps_the_other_sections_of_an_existing_file(arm, tmp_path):
    vm = add_broken_vm(arm, name="app-7", resource_group="rg-app", zone=None, generation="V1",
                       security_type=None, sku="StandardSSD_LRS")
    path = tmp_path / "repair.toml"
    path.write_text(EXAMPLE.read_text().replace('container = "dumps"', 'container = "case-1234"'))
    result = run_discover(arm, "--vm", vm.vm_id, "--rescue-os", "linux", config_path=path)
    assert result.returncode == 0, result.stderr
    data = tomllib.loads(path.read_text())
    assert data["evidence"]["container"] == "case-1234"
    assert data["rescue"]["os"] == "linux"
    assert data["source"]["vm_name"] == "app-7" and data["source"]["zone"] == ""
    assert data["source"]["hyper_v_generation"] == "V1" and data["source"]["security_type"] == "Standard"


def test_nvme_controller_is_discovered(arm):
    vm = add_broken_vm(arm, controller="NVMe", security_type=None)
    assert discover_config(vm.vm_id).source.disk_controller == "NVMe"


def test_missing_vm_is_exit_4_with_a_next_step(arm, tmp_path):
    result = run_discover(arm, "--vm", f"/subscriptions/{SUB}/resourceGroups/prod-web/providers/"
                                       "Microsoft.Compute/virtualMachines/ghost", config_path=tmp_path / "r.toml")
    assert result.returncode == 4
    assert "was not found (ResourceGroupNotFound)" in result.stderr or "was not found" in result.stderr
    assert "next:" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "r.toml").exists()


def test_forbidden_vm_is_exit_3_naming_the_role(arm, tmp_path):
    vm = add_broken_vm(arm)
    arm.forbidden.add(f"/subscriptions/{SUB}/resourceGroups/prod-web")
    result = run_discover(arm, "--vm", vm.vm_id, config_path=tmp_path / "r.toml")
    assert result.returncode == 3
    assert "AuthorizationFailed" in result.stderr and "Reader" in result.stderr


def test_malformed_vm_id_is_a_usage_error(arm, tmp_path):
    result = run_discover(arm, "--vm", "web-01", config_path=tmp_path / "r.toml")
    assert result.returncode == 2
    # a command-line option, not a config field: no "config:" prefix
    assert '--vm "web-01" is not a VM resource ID' in result.stderr and "az vm show" in result.stderr
    assert "config:" not in result.stderr
    assert arm.requests == []


def test_linux_vm_is_refused(arm, tmp_path):
    vm = add_broken_vm(arm, os_type="Linux", security_type=None)
    result = run_discover(arm, "--vm", vm.vm_id, config_path=tmp_path / "r.toml")
    assert result.returncode == 2 and "source.os_type" in result.stderr and "Linux" in result.stderr


def test_unmanaged_disk_is_refused_with_a_way_out(arm, tmp_path):
    vm = add_broken_vm(arm, unmanaged=True, security_type=None)
    result = run_discover(arm, "--vm", vm.vm_id, config_path=tmp_path / "r.toml")
    assert result.returncode == 2 and "unmanaged" in result.stderr and "az vm convert" in result.stderr


def test_confidential_vm_disk_is_refused(arm, tmp_path):
    vm = add_broken_vm(arm, security_type="ConfidentialVM",
                       disk_security_type="ConfidentialVM_DiskEncryptedWithPlatformKey")
    result = run_discover(arm, "--vm", vm.vm_id, config_path=tmp_path / "r.toml")
    assert result.returncode == 2 and "Confidential VM" in result.stderr
