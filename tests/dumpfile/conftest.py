"""Fixtures shared by the dump-file tests.

`pe_builder` compiles C/assembly into driver-shaped PE images with real unwind info and a real PDB
(scripts/devkit/pebuilder.py), once per test session per set of inputs; a test that needs it is skipped,
with the reason, where clang or lld-link is not installed.
"""

from __future__ import annotations

import pytest

from scripts.devkit.pebuilder import PEBuilderCache, toolchain_problem


@pytest.fixture(scope="session")
def pe_builder(tmp_path_factory):
    """`pe_builder({"drv.c": source}, name="drv.sys", base=0x...) -> BuiltPE` (cached for the session)."""
    problem = toolchain_problem()
    if problem:
        pytest.skip(problem)
    return PEBuilderCache(tmp_path_factory.mktemp("pebuild"))


@pytest.fixture(scope="session")
def stack_images(pe_builder):
    """The test images of tests/dumpfile/stack_sources.py, each linked at the base its module has in the
    dump builders' default module list: {module name: dumpstack.Image}."""
    from scripts.devkit.dumpbuilder import DEFAULT_MODULES
    from scripts.devkit.dumpstack import Image
    from tests.dumpfile import stack_sources as src

    bases = {m.name: m.base for m in DEFAULT_MODULES}
    plan = {
        "ntoskrnl.exe": ({"nt.s": src.NTOS_ASM}, "NtEntry"),
        "contosoflt.sys": ({"drv.c": src.DRIVER_C, "drv.s": src.DRIVER_ASM}, "DriverEntry"),
        "hal.dll": ({"drv.c": src.DRIVER_C, "drv.s": src.DRIVER_ASM}, "DriverEntry"),
        "netvsc.sys": ({"decoy.c": src.DECOY_C}, "DriverEntry"),
    }
    images = {}
    for name, (sources, entry) in plan.items():
        built = pe_builder(sources, name=name, entry=entry, base=bases[name])
        images[name] = Image(name, built.base, built.image, built.functions)
    return images
