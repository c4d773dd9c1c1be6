"""Issue 17's fleet benchmark: a fleet of 50 doubled VMs against one VM, same machine, same doubles.

    PYTHONPATH=. .venv/bin/python bench/fleet_bench.py [--vms 50] [--max-parallel N | --quota-default]

Sets up what tests/run does (one real synth, the evidence stack's state, Azurite, the loopback ARM
double, the fake terraform; tests/run/fleetkit.py gives each VM its folder and doubles), then times
`fleet run` for one VM and for the fleet, each a fresh fleet, and prints

    fleet of 50: W s wall, P× the wall time of one VM

(issue 17's goal: P <= 3 with the default concurrency). On a doubled cloud every step is CPU (Python and
terraform processes), so P says how well the fleet overlaps the jobs on this machine's cores; against Azure,
where a job mostly waits (deploys, the rescue VM's boot, the copy), it overlaps far better.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vms", type=int, default=50)
    parser.add_argument("--max-parallel", type=int, default=None, help="default: fleet run's own default")
    parser.add_argument("--quota-default", action="store_true",
                        help="serve the VMs through Resource Graph with compute usages and SKUs, so fleet run's default "
                             "comes from the vCPU quota (westeurope, Standard_D4s_v5: 25) instead of the fallback (16)")
    args = parser.parse_args()
    os.environ.setdefault("JSII_SILENCE_WARNING_END_OF_LIFE_NODE_VERSION", "20")
    from scripts.devkit.armdouble import ArmDouble
    from scripts.devkit.azurite import start_azurite
    from tests.run.fleetkit import make_fleet
    from tests.run.repairkit import Project
    from tests.support.fake_terraform import write_shim

    extra = ["--max-parallel", str(args.max_parallel)] if args.max_parallel else []
    with tempfile.TemporaryDirectory(prefix="fleet-bench-") as tmp, start_azurite() as azurite, ArmDouble() as arm:
        root = Path(tmp)
        tf_bin = root / "bin"
        write_shim(tf_bin)
        print("synthesizing the stacks once (main.py)...", file=sys.stderr)
        synth = Project(root / "synth" / "project", tf_bin)
        synth.run(env={"FAKE_TF_FAIL": "init:evidence"}, skip_synth=False, timeout=300)
        scratch = Project(root / "evidence" / "project", tf_bin)
        shutil.copytree(synth.root / "cdktf.out", scratch.root / "cdktf.out")
        evidence_state = scratch.deploy_evidence()
        project = Project(root / "project", tf_bin, azurite)
        shutil.copytree(synth.root / "cdktf.out", project.root / "cdktf.out")
        project.use_evidence_state(evidence_state)

        one = make_fleet(project, arm, root / "kit-1", 1, "bench-one", prefix="one")
        if args.quota_default:
            one.in_graph()
        started = time.monotonic()
        single = one.run(*extra)
        one_wall = time.monotonic() - started
        assert single.code == 0, single.stderr[-2000:]

        many = make_fleet(project, arm, root / f"kit-{args.vms}", args.vms, f"bench-{args.vms}", prefix="many")
        if args.quota_default:
            many.in_graph()
        started = time.monotonic()
        fleet = many.run(*extra, timeout=3600)
        wall = time.monotonic() - started
        assert fleet.code == 0, fleet.stderr[-2000:]
        assert fleet.result["counts"]["collected"] == args.vms and many.leaked() == []
        print(f"one VM: {one_wall:.1f} s wall; fleet --max-parallel: {fleet.result.get('max_parallel')}",
              file=sys.stderr)
    print(f"fleet of {args.vms}: {wall:.1f} s wall, {wall / one_wall:.1f}× the wall time of one VM")
    return 0


if __name__ == "__main__":
    sys.exit(main())
