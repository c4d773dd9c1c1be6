"""Builds small driver-shaped PE images with real unwind information and a real PDB, for tests.

A triage that unwinds a kernel stack reads what a compiler and a linker wrote: RUNTIME_FUNCTION tables,
UNWIND_INFO with their unwind codes (chained ones included), the CodeView record that names the PDB.
Hand-made bytes would only test that the reader agrees with its own author, so the tests compile C and
assembly with clang (`--target=x86_64-pc-windows-msvc -fasynchronous-unwind-tables`, which emits the
same .pdata/.xdata MSVC does) and link with lld-link (`/driver /debug`), the Debian packages `clang` and
`lld`. Assembly sources (`.s`, AT&T syntax) let a test spell out `.seh_*` directives the C compiler only
emits in rare shapes: `.seh_savexmm`, `.seh_pushframe [code]`, `.seh_startchained`.

`build_pe(sources, ...)` returns a `BuiltPE`: the image bytes, the PDB bytes, and every function's RVA
(from the linker's map file, not from the PDB: the PDB is what the symbol reader under test reads).
The image is linked at the base it will be mapped at in a dump (`/base`), so a dump builder can copy its
sections as they are. Output is reproducible (`/Brepro`): the same sources give the same bytes, so the
cache (`PEBuilderCache`, one per test session) can key on the inputs.
"""

from __future__ import annotations

import hashlib
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

TARGET = "x86_64-pc-windows-msvc"
CFLAGS = ("-O1", "-ffreestanding", "-fno-stack-protector", "-fasynchronous-unwind-tables", "-fno-builtin",
          "-mno-red-zone", "-fms-extensions")
DEFAULT_BASE = 0x140000000


class ToolchainMissing(RuntimeError):
    """clang or lld-link is not installed: the caller skips what needs real compiler output."""


def toolchain_problem() -> str | None:
    """Why real PE images cannot be built here (None when they can)."""
    missing = [tool for tool in ("clang", "lld-link") if shutil.which(tool) is None]
    if missing:
        return f"{' and '.join(missing)} not installed (Debian packages clang, lld): cannot build test PE images"
    return None


@dataclass(frozen=True)
class BuiltPE:
    """A linked image: its bytes, its PDB and where its functions are."""

    name: str  # e.g. "contosoflt.sys"
    image: bytes
    pdb: bytes
    pdb_name: str  # as the CodeView record names it (no directory: /pdbaltpath:%_PDB%)
    base: int  # the ImageBase it was linked at
    functions: dict[str, int] = field(default_factory=dict)  # public name -> RVA

    def rva(self, function: str) -> int:
        try:
            return self.functions[function]
        except KeyError:
            raise KeyError(f"{self.name} has no function {function!r}; it has {sorted(self.functions)}") from None

    @property
    def size(self) -> int:
        """SizeOfImage, read from the optional header (PE32+: +0x38 from its start)."""
        e_lfanew = int.from_bytes(self.image[0x3C:0x40], "little")
        return int.from_bytes(self.image[e_lfanew + 24 + 0x38:e_lfanew + 24 + 0x3C], "little")


def build_pe(sources: dict[str, str], *, name: str = "driver.sys", entry: str = "DriverEntry",
             base: int = DEFAULT_BASE, cflags: tuple[str, ...] = (), workdir: Path | None = None) -> BuiltPE:
    """Compiles `sources` ({"file.c" or "file.s": text}) and links them into a native driver image `name`
    at `base`. Raises ToolchainMissing without clang/lld-link, RuntimeError with the tool's message if a
    compile or link fails."""
    problem = toolchain_problem()
    if problem:
        raise ToolchainMissing(problem)
    with tempfile.TemporaryDirectory(prefix="pebuild-", dir=workdir) as tmp:
        out = Path(tmp)
        objects = []
        for filename, text in sources.items():
            src = out / filename
            src.write_text(text)
            obj = out / f"{filename}.obj"  # drv.c and drv.s must not share drv.obj
            flags = list(CFLAGS) + list(cflags) if filename.endswith(".c") else []
            _run(["clang", f"--target={TARGET}", *flags, "-c", str(src), "-o", str(obj)])
            objects.append(str(obj))
        stem = name.rsplit(".", 1)[0]
        image, pdb, mapfile = out / name, out / f"{stem}.pdb", out / f"{stem}.map"
        _run(["lld-link", "/driver", "/subsystem:native", "/nodefaultlib", f"/entry:{entry}", f"/base:{base:#x}",
              "/debug", f"/pdb:{pdb}", "/pdbaltpath:%_PDB%", "/Brepro", "/opt:noicf", f"/map:{mapfile}",
              f"/out:{image}", *objects])
        functions = _map_functions(mapfile.read_text(errors="replace"), base)
        return BuiltPE(name=name, image=image.read_bytes(), pdb=pdb.read_bytes(), pdb_name=pdb.name, base=base,
                       functions=functions)


def _run(command: list[str]) -> None:
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{Path(command[0]).name} failed: {(done.stderr or done.stdout).strip()[:2000]}")


_MAP_LINE = re.compile(r"^\s*[0-9a-fA-F]{4}:[0-9a-fA-F]{8}\s+(\S+)\s+([0-9a-fA-F]{8,16})\s")


def _map_functions(text: str, base: int) -> dict[str, int]:
    """Symbol -> RVA from lld-link's /map, MSVC's layout: `section:offset  name  Rva+Base  object`."""
    functions: dict[str, int] = {}
    for line in text.splitlines():
        match = _MAP_LINE.match(line)
        if not match:
            continue
        address = int(match.group(2), 16)
        if address >= base:
            functions.setdefault(match.group(1), address - base)
    return functions


class PEBuilderCache:
    """`build_pe` with results kept for the life of the object (a test session): same inputs, same image."""

    def __init__(self, workdir: Path | None = None):
        self.workdir = workdir
        self._built: dict[str, BuiltPE] = {}

    def __call__(self, sources: dict[str, str], **options) -> BuiltPE:
        key = hashlib.sha256(repr((sorted(sources.items()), sorted(options.items()))).encode()).hexdigest()
        if key not in self._built:
            self._built[key] = build_pe(sources, workdir=self.workdir, **options)
        return self._built[key]
