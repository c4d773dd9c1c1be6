"""`pipenv run preflight` against the strict ARM double (RBAC-enforcing, driven by the real azure-mgmt clients)
and Azurite: each failure case reported with its fix and the right exit code, warnings exit 0, the happy path
green, and nothing created (only GETs reach the double). repair-run's automatic strategy choice falls back to
rescue-vm when the disk forbids export, and says so."""

from __future__ import annotations

import json
import logging
import threading
import tomllib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from scripts.__main__ import main
from scripts.config.model import Config
from scripts.devkit import arm_authz, arm_usage, arm_vm
from scripts.devkit.arm_rbac import EVIDENCE_CONTAINER
from scripts.evidence import blobs

ACCOUNT_ID = EVIDENCE_CONTAINER.split("/blobServices/")[0]


class World:
    def __init__(self, arm, tmp: Path, capsys, caplog):
        self.arm, self.tmp, self.capsys, self.caplog = arm, tmp, capsys, caplog
        arm_authz.install(arm)
        arm_usage.install(arm)
        self.vm = arm_vm.add_broken_vm(arm)
        arm.put(ACCOUNT_ID, {"name": "crashcartevidence", "type": "Microsoft.Storage/storageAccounts",
                             "location": "westeurope"})
        self.endpoint = ""

    def disk(self) -> dict:
        return self.arm.get(self.vm.disk_id)

    def config(self, **repair) -> Path:
        from scripts.run.discover import discover_config

        data = tomllib.loads(discover_config(self.vm.vm_id).to_toml())
        del data["repair"]["strategy"]  # left to preflight
        data["repair"].update(repair)
        data["evidence"].update(account_id=ACCOUNT_ID, container="dumps")
        path = self.tmp / "repair.toml"
        path.write_text(Config.from_dict(data, {}).to_toml().replace('strategy = "rescue-vm"\n', "")
                        if "strategy" not in repair else Config.from_dict(data, {}).to_toml(), encoding="utf-8")
        return path

    def preflight(self, *extra: str, **repair) -> tuple[int, dict, str]:
        self.arm.requests.clear()
        argv = ["preflight", "--config", str(self.config(**repair)), *extra]
        if self.endpoint:
            argv += ["--evidence-endpoint", self.endpoint]
        code = main(argv)
        out = self.capsys.readouterr()
        assert all(r.method == "GET" for r in self.arm.requests), "preflight created or changed something"
        assert self.arm.unmapped == []
        return code, json.loads(out.out), out.err + self.caplog.text

    @staticmethod
    def finding(verdict: dict, check: str, contains: str = "") -> dict:
        return next(c for c in verdict["checks"] if c["check"] == check and contains in c["subject"])


@pytest.fixture
def world(arm, azurite, tmp_path, monkeypatch, capsys, caplog):
    caplog.set_level(logging.INFO)
    monkeypatch.setenv(blobs.CONNECTION_STRING_ENV, azurite.connection_string)
    monkeypatch.delenv("CRASHCART_REPAIR_STRATEGY", raising=False)
    try:
        azurite.service_client().create_container("dumps")
    except Exception:  # noqa: BLE001 - another test made it: reading its properties is all preflight does
        pass
    return World(arm, tmp_path, capsys, caplog)


def test_the_happy_path_is_green_picks_snapshot_export_and_creates_nothing(world):
    code, verdict, said = world.preflight()
    assert code == 0, said
    assert verdict["counts"]["fail"] == verdict["counts"]["warn"] == 0, said
    assert verdict["strategy"]["strategy"] == "snapshot-export" and verdict["strategy"]["automatic"]
    names = world.finding(verdict, "run")["data"]
    assert names["repair_resource_group"].startswith("crashcart-repair-web-01-") and names["ttl_hours"] == 8
    assert names["lock_blob"] == f"locks/{names['vm_key']}"
    assert "strategy: snapshot-export" in said


def test_a_missing_action_names_it_with_the_fix_and_exits_3(world):
    world.arm.rbac.remove_action("Microsoft.Compute/virtualMachines/write")
    code, verdict, said = world.preflight()
    assert code == 3, said
    found = world.finding(verdict, "permissions", "operator")
    assert found["status"] == "fail" and "Microsoft.Compute/virtualMachines/write" in found["detail"]
    assert "crashcart repair operator" in found["fix"] and "operator.json" in found["fix"]


def test_an_action_only_the_swap_uses_is_a_warning_and_exits_0(world):
    world.arm.rbac.remove_action("Microsoft.SerialConsole/serialPorts/connect/action")
    code, verdict, said = world.preflight()
    assert code == 0, said
    found = world.finding(verdict, "permissions", "operator")
    assert found["status"] == "warn" and "prepare-dump --swap" in found["fix"]


@pytest.mark.parametrize("action", ["Microsoft.Compute/locations/usages/read", "Microsoft.Compute/skus/read",
                                    "Microsoft.Resources/subscriptions/providers/read",
                                    "Microsoft.Authorization/permissions/read"])
def test_preflights_own_reads_are_in_the_operator_role(world, action):
    """Preflight's reads under the operator role alone (the repair group exists here, so its permissions are
    read there): without one of them, preflight fails with exit 3 naming it, and nothing else was refused."""
    config = Config.load(world.config())
    world.arm.put(f"/subscriptions/{arm_vm.SUB}/resourceGroups/{config.repair_resource_group}",
                  {"name": config.repair_resource_group, "location": "westeurope", "tags": {"crashcart": "repair"}})
    code, verdict, said = world.preflight()
    assert code == 0 and all(d.allowed for d in world.arm.rbac.decisions), said
    world.arm.rbac.remove_action(action)
    code, verdict, said = world.preflight()
    assert code == 3 and action in said
    refused = {d.operation.action for d in world.arm.rbac.decisions if not d.allowed}
    assert refused == {action}


def test_an_unregistered_provider_says_how_to_register_it_and_exits_2(world):
    arm_authz.register(world.arm, "Microsoft.Network", "NotRegistered")
    code, verdict, said = world.preflight()
    assert code == 2, said
    found = world.finding(verdict, "providers")
    assert found["status"] == "fail" and "Microsoft.Network NotRegistered" in found["detail"]
    assert "az provider register --namespace Microsoft.Network" in found["fix"]


def test_deny_all_rules_out_snapshot_export_auto_falls_back_and_a_forced_export_is_refused(world):
    world.disk()["properties"]["networkAccessPolicy"] = "DenyAll"
    code, verdict, said = world.preflight()
    assert code == 0, said
    assert verdict["strategy"]["strategy"] == "rescue-vm"
    assert "networkAccessPolicy DenyAll" in verdict["strategy"]["reason"] and "falling back to rescue-vm" in said
    assert world.finding(verdict, "source disk")["status"] == "warn"
    code, verdict, said = world.preflight("--strategy", "snapshot-export")
    assert code == 2 and world.finding(verdict, "source disk")["status"] == "fail"
    assert "--network-access-policy AllowAll" in world.finding(verdict, "source disk")["fix"]


def test_azure_ad_data_access_without_data_operator_rules_out_export(world):
    world.disk()["properties"]["dataAccessAuthMode"] = "AzureActiveDirectory"
    code, verdict, said = world.preflight()
    assert code == 0 and verdict["strategy"]["strategy"] == "rescue-vm"
    assert "Data Operator for Managed Disks" in world.finding(verdict, "source disk")["fix"]


@pytest.mark.parametrize("linux", [False, True])
def test_azure_disk_encryption_blocks_with_exit_11(world, linux):
    arm_usage.add_disk_encryption(world.arm, world.vm.vm_id, linux=linux)
    code, verdict, said = world.preflight()
    assert code == 11, said
    found = world.finding(verdict, "encryption")
    assert found["status"] == "fail" and "Azure Disk Encryption" in found["detail"] and found["fix"]


def test_a_disk_encryption_set_is_a_warning(world):
    des = f"/subscriptions/{arm_vm.SUB}/resourceGroups/prod-web/providers/Microsoft.Compute/diskEncryptionSets/des-1"
    world.disk()["properties"]["encryption"] = {"type": "EncryptionAtRestWithCustomerKey", "diskEncryptionSetId": des}
    code, verdict, said = world.preflight()
    assert code == 0, said
    found = world.finding(verdict, "encryption", "disk encryption set")
    assert found["status"] == "warn" and des in found["detail"] and "diskEncryptionSets/read" in found["fix"]


def test_exhausted_quota_blocks_with_exit_30(world):
    arm_usage.set_usage(world.arm, "westeurope", "standardDSv5Family", 98, 100)
    code, verdict, said = world.preflight()
    assert code == 30, said
    found = world.finding(verdict, "quota")
    assert "2 free, the rescue VM needs 4" in found["detail"] and "quota" in found["fix"]


def test_a_size_restricted_in_the_zone_blocks_with_exit_2(world):
    """Standard_E4bds_v5 is NotAvailableForSubscription in westeurope zone 1, the world's VM's zone."""
    code, verdict, said = world.preflight(**{})
    assert code == 0, said
    path = world.config()
    path.write_text(path.read_text().replace('size = "Standard_D4s_v5"', 'size = "Standard_E4bds_v5"'))
    code = main(["preflight", "--config", str(path)])
    out = world.capsys.readouterr()
    verdict = json.loads(out.out)
    assert code == 2, out.err
    found = world.finding(verdict, "rescue size")
    assert "NotAvailableForSubscription in zone 1" in found["detail"] and "rescue.size" in found["fix"]


class _Firewall(BaseHTTPRequestHandler):
    def _refuse(self) -> None:
        body = (b'<?xml version="1.0" encoding="utf-8"?><Error><Code>AuthorizationFailure</Code><Message>This '
                b"request is not authorized to perform this operation.</Message></Error>")
        self.send_response(403)
        self.send_header("x-ms-error-code", "AuthorizationFailure")
        self.send_header("Content-Type", "application/xml")
        self.send_header("Content-Length", "0" if self.command == "HEAD" else str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    do_GET = do_HEAD = do_PUT = _refuse

    def log_message(self, *args: object) -> None:
        pass


def test_an_evidence_firewall_refusing_this_machine_blocks_with_exit_3(world, monkeypatch):
    monkeypatch.delenv(blobs.CONNECTION_STRING_ENV)
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Firewall)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        world.endpoint = f"http://127.0.0.1:{server.server_port}/crashcartevidence"
        code, verdict, said = world.preflight()
    finally:
        server.shutdown()
        server.server_close()
    assert code == 3, said
    found = world.finding(verdict, "evidence")
    assert "network rules refused this machine" in found["detail"] and "evidence.allowed_ip_ranges" in found["fix"]


def test_repair_run_falls_back_to_rescue_vm_when_the_disk_forbids_export_and_says_so(world, monkeypatch):
    from scripts.run import preflight_run

    world.disk()["properties"]["networkAccessPolicy"] = "DenyAll"
    path = world.config()
    assert preflight_run.strategy_left_to_preflight(path, {})
    monkeypatch.setenv("CRASHCART_REPAIR_STRATEGY", "")  # restored after the test
    monkeypatch.delenv("CRASHCART_REPAIR_STRATEGY")
    record = preflight_run.choose_for_run(path)
    assert record["strategy"]["strategy"] == "rescue-vm" and record["strategy"]["automatic"]
    import os

    assert os.environ["CRASHCART_REPAIR_STRATEGY"] == "rescue-vm"  # what synth and collect then read
    assert Config.load(path).repair.strategy == "rescue-vm"
    said = world.caplog.text
    assert "networkAccessPolicy DenyAll" in said and "falling back to rescue-vm" in said
    assert all(r.method == "GET" for r in world.arm.requests)


def test_a_forced_strategy_is_kept_and_not_left_to_preflight(world, monkeypatch):
    from scripts.run import preflight_run

    path = world.config(strategy="rescue-vm")
    assert not preflight_run.strategy_left_to_preflight(path, {})
    monkeypatch.setenv("CRASHCART_REPAIR_STRATEGY", "snapshot-export")
    path = world.config()
    assert not preflight_run.strategy_left_to_preflight(path)
    assert preflight_run.requested_strategy(Config.load(path), {"CRASHCART_REPAIR_STRATEGY": "x"})[1]
