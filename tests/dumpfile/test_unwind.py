"""unwind.py on its own: the unwind codes a dump's small stack cannot hold (the _FAR forms need frames of
half a MiB), epilogs, and corrupt unwind data, on sparse memory laid out by executing the code
(scripts/devkit/dumpstack.py), with images from clang/lld-link."""

from __future__ import annotations

import struct

import capstone
import pytest

from scripts.devkit.dumpstack import Call, Image, lay_out_stack
from scripts.dumpfile.context import REGISTER_NAMES, Registers
from scripts.dumpfile.errors import NotInDump
from scripts.dumpfile.pe import BadImage, ModuleImage, PageCache
from scripts.dumpfile.unwind import unwind_frame
from tests.dumpfile import stack_sources as src

BASE = 0xFFFFF80420000000
TOP = 0xFFFFF20A00200000


class Sparse:
    """Virtual memory as a dict of pages; an absent page is NotInDump, as in a kernel dump."""

    def __init__(self):
        self.pages: dict[int, bytearray] = {}

    def write(self, address: int, data: bytes) -> None:
        for i, byte in enumerate(data):
            self.pages.setdefault((address + i) & ~0xFFF, bytearray(0x1000))[(address + i) & 0xFFF] = byte

    def read(self, address: int, size: int) -> bytes:
        out = bytearray()
        for at in range(address, address + size):
            page = self.pages.get(at & ~0xFFF)
            if page is None:
                raise NotInDump(at, "not mapped")
            out.append(page[at & 0xFFF])
        return bytes(out)


def _setup(pe_builder, name, sources, entry, calls):
    built = pe_builder(sources, name=name, entry=entry, base=BASE)
    image = Image(name, BASE, built.image, built.functions)
    memory = Sparse()
    memory.write(BASE, image.mapped())
    layout = lay_out_stack(calls, {name: image}, memory.write, TOP, seed=3)
    cache = PageCache(memory.read)
    return image, memory, layout, ModuleImage(cache, BASE, built.size), cache


def _registers(values: dict[str, int]) -> Registers:
    return Registers(gpr=[values[n] for n in REGISTER_NAMES], rip=values["rip"], known=set(range(16)))


def test_far_save_and_large_allocation(pe_builder):
    calls = (Call("far.sys", "FarCaller"), Call("far.sys", "FarSaves"))
    image, _, layout, module, cache = _setup(pe_builder, "far.sys", {"far.s": src.FAR_ASM}, "FarEntry", calls)
    inner, caller = layout.frames
    out = unwind_frame(module, _registers(layout.innermost), cache.u64, cache.read, rip_is_return=False)
    assert (out.registers.rip, out.registers.rsp) == (caller.pc, caller.rsp)
    # rbx came back from rsp+0x88000 (UWOP_SAVE_NONVOL_FAR), r12 from its push above a 0x90000 allocation
    assert out.registers.gpr[3] == caller.registers["rbx"] != inner.registers["rbx"]
    assert out.registers.gpr[12] == caller.registers["r12"] != inner.registers["r12"]
    assert len(out.registers.xmm[7]) == 16 and not out.machine_frame


def test_inside_an_epilog_the_code_not_the_prologue_decides(pe_builder):
    calls = (Call("ntoskrnl.exe", "ExpDispatch"), Call("ntoskrnl.exe", "ExpFault"))
    image, _, layout, module, cache = _setup(pe_builder, "ntoskrnl.exe", {"nt.s": src.NTOS_ASM}, "NtEntry", calls)
    inner, caller = layout.frames
    regs = _registers(layout.innermost)
    code = cache.read(regs.rip, 32)
    decoded = list(capstone.Cs(capstone.CS_ARCH_X86, capstone.CS_MODE_64).disasm(code, regs.rip))
    assert [i.mnemonic for i in decoded[:5]] == ["call", "add", "pop", "pop", "ret"]
    regs.rip = decoded[2].address  # past `add rsp, 0x48`: at the first pop
    regs.rsp = regs.rsp + 0x48
    out = unwind_frame(module, regs, cache.u64, cache.read, rip_is_return=False)
    assert (out.registers.rip, out.registers.rsp) == (caller.pc, caller.rsp)
    assert out.registers.gpr[3] == caller.registers["rbx"] and out.registers.gpr[6] == caller.registers["rsi"]


def test_corrupt_unwind_data_is_refused_not_followed(pe_builder):
    calls = (Call("ntoskrnl.exe", "ExpDispatch"), Call("ntoskrnl.exe", "ExpFault"))
    image, memory, layout, module, cache = _setup(pe_builder, "ntoskrnl.exe", {"nt.s": src.NTOS_ASM}, "NtEntry", calls)
    function = module.function_at(layout.innermost["rip"] - BASE)
    memory.write(BASE + function.unwind, bytes([0x07, 0, 1, 0, 0, 0]))  # version 7: no such UNWIND_INFO
    fresh = ModuleImage(PageCache(memory.read), BASE, module.size)
    with pytest.raises(BadImage):
        unwind_frame(fresh, _registers(layout.innermost), cache.u64, PageCache(memory.read).read, rip_is_return=False)
    memory.write(BASE, b"XX")  # no MZ: not an image
    with pytest.raises(BadImage):
        ModuleImage(PageCache(memory.read), BASE, module.size).function_at(0x1000)


def test_pebuilder_gives_the_pdb_and_function_addresses(pe_builder):
    built = pe_builder({"nt.s": src.NTOS_ASM}, name="ntoskrnl.exe", entry="NtEntry", base=BASE)
    assert built.pdb.startswith(b"Microsoft C/C++ MSF 7.00") and built.pdb_name == "ntoskrnl.pdb"
    assert set(built.functions) >= {"KeBugCheckEx", "KiPageFault", "ExpFault", "ExpDispatch"}
    assert struct.unpack_from("<H", built.image, 0)[0] == 0x5A4D and built.size == 0x4000
