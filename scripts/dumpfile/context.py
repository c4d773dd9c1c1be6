"""Where a stack walk starts: the register state a dump records at or near the crash.

A stack can only be unwound from a known RSP and RIP (and, for functions with a frame pointer, RBP or
whichever register the function chose). A kernel dump holds several such states, and they do not say
the same thing:

- the dump header's ContextRecord (DUMP_HEADER64 +0x348, a small dump's TRIAGE_DUMP64.ContextOffset):
  the processor inside KeBugCheckEx. Always present; the walk from it crosses the bugcheck machinery
  and, for a page fault, KiPageFault's machine frame back into the code that faulted.
- a CONTEXT the bugcheck parameters name (0x7E/0x1000007E parameter 4, 0x3B parameter 3): the state of
  the thread when the exception was raised, i.e. already past the machinery. WinDbg's `.cxr`.
- a KTRAP_FRAME (0x8E/0x1000008E parameter 3): what the trap handler saved. WinDbg's `.trap`. A trap
  frame holds only the volatile registers plus RBP and the hardware's MACHINE_FRAME (RIP, RSP).
- the header's EXCEPTION_RECORD64 (+0xF00): the exception address, a cross-check on the others.

The layouts are written down as C for dissect.cstruct (offsets from winnt.h's CONTEXT and the public
ntddk/WinDbg `dt nt!_KTRAP_FRAME` of Windows 10/11 x64). `Registers` is the one register file the
unwinder works on: the sixteen integer registers, RIP and the XMM registers it restores, with the set of
registers whose value is actually known (a trap frame does not save RBX, a scanned frame knows only RSP).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from dissect.cstruct import cstruct

from scripts.dumpfile.errors import NotInDump

_LAYOUTS = cstruct().load("""
struct CONTEXT64 {                      /* winnt.h CONTEXT (AMD64), 0x4D0 bytes; the integer part */
    uint64   PHome[6];                  /* 0x00 */
    uint32   ContextFlags;              /* 0x30 */
    uint32   MxCsr;                     /* 0x34 */
    uint16   SegCs;                     /* 0x38 */
    uint16   SegDsEsFsGsSs[5];
    uint32   EFlags;                    /* 0x44 */
    uint64   Dr[6];                     /* 0x48 Dr0-Dr3, Dr6, Dr7 */
    uint64   Gpr[16];                   /* 0x78 Rax Rcx Rdx Rbx Rsp Rbp Rsi Rdi R8-R15: the x64 encoding order */
    uint64   Rip;                       /* 0xF8 */
};
struct KTRAP_FRAME64 {                  /* nt!_KTRAP_FRAME (x64), 0x190 bytes (KTRAP_FRAME_LENGTH) */
    uint64   PHome[6];                  /* 0x000 */
    uint8    PreviousMode;              /* 0x030 */
    uint8    PreviousIrql;
    uint8    FaultIndicator;
    uint8    ExceptionActive;
    uint32   MxCsr;
    uint64   Rax;                       /* 0x038 the volatile registers */
    uint64   Rcx;
    uint64   Rdx;
    uint64   R8;
    uint64   R9;
    uint64   R10;
    uint64   R11;                       /* 0x068 */
    char     _middle[0xD0];             /* 0x070 GsBase, Xmm0-5, FaultAddress, debug registers, segments, TrapFrame */
    uint64   Rbx;                       /* 0x140 */
    uint64   Rdi;
    uint64   Rsi;                       /* Rbx/Rdi/Rsi are saved only by some traps: not trusted */
    uint64   Rbp;                       /* 0x158 */
    uint64   ErrorCode;                 /* 0x160 */
    uint64   Rip;                       /* 0x168 the MACHINE_FRAME from here on */
    uint64   SegCs;                     /* 0x170 */
    uint64   EFlags;                    /* 0x178 */
    uint64   Rsp;                       /* 0x180 */
    uint64   SegSs;                     /* 0x188 */
};
struct MACHINE_FRAME {                  /* what the CPU pushes on an interrupt or exception */
    uint64   Rip;
    uint64   SegCs;
    uint64   EFlags;
    uint64   Rsp;
    uint64   SegSs;
};
""")
CONTEXT = _LAYOUTS.CONTEXT64
KTRAP_FRAME = _LAYOUTS.KTRAP_FRAME64
MACHINE_FRAME = _LAYOUTS.MACHINE_FRAME

HEADER_CONTEXT_OFFSET = 0x348  # DUMP_HEADER64.ContextRecord
CONTEXT_SIZE = 0x4D0
XMM_OFFSET = 0x1A0  # CONTEXT.Xmm0 (inside FltSave)
REGISTER_NAMES = ("rax", "rcx", "rdx", "rbx", "rsp", "rbp", "rsi", "rdi",
                  "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15")
RSP, RBP = 4, 5


@dataclass
class Registers:
    """An x64 register file as the unwinder sees it: `gpr[i]` in encoding order (0 rax ... 15 r15), rip,
    the XMM registers it restored, and which general registers are known (a register not in `known`
    holds a value nobody can vouch for)."""

    gpr: list[int] = field(default_factory=lambda: [0] * 16)
    rip: int = 0
    known: set[int] = field(default_factory=set)
    xmm: dict[int, bytes] = field(default_factory=dict)

    @property
    def rsp(self) -> int:
        return self.gpr[RSP]

    @rsp.setter
    def rsp(self, value: int) -> None:
        self.gpr[RSP] = value & 0xFFFFFFFFFFFFFFFF
        self.known.add(RSP)

    def set(self, index: int, value: int) -> None:
        self.gpr[index] = value & 0xFFFFFFFFFFFFFFFF
        self.known.add(index)

    def copy(self) -> "Registers":
        return Registers(list(self.gpr), self.rip, set(self.known), dict(self.xmm))

    def named(self) -> dict[str, str]:
        return {REGISTER_NAMES[i]: f"{self.gpr[i]:#x}" for i in sorted(self.known)} | {"rip": f"{self.rip:#x}"}


@dataclass(frozen=True)
class StartingPoint:
    """A register state to walk from, and where the dump keeps it."""

    origin: str  # "header context", "bugcheck CONTEXT (parameter 4)", "trap frame (parameter 3)"...
    address: int | None  # virtual address of the record, None for the header's own copy
    registers: Registers


def parse_context(raw: bytes, origin: str, address: int | None = None) -> StartingPoint:
    """A CONTEXT record (at least 0x100 bytes; XMM registers too when the whole 0x4D0 are given)."""
    ctx = CONTEXT(raw[:len(CONTEXT)])
    regs = Registers(gpr=[int(v) for v in ctx.Gpr], rip=int(ctx.Rip), known=set(range(16)))
    if len(raw) >= XMM_OFFSET + 16 * 16:
        regs.xmm = {i: raw[XMM_OFFSET + 16 * i:XMM_OFFSET + 16 * (i + 1)] for i in range(16)}
    return StartingPoint(origin, address, regs)


def parse_trap_frame(raw: bytes, origin: str, address: int) -> StartingPoint:
    """A KTRAP_FRAME: the volatile registers, RBP and the machine frame (RBX/RSI/RDI are saved only by
    some traps, so they are left unknown)."""
    trap = KTRAP_FRAME(raw[:len(KTRAP_FRAME)])
    regs = Registers(rip=int(trap.Rip))
    for index, name in ((0, "Rax"), (1, "Rcx"), (2, "Rdx"), (8, "R8"), (9, "R9"), (10, "R10"), (11, "R11"),
                        (5, "Rbp"), (4, "Rsp")):
        regs.set(index, int(getattr(trap, name)))
    return StartingPoint(origin, address, regs)


def header_context(dump) -> StartingPoint | None:
    """The context record the dump header carries (x64 only): the full header's +0x348, or the small
    dump's TRIAGE_DUMP64.ContextOffset. None if the dump is not x64 or the record is cut off."""
    if dump.header.bits != 64 or dump.header.machine != "x64":
        return None
    offset = dump.triage.context_offset if dump.triage is not None else HEADER_CONTEXT_OFFSET
    raw = dump.source.read_at(offset, CONTEXT_SIZE)
    if len(raw) < CONTEXT_SIZE:
        return None
    point = parse_context(raw, "dump header context")
    return point if point.registers.rip else None


def context_at(dump, address: int, origin: str) -> StartingPoint | None:
    """A CONTEXT in dump memory (None if it is not in the dump)."""
    try:
        return parse_context(dump.read_virtual(address, CONTEXT_SIZE), origin, address)
    except NotInDump:
        return None


def trap_frame_at(dump, address: int, origin: str) -> StartingPoint | None:
    """A KTRAP_FRAME in dump memory (None if it is not in the dump)."""
    try:
        return parse_trap_frame(dump.read_virtual(address, len(KTRAP_FRAME)), origin, address)
    except NotInDump:
        return None


# bugcheck code (without 0x10000000) -> (1-based parameter, "context" or "trap")
NAMED_RECORDS = {0x7E: (4, "context"), 0x3B: (3, "context"), 0x8E: (3, "trap")}


def bugcheck_record(dump, code: int, parameters: tuple[int, ...]) -> StartingPoint | None:
    """The CONTEXT or KTRAP_FRAME a bugcheck's parameters point at, when the dump holds it."""
    base = code & 0x0FFFFFFF if code & 0xF0000000 == 0x10000000 else code
    if base not in NAMED_RECORDS or dump.header.bits != 64:
        return None
    index, kind = NAMED_RECORDS[base]
    address = parameters[index - 1]
    if not address:
        return None
    if kind == "context":
        return context_at(dump, address, f"bugcheck CONTEXT (parameter {index})")
    return trap_frame_at(dump, address, f"trap frame (parameter {index})")
