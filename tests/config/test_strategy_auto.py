"""repair.strategy "auto" (#18): the default of a new config, of discover's file and of repair.example.toml, left to
repair-run's preflight; and resolved wherever no preflight runs (the `collect` verb: rescue-vm, said in the log),
never handed on unresolved."""

from __future__ import annotations

import json
import tomllib

import pytest

from scripts.__main__ import main
from scripts.collection.strategies import AUTO, collector_for, resolve
from scripts.config.model import Config
from scripts.base.errors import ConfigError
from scripts.run import preflight_run
from tests.support.synth import EXAMPLE

MINIMAL = {"source": {"subscription_id": "00000000-0000-0000-0000-000000000001", "resource_group": "prod-web",
                      "vm_name": "web-01", "location": "westeurope",
                      "os_disk_id": "/subscriptions/00000000-0000-0000-0000-000000000001/resourceGroups/prod-web/"
                                    "providers/Microsoft.Compute/disks/web-01-os", "os_disk_size_gb": 127}}


def test_auto_is_the_default_and_the_example_writes_it():
    assert Config.from_dict(MINIMAL, {}).repair.strategy == AUTO
    assert tomllib.loads(EXAMPLE.read_text())["repair"]["strategy"] == AUTO
    assert 'strategy = "auto"' in Config.from_dict(MINIMAL, {}).to_toml()  # what discover writes (render)


def test_auto_and_the_named_strategies_are_accepted_anything_else_names_all_three():
    for value in ("auto", "rescue-vm", "snapshot-export"):
        assert Config.from_dict(MINIMAL, {"CRASHCART_REPAIR_STRATEGY": value}).repair.strategy == value
    with pytest.raises(ConfigError) as err:
        Config.from_dict({**MINIMAL, "repair": {"strategy": "rdp"}}, {})
    assert "auto, rescue-vm, snapshot-export" in f"{err.value.message} {err.value.hint}"


def test_a_config_saying_auto_is_left_to_preflight_a_named_one_is_forced(tmp_path):
    path = tmp_path / "repair.toml"
    path.write_text(Config.from_dict(MINIMAL, {}).to_toml(), encoding="utf-8")
    assert preflight_run.strategy_left_to_preflight(path, {})
    path.write_text(Config.from_dict({**MINIMAL, "repair": {"strategy": "rescue-vm"}}, {}).to_toml(), encoding="utf-8")
    assert not preflight_run.strategy_left_to_preflight(path, {})
    assert preflight_run.strategy_left_to_preflight(path, {"CRASHCART_REPAIR_STRATEGY": "auto"})


def test_without_preflight_auto_means_rescue_vm():
    from scripts.collection.rescue_vm import RescueVmCollector

    assert resolve(AUTO) == "rescue-vm" and resolve("snapshot-export") == "snapshot-export"
    assert isinstance(collector_for(AUTO), RescueVmCollector)


def test_collect_with_strategy_auto_runs_rescue_vm_and_says_why(arm, azurite, evidence_container, tmp_path,
                                                                capsys, caplog):
    """`collect --strategy auto` on a deployed repair stack: the rescue VM collects (here: no dump, exit 10), the
    report names rescue-vm, and the log says what "auto" means without preflight."""
    import logging

    from scripts.devkit import arm_compute
    from scripts.devkit.arm_vmops import repair_world, write_outputs

    caplog.set_level(logging.INFO)
    world = repair_world(arm, azurite, evidence_container.container_name)
    arm_compute.install_run_commands(arm, arm_compute.Scripted(["Running", "Succeeded"],
                                                                output=arm_compute.result_line("no_dump")))
    outputs = write_outputs(tmp_path / "outputs.json", world)
    code = main(["collect", "--strategy", "auto", "--outputs-file", str(outputs), "--agent-wait-minutes", "0.05",
                 "--poll-seconds", "0.01", "--out-dir", str(tmp_path / "out")])
    out = capsys.readouterr()
    assert code == 10, out.err
    assert json.loads(out.out)["strategy"] == "rescue-vm"
    assert '"auto" outside repair-run means rescue-vm' in out.err + caplog.text
