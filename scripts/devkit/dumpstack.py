"""The crashing thread's kernel stack, laid out the way the CPU would have left it.

A test of a stack walker is only worth something if the stack was not written by the walker's logic.
So nothing here reads unwind data: each frame's stack effects come from the function's own machine
code, decoded with capstone and executed symbolically from the function's first instruction to the
point where the frame stops (its n-th CALL, or for the innermost frame the instruction that faulted):
PUSH, SUB/ADD/AND RSP, MOV [RSP+x], reg, MOVAPS [RSP+x], xmm, MOV/LEA of a frame register. The code is
what clang and lld-link produced from the test's sources (scripts/devkit/pebuilder.py), so the unwind
data the reader uses and the code the builder runs are two independent records of the same prologue.

`Call(module, function, call=n)` is one frame, given outermost first. A frame with `trap=True` is
entered by an interrupt or exception instead of a CALL: the CPU pushes a MACHINE_FRAME (SS, RSP,
RFLAGS, CS, RIP of the interrupted instruction, 16-byte aligned) and, with `error_code`, an error code.
`locals` writes (offset from RSP, value) into a frame's stack after its prologue: a stale return
address that a naive scan would take for a caller.

Nonvolatile registers get fresh random values in every frame that saves them, so an unwinder that
restores the wrong slot gets a wrong value; `StackLayout.frames` records what each frame really had.
"""

from __future__ import annotations

import random
import re
import struct
from dataclasses import dataclass, field

import capstone
import pefile

REGISTERS = ("rax", "rcx", "rdx", "rbx", "rsp", "rbp", "rsi", "rdi",
             "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15")
_IMM = r"(0x[0-9a-f]+|\d+)"


@dataclass(frozen=True)
class Call:
    module: str
    function: str
    call: int = 0  # the frame stops at this CALL of the function (0 = the first)
    trap: bool = False  # entered by an interrupt/exception (a machine frame), not by a CALL
    error_code: bool = True  # with trap: the CPU pushed an error code too
    locals: tuple[tuple[int, int], ...] = ()  # (offset from RSP after the prologue, qword) to plant


@dataclass(frozen=True)
class Image:
    """A built PE image mapped at `base` (linked there: no relocation needed)."""

    name: str
    base: int
    image: bytes
    functions: dict[str, int]

    def mapped(self) -> bytes:
        return bytes(pefile.PE(data=self.image, fast_load=True).get_memory_mapped_image())


@dataclass
class FrameTruth:
    module: str
    function: str
    pc: int  # stop instruction (innermost / interrupted) or return address into this frame
    rsp: int  # RSP in this frame at its stop point
    registers: dict[str, int]


@dataclass
class StackLayout:
    frames: list[FrameTruth] = field(default_factory=list)  # innermost first
    innermost: dict[str, int] = field(default_factory=dict)  # registers of the innermost frame (+ "rip")
    interrupted: dict[str, int] | None = None  # registers where a trap frame interrupted (+ "rip")
    machine_frame: int | None = None  # address of the MACHINE_FRAME a trap pushed


class _Simulator:
    def __init__(self, write, rng: random.Random, top: int):
        self.write, self.rng = write, rng
        self.regs = {name: rng.getrandbits(63) | 1 for name in REGISTERS}
        self.regs["rsp"] = top
        self.xmm = {i: rng.randbytes(16) for i in range(16)}
        self.written: set[int] = set()

    def push(self, value: int) -> None:
        self.regs["rsp"] -= 8
        self.store(self.regs["rsp"], struct.pack("<Q", value & (1 << 64) - 1))

    def store(self, address: int, data: bytes) -> None:
        self.write(address, data)
        self.written.update(range(address, address + len(data), 8))

    def run(self, code: bytes, address: int, stop: int) -> set[str]:
        """Executes the stack effects of the code from `address` up to `stop`; returns the registers
        the code saved (they are then free to hold new values)."""
        saved: set[str] = set()
        decoder = capstone.Cs(capstone.CS_ARCH_X86, capstone.CS_MODE_64)
        for insn in decoder.disasm(code, address):
            if insn.address == stop:
                return saved
            m, ops = insn.mnemonic, insn.op_str
            if m == "push" and ops in self.regs:
                self.push(self.regs[ops])
                saved.add(ops)
            elif m in ("sub", "add", "and") and (match := re.fullmatch(rf"rsp, {_IMM}", ops)):
                value = int(match.group(1), 0)
                rsp = self.regs["rsp"]
                self.regs["rsp"] = rsp - value if m == "sub" else rsp + value if m == "add" else rsp & value
            elif m == "mov" and (match := re.fullmatch(rf"qword ptr \[rsp(?: \+ {_IMM})?\], (\w+)", ops)) \
                    and match.group(2) in self.regs:
                self.store(self.regs["rsp"] + int(match.group(1) or "0", 0), struct.pack("<Q", self.regs[match.group(2)]))
                saved.add(match.group(2))
            elif m in ("movaps", "movups", "movdqa", "movdqu") and (
                    match := re.fullmatch(rf"xmmword ptr \[rsp(?: \+ {_IMM})?\], xmm(\d+)", ops)):
                self.store(self.regs["rsp"] + int(match.group(1) or "0", 0), self.xmm[int(match.group(2))])
                self.xmm[int(match.group(2))] = self.rng.randbytes(16)
            elif m == "lea" and (match := re.fullmatch(rf"(\w+), \[rsp(?: \+ {_IMM})?\]", ops)) and match.group(1) in self.regs:
                self.regs[match.group(1)] = self.regs["rsp"] + int(match.group(2) or "0", 0)
                saved.discard(match.group(1))
            elif m == "mov" and (match := re.fullmatch(r"(\w+), rsp", ops)) and match.group(1) in self.regs:
                self.regs[match.group(1)] = self.regs["rsp"]
                saved.discard(match.group(1))
            elif m in ("ret", "jmp") or m.startswith("j"):
                raise ValueError(f"{m} at {insn.address:#x} before the stop point: the builder runs straight-line code only")
        raise ValueError(f"the stop point {stop:#x} was not reached")


def _calls(code: bytes, start: int, end: int) -> list[tuple[int, int]]:
    decoder = capstone.Cs(capstone.CS_ARCH_X86, capstone.CS_MODE_64)
    return [(insn.address, insn.size) for insn in decoder.disasm(code, start) if insn.address < end
            and insn.mnemonic == "call"]


def lay_out_stack(calls: tuple[Call, ...], images: dict[str, Image], write, top: int, seed: int) -> StackLayout:
    """Writes the frames of `calls` (outermost first) downward from `top`; returns what they hold."""
    rng = random.Random(seed)
    sim = _Simulator(write, rng, top)
    sim.push(0)  # the thread's start has no caller
    layout = StackLayout()
    pending_return: int | None = None
    interrupted_at: int | None = None
    for position, frame in enumerate(calls):
        image = images[frame.module]
        mapped = image.mapped()
        start = image.functions[frame.function]
        ends = sorted(rva for rva in image.functions.values() if rva > start)
        end = ends[0] if ends else len(mapped)
        sites = _calls(mapped[start:end], image.base + start, image.base + end)
        if frame.call >= len(sites):
            raise ValueError(f"{frame.module}!{frame.function} has {len(sites)} CALLs, not {frame.call + 1}")
        stop, size = sites[frame.call]
        if frame.trap:
            assert interrupted_at is not None, "a trap frame needs a frame to interrupt"
            layout.interrupted = dict(sim.regs, rip=interrupted_at)
            old_rsp = sim.regs["rsp"]
            sim.regs["rsp"] &= ~0xF
            for value in (0x18, old_rsp, 0x10282, 0x10, interrupted_at):  # SS, RSP, RFLAGS, CS, RIP
                sim.push(value)
            layout.machine_frame = sim.regs["rsp"]
            if frame.error_code:
                sim.push(0x2)
        elif pending_return is not None:
            sim.push(pending_return)
        saved = sim.run(mapped[start:end], image.base + start, stop)
        for name in saved - {"rsp"}:
            sim.regs[name] = rng.getrandbits(63) | 1
        for offset, value in frame.locals:
            slot = sim.regs["rsp"] + offset
            if slot in sim.written:
                raise ValueError(f"local at rsp+{offset:#x} of {frame.function} would overwrite a saved value")
            write(slot, struct.pack("<Q", value))
        last = position == len(calls) - 1
        next_is_trap = not last and calls[position + 1].trap
        pc = stop if last or next_is_trap else stop + size
        layout.frames.insert(0, FrameTruth(frame.module, frame.function, pc, sim.regs["rsp"], dict(sim.regs)))
        pending_return, interrupted_at = stop + size, stop
        for name in ("rax", "rcx", "rdx", "r8", "r9", "r10", "r11"):
            sim.regs[name] = rng.getrandbits(63) | 1  # volatile: anything
    layout.innermost = dict(sim.regs, rip=interrupted_at)
    if layout.interrupted is None:
        layout.interrupted = layout.innermost
    return layout


def context_record(registers: dict[str, int]) -> bytes:
    """A CONTEXT (winnt.h, AMD64, 0x4D0 bytes) holding `registers` (+ "rip")."""
    ctx = bytearray(0x4D0)
    struct.pack_into("<II", ctx, 0x30, 0x10001F, 0x1F80)  # ContextFlags (CONTEXT_FULL), MxCsr
    struct.pack_into("<HHHHHHI", ctx, 0x38, 0x10, 0x2B, 0x2B, 0x53, 0x2B, 0x18, 0x40246)
    for i, name in enumerate(REGISTERS):
        struct.pack_into("<Q", ctx, 0x78 + 8 * i, registers[name])
    struct.pack_into("<Q", ctx, 0xF8, registers["rip"])
    struct.pack_into("<I", ctx, 0x118, 0x1F80)  # MxCsr in the FXSAVE area
    return bytes(ctx)
