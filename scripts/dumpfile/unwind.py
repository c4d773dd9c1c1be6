"""x64 virtual unwinding: one frame's caller registers from its UNWIND_INFO, as RtlVirtualUnwind does it.

Every x64 function that touches RSP or saves a nonvolatile register has a RUNTIME_FUNCTION and an
UNWIND_INFO whose unwind codes describe its prologue in reverse. Undoing them, in order, from the
registers inside the function gives the registers at its call site; RIP is then the return address the
call left at [RSP]. The codes (Microsoft's "x64 exception handling", UNWIND_CODE):

  UWOP_PUSH_NONVOL        reg = [RSP]; RSP += 8
  UWOP_ALLOC_LARGE/SMALL  RSP += size
  UWOP_SET_FPREG          RSP = frame register - 16 * FrameOffset (the function set up a frame pointer,
                          so RSP itself may have moved since: alloca, aligned locals)
  UWOP_SAVE_NONVOL(_FAR)  reg = [frame base + offset]  (saved with MOV, not PUSH)
  UWOP_SAVE_XMM128(_FAR)  xmm = [frame base + offset]
  UWOP_PUSH_MACHFRAME     an interrupt or exception entered the function: the CPU pushed a MACHINE_FRAME
                          (after an error code when OpInfo is 1); RIP and RSP come from it, and there is
                          no return address to pop
  UWOP_EPILOG (version 2) describes epilogs for the OS's own epilog unwinder: no effect here

A code applies only if the prologue got past it: inside the prologue (RIP - begin < SizeOfProlog) the
codes whose CodeOffset lies beyond RIP have not run yet. UNW_FLAG_CHAININFO continues with the chained
RUNTIME_FUNCTION's codes (a function split into fragments, or a prologue that saves more registers
later); the parent's prologue has fully run by then.

Epilogs: RtlVirtualUnwind recognises an epilog by decoding the code at RIP (`add rsp, N` or `lea rsp,
[fp + N]`, then POPs, then RET or a JMP out of the function) and emulates it instead of the prologue
codes. `epilog_unwind` does the same with capstone; it matters only for the frame the walk starts from
(a return address is never inside an epilog).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

import pefile

from scripts.dumpfile.context import REGISTER_NAMES, RSP, Registers
from scripts.dumpfile.pe import MAX_CHAIN, BadImage, ModuleImage, RuntimeFunction

_REGISTER_INDEX = {name: i for i, name in enumerate(REGISTER_NAMES)}


class UnwindError(ValueError):
    """The frame cannot be unwound from its unwind data (the caller falls back to a scan)."""


class FrameRegisterUnknown(UnwindError):
    """A frame-pointer function, and its frame register's value is not known (a scanned frame lies
    between): the value carried over may still be right, if a check confirms it."""


@dataclass(frozen=True)
class Unwound:
    """The caller's registers, and whether they came from a machine frame (an interrupt or trap: RIP is
    the interrupted instruction, not a return address)."""

    registers: Registers
    machine_frame: bool
    function: RuntimeFunction | None  # None: a leaf function (no unwind data)


def unwind_frame(image: ModuleImage, regs: Registers, read_u64: Callable[[int], int],
                 read_bytes: Callable[[int, int], bytes], *, rip_is_return: bool,
                 carried_frame_register: bool = False) -> Unwound:
    """Unwinds one frame of code in `image`. `rip_is_return`: regs.rip is a return address (look the
    function up at rip - 1, so a call that ends its function still finds it). A frame-pointer function
    needs its frame register; if that is not known (a scanned frame lies between), UnwindError, unless
    `carried_frame_register` says to use the value carried over anyway (the caller then checks the
    result). Raises NotInDump when the unwind data is not in the dump, BadImage/UnwindError when it is
    unusable."""
    lookup = regs.rip - 1 if rip_is_return else regs.rip
    function = image.function_at(lookup - image.base)
    out = regs.copy()
    if function is None:  # a leaf: no prologue, the return address is at [RSP]
        out.rip = read_u64(out.rsp)
        out.rsp = out.rsp + 8
        return Unwound(out, False, None)
    if not rip_is_return:
        epilog = epilog_unwind(image, function, regs, read_u64, read_bytes)
        if epilog is not None:
            return Unwound(epilog, False, function)
    machine_frame = _apply_codes(image, function, out, read_u64, read_bytes, regs.rip - image.base,
                                 carried_frame_register)
    if not machine_frame:
        out.rip = read_u64(out.rsp)
        out.rsp = out.rsp + 8
    return Unwound(out, machine_frame, function)


def _apply_codes(image: ModuleImage, function: RuntimeFunction, regs: Registers, read_u64, read_bytes,
                 rva: int, carried: bool) -> bool:
    """Undoes the prologue of `function` and its chain in `regs`; True if a machine frame ended it."""
    entry, offset = function, rva - function.begin
    for depth in range(MAX_CHAIN):
        info, chained = image.unwind_info(entry.unwind)
        frame_register = info.FrameRegister
        codes = [code for code in info.UnwindCodes if not isinstance(code, pefile.PrologEpilogOpEpilogMarker)]
        executed = [code for code in codes if depth > 0 or offset >= info.SizeOfProlog
                    or code.struct.CodeOffset <= offset]
        base = regs.rsp
        if frame_register and any(isinstance(c, pefile.PrologEpilogOpSetFP) for c in executed):
            if frame_register not in regs.known and not carried:
                raise FrameRegisterUnknown(f"the frame register {REGISTER_NAMES[frame_register]} is not known here")
            base = regs.gpr[frame_register] - 16 * info.FrameOffset
        for code in executed:
            if _apply(code, info, regs, base, read_u64, read_bytes):
                return True
        if chained is None:
            return False
        entry = image.primary_entry(chained)
    raise BadImage(f"chained unwind info loops in the image at {image.base:#x}")


def _apply(code, info, regs: Registers, base: int, read_u64, read_bytes) -> bool:
    """One unwind code; True for UWOP_PUSH_MACHFRAME (the frame is done)."""
    op = code.struct.UnwindOp
    if op == pefile.UWOP_PUSH_NONVOL:
        regs.set(code.struct.Reg, read_u64(regs.rsp))
        regs.rsp = regs.rsp + 8
    elif op in (pefile.UWOP_ALLOC_LARGE, pefile.UWOP_ALLOC_SMALL):
        regs.rsp = regs.rsp + code.get_alloc_size()
    elif op == pefile.UWOP_SET_FPREG:
        regs.rsp = base
    elif op in (pefile.UWOP_SAVE_NONVOL, pefile.UWOP_SAVE_NONVOL_FAR):
        regs.set(code.struct.Reg, read_u64(base + code.get_offset()))
    elif op in (pefile.UWOP_SAVE_XMM128, pefile.UWOP_SAVE_XMM128_FAR):
        regs.xmm[code.struct.Reg] = read_bytes(base + code.get_offset(), 16)
    elif op == pefile.UWOP_PUSH_MACHFRAME:
        frame = regs.rsp + (8 if code.struct.OpInfo else 0)
        regs.rip = read_u64(frame)
        regs.rsp = read_u64(frame + 24)
        return True
    else:
        raise UnwindError(f"unknown unwind code {op}")
    return False


# --------------------------------------------------------------------------------------------------
# epilogs

_EPILOG_WINDOW = 64
_IMMEDIATE = r"(?:0x[0-9a-f]+|\d+)"


def epilog_unwind(image: ModuleImage, function: RuntimeFunction, regs: Registers, read_u64, read_bytes
                  ) -> Registers | None:
    """If RIP is in an epilog of `function`, the caller's registers by emulating the rest of it; None
    otherwise. Accepted shape (the only one x64 allows): [add rsp, N | lea rsp, [reg + N]], pop reg...,
    then ret, or a jmp whose target is outside the function (a tail call)."""
    try:
        code = read_bytes(regs.rip, _EPILOG_WINDOW)
    except Exception:  # noqa: BLE001 - no code, no epilog check: unwind by the prologue codes
        return None
    out = regs.copy()
    for index, insn in enumerate(_decoder().disasm(code, regs.rip)):
        mnemonic, operands = insn.mnemonic, insn.op_str
        if index == 0 and mnemonic == "add" and re.fullmatch(rf"rsp, {_IMMEDIATE}", operands):
            out.rsp = out.rsp + int(operands.split(", ")[1], 0)
        elif index == 0 and mnemonic == "lea" and (match := re.fullmatch(
                rf"rsp, \[(\w+)(?: ([+-]) ({_IMMEDIATE}))?\]", operands)):
            register = _REGISTER_INDEX.get(match.group(1))
            if register is None or register not in out.known:
                return None
            delta = int(match.group(3), 0) if match.group(3) else 0
            out.rsp = out.gpr[register] + (-delta if match.group(2) == "-" else delta)
        elif mnemonic == "pop" and operands in _REGISTER_INDEX:
            out.set(_REGISTER_INDEX[operands], read_u64(out.rsp))
            out.rsp = out.rsp + 8
        elif mnemonic == "ret" and insn.size == 1:
            out.rip = read_u64(out.rsp)
            out.rsp = out.rsp + 8
            return out
        elif mnemonic == "jmp" and re.fullmatch(_IMMEDIATE, operands):
            target = int(operands, 0) - image.base
            if function.begin <= target < function.end:
                return None  # a jump inside the function: body code, not an epilog
            out.rip = read_u64(out.rsp)
            out.rsp = out.rsp + 8
            return out
        else:
            return None
    return None


_CAPSTONE = None


def _decoder():
    global _CAPSTONE
    if _CAPSTONE is None:
        import capstone

        _CAPSTONE = capstone.Cs(capstone.CS_ARCH_X86, capstone.CS_MODE_64)
    return _CAPSTONE


def is_call_before(read_bytes: Callable[[int, int], bytes], address: int) -> bool:
    """True if the instruction that ends right at `address` is a CALL (so `address` can be a return
    address). Tries every CALL length x64 has (2..7 bytes, prefixes included)."""
    for length in (5, 6, 2, 3, 7, 4):
        try:
            code = read_bytes(address - length, length)
        except Exception:  # noqa: BLE001 - the bytes before are not in the dump: not this length
            continue
        decoded = list(_decoder().disasm(code, address - length))
        if len(decoded) == 1 and decoded[0].size == length and decoded[0].mnemonic == "call":
            return True
    return False
