"""Walks the crashing thread's kernel stack from the dump alone, saying how each frame was found.

One pipeline, tried in order for every frame, the way rust-minidump's stackwalker and WinDbg do it:

1. "cfi": the module's own unwind data (pe.py reads it from the dump, unwind.py applies it). Exact:
   saved registers and locals are skipped because the compiler said where they are.
2. "frame-pointer": no unwind data, but RBP is known and points into the stack just above RSP:
   [RBP + 8] is taken as the return address (only if it passes the call check below).
3. "scan": a bounded scan of the stack upward from RSP for the first value that lies in a loaded
   module right after a CALL instruction (decoded with capstone). A stale return address left in a
   frame's locals passes that check too, which is why a scan is the last resort and marked as such.

The first frame is the starting context ("context"). The walk stops at a return address in no loaded
module (a thread's start has none), a stack pointer that does not move up, or `max_frames`.
In a small dump no module image is present: its scan cannot check for a CALL and says so in `note`.

Each Frame has an optional `function`, empty here: a symbol resolver (scripts.dumpfile.symbols, with
`--symbols`) fills it through `Stack.with_functions(resolve)`, never changing which frames there are.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from scripts.dumpfile.context import RBP, Registers, StartingPoint
from scripts.dumpfile.errors import NotInDump
from scripts.dumpfile.modules import LoadedModule, debugger_name
from scripts.dumpfile.pe import BadImage, ModuleImage, PageCache
from scripts.dumpfile.unwind import FrameRegisterUnknown, UnwindError, is_call_before, unwind_frame

MAX_FRAMES = 32
SCAN_BYTES = 0x2000  # how far up the stack one scan looks
CALL_REACH = 7  # the longest CALL: the bytes a call check reads before a return address
SCAN_PREFETCH = 8  # candidate return addresses whose call checks are fetched together
FRAME_POINTER_REACH = 0x10000  # RBP must lie within this distance above RSP to be trusted as a frame


@dataclass(frozen=True)
class Frame:
    index: int
    pc: int  # the instruction (frame 0, or after a machine frame) or the return address
    sp: int
    trust: str  # "context" | "cfi" | "frame-pointer" | "scan"
    module: LoadedModule | None
    function: str | None = None  # "function+0x12" from public symbols, when a resolver was given
    note: str | None = None  # why this frame was found the way it was (a fallback's reason)

    @property
    def offset(self) -> int | None:
        return None if self.module is None else self.pc - self.module.base

    @property
    def symbol(self) -> str:
        """`module!function+0x..` with symbols, `module+0x..` without (WinDbg's forms)."""
        if self.module is None:
            return f"{self.pc:#x}"
        if self.function:
            return f"{debugger_name(self.module.name)}!{self.function}"
        return self.module.symbol(self.pc)

    def to_dict(self) -> dict[str, Any]:
        return {
            "index": self.index, "address": f"{self.pc:#x}", "stack_pointer": f"{self.sp:#x}",
            "module": self.module.name if self.module else None,
            "offset": None if self.offset is None else f"{self.offset:#x}",
            "function": self.function, "symbol": self.symbol, "found_by": self.trust, "note": self.note,
        }


@dataclass(frozen=True)
class Stack:
    origin: str  # which starting point the walk used
    frames: tuple[Frame, ...]
    stopped: str  # why the walk ended

    def with_functions(self, resolve: Callable[[LoadedModule, int], str | None]) -> "Stack":
        """The same frames with `function` filled by `resolve(module, rva)` where it knows one."""
        frames = tuple(replace(f, function=resolve(f.module, f.offset)) if f.module is not None else f
                       for f in self.frames)
        return replace(self, frames=frames)

    def to_dict(self) -> dict[str, Any]:
        return {"origin": self.origin, "stopped": self.stopped, "frames": [f.to_dict() for f in self.frames]}


class StackWalker:
    """Walks stacks in one dump, sharing one page cache and one module cache across walks."""

    def __init__(self, dump, *, max_frames: int = MAX_FRAMES, scan_bytes: int = SCAN_BYTES):
        self.dump = dump
        self.memory = PageCache(dump.read_virtual, getattr(dump, "batch", None))
        self.max_frames, self.scan_bytes = max_frames, scan_bytes
        self._modules: list[LoadedModule] = []
        self._images: dict[int, ModuleImage] = {}
        self._last_gpr: list[int] = [0] * 16
        # a small dump carries no module code: a scan there cannot check for a CALL
        self.code_in_dump = dump.triage is None

    # -- modules ----------------------------------------------------------------------------------

    def module_of(self, address: int) -> LoadedModule | None:
        for module in self._modules:
            if module.contains(address):
                return module
        if not 0xFFFF800000000000 <= address < 1 << 64:
            return None  # not a kernel address: no module, and no list walk for it
        module = self.dump.module_at(address).module
        if module is not None:
            self._modules.append(module)
        return module

    def _image(self, module: LoadedModule) -> ModuleImage:
        if module.base not in self._images:
            self._images[module.base] = ModuleImage(self.memory, module.base, module.size)
        return self._images[module.base]

    # -- the walk ---------------------------------------------------------------------------------

    def walk(self, start: StartingPoint) -> Stack:
        regs = start.registers.copy()
        frames = [Frame(0, regs.rip, regs.rsp, "context", self.module_of(regs.rip))]
        is_return = False
        stopped = f"stopped after {self.max_frames} frames"
        while len(frames) < self.max_frames:
            self.memory.prefetch([(regs.rsp, self.scan_bytes + 8)])  # the frame's stack, as far as a scan reads
            step = self._step(regs, is_return)
            if isinstance(step, str):
                stopped = step
                break
            new, trust, machine_frame, note = step
            module = self.module_of(new.rip if machine_frame else new.rip - 1)
            if module is None:
                stopped = (f"the next return address ({new.rip:#x}) is in no loaded module: the start of the "
                           "thread, or the end of what the dump can tell")
                break
            if new.rsp <= regs.rsp:
                stopped = f"the stack pointer did not move up at frame {len(frames)}: stopped"
                break
            frames.append(Frame(len(frames), new.rip, new.rsp, trust, module, note=note))
            regs, is_return = new, not machine_frame
        return Stack(start.origin, tuple(frames), stopped)

    def _step(self, regs: Registers, is_return: bool) -> tuple[Registers, str, bool, str | None] | str:
        """The caller of the frame `regs` describes: by unwind data, else frame pointer, else scan;
        or the reason none worked."""
        module = self.module_of(regs.rip - 1 if is_return else regs.rip)
        note = None
        if module is not None:
            try:
                unwound = unwind_frame(self._image(module), regs, self.memory.u64, self.memory.read,
                                       rip_is_return=is_return)
                return unwound.registers, "cfi", unwound.machine_frame, None
            except FrameRegisterUnknown as err:
                note = f"{module.name}: {err}"
                carried = self._carried(module, regs, is_return)
                if carried is not None:
                    return carried
            except NotInDump as err:
                note = f"{module.name}'s unwind data is not in the dump ({err.reason})"
            except (BadImage, UnwindError, struct.error) as err:
                note = f"{module.name}'s unwind data is unusable ({err})"
        else:
            note = f"{regs.rip:#x} is in no loaded module"
        found = self._frame_pointer(regs)
        if found is not None:
            return found, "frame-pointer", False, note
        self._last_gpr = regs.gpr
        found = self._scan(regs.rsp)
        if found is not None:
            scanned, checked = found
            if not checked:
                note = (note + "; " if note else "") + "module code not in the dump: no CALL check"
            return scanned, "scan", False, note
        return (note + "; " if note else "") + f"no return address found in {self.scan_bytes:#x} bytes of stack"

    def _carried(self, module: LoadedModule, regs: Registers, is_return: bool):
        """A frame-pointer function above a scanned frame: its frame register most likely still holds
        the value the function set (the frames between are not known to have saved it). Use it, and keep
        the result only if the return address it gives passes the call check."""
        try:
            unwound = unwind_frame(self._image(module), regs, self.memory.u64, self.memory.read,
                                   rip_is_return=is_return, carried_frame_register=True)
        except (NotInDump, BadImage, UnwindError, struct.error):
            return None
        new = unwound.registers
        if unwound.machine_frame or self.module_of(new.rip - 1) is None or not self._returns_from_call(new.rip):
            return None
        return new, "cfi", False, "frame register carried over a scanned frame; confirmed by the CALL before the return address"

    def _frame_pointer(self, regs: Registers) -> Registers | None:
        if RBP not in regs.known:
            return None
        rbp = regs.gpr[RBP]
        if not regs.rsp <= rbp < regs.rsp + FRAME_POINTER_REACH or rbp % 8:
            return None
        try:
            saved_rbp, ret = self.memory.u64(rbp), self.memory.u64(rbp + 8)
        except NotInDump:
            return None
        if self.module_of(ret - 1) is None or not self._returns_from_call(ret):
            return None
        out = Registers(rip=ret)
        out.rsp = rbp + 16
        out.set(RBP, saved_rbp)
        return out

    def _scan(self, rsp: int) -> tuple[Registers, bool] | None:
        """The first call-preceded return address in a loaded module at or above `rsp`."""
        self._prefetch_calls(rsp)
        for slot in range(rsp - rsp % 8, rsp + self.scan_bytes, 8):
            try:
                value = self.memory.u64(slot)
            except NotInDump:
                return None  # the end of the stack pages the dump holds
            if value < 0xFFFF800000000000 or self.module_of(value - 1) is None:
                continue
            if self.code_in_dump and not self._returns_from_call(value):
                continue
            out = Registers(gpr=list(self._last_gpr), rip=value)  # values carried, none vouched for
            out.rsp = slot + 8
            return out, self.code_in_dump
        return None

    def _prefetch_calls(self, rsp: int) -> None:
        """The code before the first few values of the stack that lie in a loaded module, in one batch: what
        the scan's call checks will read (modules already known only: no list walk for a guess)."""
        if not self.code_in_dump or getattr(self.dump, "batch", None) is None:
            return
        wanted = []
        for slot in range(rsp - rsp % 8, rsp + self.scan_bytes, 8):
            try:
                value = self.memory.u64(slot)
            except NotInDump:
                break
            if any(m.contains(value - 1) for m in self._modules):
                wanted.append((value - CALL_REACH, CALL_REACH))
                if len(wanted) == SCAN_PREFETCH:
                    break
        self.memory.prefetch(wanted)

    def _returns_from_call(self, address: int) -> bool:
        return is_call_before(self.memory.read, address)
