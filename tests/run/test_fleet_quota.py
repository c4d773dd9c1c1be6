"""The default `fleet run --max-parallel` from the regions' vCPU quota (scripts/run/fleetquota.py) against the ARM
double's compute usages and resource SKUs (through the real azure-mgmt-compute client), the VMs' regions read
through Resource Graph (scripts/devkit/arm_graph.py)."""

from __future__ import annotations

import pytest

from scripts.base.errors import CrashcartError
from scripts.devkit import arm_graph, arm_skus, arm_usage
from scripts.devkit.arm_vm import SUB, add_broken_vm
from scripts.run import fleetquota, fleetselect

FAMILY = "standardDSv5Family"  # Standard_D4s_v5 (4 vCPUs), the default rescue size


@pytest.fixture
def world(arm):
    for install in (arm_graph.install, arm_skus.install, arm_usage.install):
        install(arm)
    return arm


def vms(arm, count: int, region: str = "westeurope", group: str = "prod-web") -> list[str]:
    return [add_broken_vm(arm, name=f"{group}-{i:02d}", resource_group=group, location=region).vm_id
            for i in range(count)]


def default(ids, size="Standard_D4s_v5", to_run=None):
    return fleetquota.default_parallel(tuple(ids), fleetselect.locate(ids), size, len(ids) if to_run is None else to_run)


def test_the_default_is_the_free_vcpus_of_the_family_over_the_rescue_sizes_vcpus(world):
    ids = vms(world, 40)
    arm_usage.set_usage(world, "westeurope", FAMILY, current=58, limit=100)  # 42 free / 4 = 10
    jobs, why = default(ids)
    assert jobs == 10
    assert "42 vCPUs free" in why and f"{FAMILY} vCPUs: 58/100 used" in why and "/ 4 per Standard_D4s_v5" in why


def test_the_regional_total_limits_when_it_is_tighter(world):
    ids = vms(world, 40)
    arm_usage.set_usage(world, "westeurope", "cores", current=340, limit=350)  # 10 free: 2 rescue VMs
    jobs, why = default(ids)
    assert jobs == 2 and "Total Regional vCPUs: 340/350 used" in why


def test_the_tightest_region_sets_the_default_and_the_cap_and_vm_count_bound_it(world):
    ids = vms(world, 3) + vms(world, 3, region="northeurope", group="prod-north")
    arm_usage.set_usage(world, "northeurope", FAMILY, current=88, limit=100)  # 3 jobs there
    jobs, why = default(ids, to_run=6)
    assert jobs == 3 and "northeurope" in why and "westeurope" in why
    many = vms(world, 50, group="prod-big")
    arm_usage.set_usage(world, "westeurope", FAMILY, current=0, limit=1000)
    arm_usage.set_usage(world, "westeurope", "cores", current=0, limit=1000)
    assert default(many)[0] == fleetquota.QUOTA_CAP
    jobs, why = default(many, to_run=5)
    assert jobs == 5 and "only 5 VM(s) to run" in why


def test_no_room_for_one_rescue_vm_is_an_error_before_anything_runs(world):
    ids = vms(world, 2)
    arm_usage.set_usage(world, "westeurope", FAMILY, current=98, limit=100)
    with pytest.raises(CrashcartError) as err:
        default(ids)
    assert err.value.exit_code == 30 and "no vCPU quota for one rescue VM" in err.value.message


def test_quota_it_cannot_read_falls_back_and_says_why(world):
    ids = vms(world, 2)
    world.rbac.remove_action("Microsoft.Compute/locations/usages/read")
    jobs, why = default(ids)
    assert jobs == fleetquota.FALLBACK and "could not be read" in why and "usages/read" in why


def test_the_rescue_size_comes_from_the_base_config_or_the_environment(tmp_path):
    config = tmp_path / "repair.toml"
    config.write_text('[rescue]\nsize = "Standard_D2s_v5"\n')
    assert fleetquota.rescue_size(config, {}) == "Standard_D2s_v5"
    assert fleetquota.rescue_size(config, {"CRASHCART_RESCUE_SIZE": "Standard_E4s_v6"}) == "Standard_E4s_v6"
    assert fleetquota.rescue_size(tmp_path / "absent.toml", {}) == "Standard_D4s_v5"
