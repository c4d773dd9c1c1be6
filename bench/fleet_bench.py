"""Issue 17's fleet benchmark: a fleet of 50 doubled VMs against one VM, same machine, same doubles.

    PYTHONPATH=. .venv/bin/python bench/fleet_bench.py [--vms 50] [--scale 0.1] [--max-parallel N | --fallback-parallel]

Sets up what tests/run does (one real synth, the evidence stack's state, Azurite, the loopback ARM
double, the fake terraform; tests/run/fleetkit.py gives each VM its folder and doubles), then times
`fleet run` for one VM and for the fleet, each a fresh fleet, twice:

- azure-like: the doubles take the time Azure takes (scripts/devkit/armdouble.py, AZURE_SECONDS: the
  deploy, the run command and its copy, the destroy), scaled by --scale (default 1/10: a 3-minute deploy
  in 18 s). On this 2-core machine a fleet of 50 measured 2.6× at 1/10 and 3.1× at 1/20: the smaller the
  scale, the more the kit's own CPU (about 2.5 CPU-seconds per VM in the doubles, nothing against Azure's
  minutes) weighs against the waits.
  Against Azure a VM's job mostly waits, so this is the figure the issue asks for:

      fleet of 50: W s wall, P× the wall time of one VM

- zero: nothing takes time, every step is CPU (Python and fake terraform processes): what P is when the
  fleet is bound by this machine's cores. Printed as a second, labelled line.

(Issue 17's goal: P <= 3 with the default concurrency.) A table before the lines says both profiles'
scale, per-VM modelled waits, walls and the concurrency the fleet chose.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from fractions import Fraction
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vms", type=int, default=50)
    parser.add_argument("--scale", type=float, default=0.1, help="Azure durations times this (default 1/10)")
    parser.add_argument("--max-parallel", type=int, default=None, help="default: fleet run's own default")
    parser.add_argument("--fallback-parallel", action="store_true",
                        help="do not serve compute usages and SKUs: fleet run cannot read the vCPU quota and falls back "
                             "to 16 at a time (by default the VMs come through Resource Graph with usages and SKUs, so "
                             "fleet run's default comes from the quota, as against Azure: westeurope, Standard_D4s_v5: 25)")
    args = parser.parse_args()
    os.environ.setdefault("JSII_SILENCE_WARNING_END_OF_LIFE_NODE_VERSION", "20")
    from scripts.devkit.armdouble import ArmDouble, Durations
    from scripts.devkit.azurite import start_azurite
    from tests.run.fleetkit import make_fleet
    from tests.run.repairkit import Project
    from tests.support.fake_terraform import write_shim

    extra = ["--max-parallel", str(args.max_parallel)] if args.max_parallel else []
    profiles = [("azure-like", Durations.azure_like(args.scale)), ("zero", Durations())]
    rows = []
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

        for name, durations in profiles:
            arm.durations = durations
            walls = []
            for count in (1, args.vms):
                kit = make_fleet(project, arm, root / f"kit-{name}-{count}", count, f"bench-{name}-{count}",
                                 prefix=f"{name[:4]}{count}")
                if not args.fallback_parallel:
                    kit.in_graph()
                print(f"{name}: fleet run of {count} VM(s)...", file=sys.stderr)
                started = time.monotonic()
                outcome = kit.run(*extra, timeout=3600)
                walls.append(time.monotonic() - started)
                assert outcome.code == 0, outcome.stderr[-2000:]
                assert outcome.result["counts"]["collected"] == count and kit.leaked() == []
            chosen = outcome.result.get("max_parallel") or {}
            rows.append((name, durations, walls[0], walls[1], chosen))

    scale = Fraction(args.scale).limit_denominator(1000)
    print(f"{'profile':<28} {'per-VM modelled waits':>22} {'one VM':>8} {f'fleet of {args.vms}':>12}  max parallel")
    for name, durations, one, many, chosen in rows:
        label = f"{name} (durations at {scale})" if durations.scale else f"{name} (CPU-bound)"
        print(f"{label:<28} {durations.per_vm():>20.1f} s {one:>6.1f} s {many:>10.1f} s  "
              f"{chosen.get('jobs')} ({str(chosen.get('why')).split(':')[0]})")
    (_, _, one, many, _), (_, _, one0, many0, _) = rows
    print(f"fleet of {args.vms}: {many:.1f} s wall, {many / one:.1f}× the wall time of one VM")
    print(f"fleet of {args.vms} with zero durations (CPU-bound): {many0:.1f} s wall, {many0 / one0:.1f}× the wall "
          f"time of one VM")
    return 0


if __name__ == "__main__":
    sys.exit(main())
