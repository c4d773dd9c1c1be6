"""The culprit from the stack: generated dumps whose stacks were laid out by running real compiler output.

Each dump maps clang/lld-link images (tests/dumpfile/stack_sources.py) at their modules' bases and a
crashing thread whose frames the builder produced by executing each function's prologue
(scripts/devkit/dumpstack.py); the unwinder under test reads the images' unwind data instead. Every
test checks a frame list against what the builder recorded, and the culprit against the frame a reader
of the stack would blame.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from scripts.devkit.dumpbuilder import build_full_dump, build_triage_dump
from scripts.devkit.dumpstack import Call
from scripts.dumpfile import open_dump
from scripts.dumpfile.blame import BlameRules
from scripts.dumpfile.triage import triage
from scripts.dumpfile.unwind import is_call_before

REPO = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "CI": "1"}
NT, DRV, HAL, DECOY = "ntoskrnl.exe", "contosoflt.sys", "hal.dll", "netvsc.sys"


def _decoy(images) -> int:
    """A return address into netvsc.sys right after a real CALL: what a stale slot in a frame would hold."""
    decoy = images[DECOY]
    start = decoy.base + decoy.functions["DecoyOld"]
    code = decoy.mapped()[decoy.functions["DecoyOld"]:]
    import capstone

    for insn in capstone.Cs(capstone.CS_ARCH_X86, capstone.CS_MODE_64).disasm(code, start):
        if insn.mnemonic == "call":
            return insn.address + insn.size
    raise AssertionError("DecoyOld has no CALL")


def _build(tmp_path, images, stack, name="MEMORY.DMP", builder=build_full_dump, **options):
    return builder(tmp_path / name, images=tuple(images.values()), stack=stack, **options)


def _walked(verdict):
    return [(f.module.name if f.module else None, f.pc, f.sp) for f in verdict.frames]


def _truth(built):
    return [(f.module, f.pc, f.rsp) for f in built.stack.frames]


def test_culprit_one_frame_up_and_a_stale_return_address_is_not_blamed(tmp_path, stack_images):
    decoy = _decoy(stack_images)
    stack = (Call(DRV, "DriverEntry"), Call(DRV, "DrvWork"), Call(NT, "ExpFault", locals=((0x30, decoy),)))
    built = _build(tmp_path, stack_images, stack)
    verdict = triage(str(built.path))
    assert verdict.module.name == NT  # the fault is in the kernel...
    assert verdict.culprit.frame.module.name == DRV and verdict.culprit.frame.index == 1  # ...on the driver's behalf
    assert verdict.culprit.frame.trust == "cfi" and verdict.culprit.skipped == 1
    assert _walked(verdict) == _truth(built)
    assert verdict.stack.origin == "bugcheck CONTEXT (parameter 4)"
    # the test has teeth: a naive scan from RSP meets the decoy before the real return address
    with open_dump(built.path) as dump:
        rsp = built.stack.frames[0].rsp
        for slot in range(rsp, rsp + 0x400, 8):
            value = struct.unpack("<Q", dump.read_virtual(slot, 8))[0]
            module = dump.module_at(value).module
            if module is not None and is_call_before(dump.read_virtual, value):
                assert module.name == DECOY
                break
        else:
            raise AssertionError("no call-preceded value on the stack")
    assert DRV in verdict.next_step and "ntoskrnl.exe" in verdict.next_step


def test_culprit_two_frames_up_through_a_frame_pointer_function(tmp_path, stack_images):
    stack = (Call(DRV, "DriverEntry"), Call(DRV, "DrvFramePointer"), Call(NT, "ExpDispatch"), Call(NT, "ExpFault"))
    built = _build(tmp_path, stack_images, stack)
    verdict = triage(str(built.path))
    assert _walked(verdict) == _truth(built)
    assert verdict.culprit.frame.index == 2 and verdict.culprit.frame.module.name == DRV
    # DrvFramePointer moved RSP by 0x60 after its prologue: only its frame register finds its caller
    assert verdict.frames[3].trust == "cfi" and verdict.frames[3].pc == built.stack.frames[3].pc


def test_culprit_three_frames_up_through_chained_unwind_info(tmp_path, stack_images):
    stack = (Call(DRV, "DriverEntry"), Call(DRV, "DrvChained"), Call(NT, "ExpDispatch"), Call(NT, "ExpDispatch"),
             Call(NT, "ExpFault"))
    built = _build(tmp_path, stack_images, stack)
    verdict = triage(str(built.path))
    assert _walked(verdict) == _truth(built)
    assert verdict.culprit.frame.index == 3 and verdict.culprit.skipped == 3
    assert [f.trust for f in verdict.frames] == ["context"] + ["cfi"] * 4


def test_a_module_whose_pages_are_missing_is_crossed_by_a_scan(tmp_path, stack_images):
    stack = (Call(DRV, "DriverEntry"), Call(DRV, "DrvSaves"), Call(HAL, "DrvWork"), Call(NT, "ExpFault"))
    built = _build(tmp_path, stack_images, stack, missing=(HAL,))
    verdict = triage(str(built.path))
    assert _walked(verdict) == _truth(built)
    found = [f.trust for f in verdict.frames]
    assert found == ["context", "cfi", "scan", "cfi"]  # hal.dll has no pages: its caller is found by a scan
    assert "hal.dll's unwind data is not in the dump" in verdict.frames[2].note
    culprit = verdict.culprit.frame
    assert culprit.module.name == DRV and culprit.trust == "scan" and culprit.index == 2


def test_trap_frame_from_the_header_context_and_every_frame_exact(tmp_path, stack_images):
    """0xD1 names no context: the walk starts in KeBugCheckEx (the header's context record) and crosses
    KiPageFault's machine frame back into the code that faulted."""
    stack = (Call(DRV, "DriverEntry"), Call(DRV, "DrvOuter"), Call(DRV, "DrvChained"), Call(DRV, "DrvFramePointer"),
             Call(DRV, "DrvSaves"), Call(HAL, "DrvWork"), Call(NT, "ExpDispatch"), Call(NT, "ExpFault"),
             Call(NT, "KiPageFault", trap=True), Call(NT, "KeBugCheckEx"))
    built = _build(tmp_path, stack_images, stack, missing=(HAL,), bugcheck_code=0xD1)
    verdict = triage(str(built.path))
    assert verdict.stack.origin == "dump header context"
    assert _walked(verdict) == _truth(built)
    # frame 2 is the interrupted instruction (from the machine frame), not a return address
    assert verdict.frames[2].pc == built.stack.frames[2].pc == built.faulting_address
    assert verdict.culprit.frame.module.name == DRV and verdict.culprit.frame.index == 5
    assert verdict.culprit.frame.trust == "scan"  # above hal.dll, whose pages are missing
    assert verdict.frames[7].note.startswith("frame register carried over a scanned frame")
    assert verdict.bytes_read < 512 * 1024


def test_blame_rules_override(tmp_path, stack_images):
    stack = (Call(DRV, "DriverEntry"), Call(DRV, "DrvWork"), Call(NT, "ExpFault"))
    built = _build(tmp_path, stack_images, stack)
    rules = tmp_path / "triage.ini"
    rules.write_text("contosoflt=ignore\n")
    assert triage(str(built.path), rules=BlameRules.load(rules)).culprit is None
    rules.write_text("nt!ExpFault*=blame-the-kernel\n")  # a function rule needs names: without symbols, unused
    assert triage(str(built.path), rules=BlameRules.load(rules)).culprit.frame.module.name == DRV
    named = triage(str(built.path), rules=BlameRules.load(rules),
                   resolve=lambda module, rva: "ExpFault+0x6" if module.name == NT else None)
    assert named.culprit.frame.module.name == NT and named.culprit.owner == "blame-the-kernel"
    assert named.frames[0].symbol == "nt!ExpFault+0x6"  # WinDbg's module names


def test_a_windows_module_blamed_is_not_sent_to_a_vendor(tmp_path, stack_images):
    """A rule that blames the kernel frame (as `!analyze` can blame a Windows driver) names a Windows module:
    the advice is Windows Update and Microsoft support, never "its vendor's fixed version"."""
    stack = (Call(DRV, "DriverEntry"), Call(DRV, "DrvWork"), Call(NT, "ExpFault"))
    built = _build(tmp_path, stack_images, stack)
    rules = tmp_path / "triage.ini"
    rules.write_text("nt=kernel\n")
    verdict = triage(str(built.path), rules=BlameRules.load(rules))
    assert verdict.culprit.frame.module.name == NT
    assert "a Windows driver" in verdict.next_step and "vendor" not in verdict.next_step
    assert "cumulative update" in verdict.next_step and "Microsoft support" in verdict.next_step
    third_party = triage(str(built.path))
    assert third_party.culprit.frame.module.name == DRV and "vendor's fixed version" in third_party.next_step


def test_without_unwinding_there_is_no_stack_and_fewer_reads(tmp_path, stack_images):
    stack = (Call(DRV, "DriverEntry"), Call(DRV, "DrvWork"), Call(NT, "ExpFault"))
    built = _build(tmp_path, stack_images, stack, memory_size=4 * 1024 ** 3)
    plain, unwound = triage(str(built.path), unwind=False), triage(str(built.path))
    assert plain.culprit is None and plain.frames == () and unwound.culprit is not None
    assert plain.bytes_read < unwound.bytes_read <= 4 * 1024 * 1024  # the budget for a 4 GiB dump


def test_small_dump_scans_its_stack_without_images(tmp_path, stack_images):
    stack = (Call(DRV, "DriverEntry"), Call(DRV, "DrvWork"), Call(NT, "ExpFault"))
    built = _build(tmp_path, stack_images, stack, builder=build_triage_dump)
    verdict = triage(str(built.path))
    assert verdict.culprit.frame.module.name == DRV and verdict.culprit.frame.trust == "scan"
    assert "no CALL check" in verdict.culprit.frame.note


def test_cli_json_and_text(tmp_path, stack_images):
    stack = (Call(DRV, "DriverEntry"), Call(DRV, "DrvWork"), Call(NT, "ExpFault"))
    built = _build(tmp_path, stack_images, stack)
    done = subprocess.run([sys.executable, "-m", "scripts", "triage", "--json", str(built.path)],
                          capture_output=True, text=True, check=False, cwd=REPO, env=ENV)
    assert done.returncode == 0, done.stderr
    verdict = json.loads(done.stdout)
    assert verdict["culprit"]["module"] == DRV and verdict["culprit"]["found_by"] == "cfi"
    assert verdict["faulting_module"]["name"] == NT
    assert [f["found_by"] for f in verdict["stack"]["frames"]] == ["context", "cfi", "cfi"]
    assert verdict["stack"]["frames"][1]["symbol"] == f"{DRV}+{built.stack.frames[1].pc - stack_images[DRV].base:#x}"
    text = subprocess.run([sys.executable, "-m", "scripts", "triage", str(built.path)],
                          capture_output=True, text=True, check=False, cwd=REPO, env=ENV)
    assert "culprit" in text.stderr and "[cfi]" in text.stderr
    bad = tmp_path / "rules.ini"
    bad.write_text("this line has no owner\n")
    refused = subprocess.run([sys.executable, "-m", "scripts", "triage", "--blame-rules", str(bad), str(built.path)],
                             capture_output=True, text=True, check=False, cwd=REPO, env=ENV)
    assert refused.returncode == 2 and "rules.ini line 1" in refused.stderr and "Traceback" not in refused.stderr


def test_blame_rules_from_notepad_or_a_pipe(tmp_path, stack_images):
    """The CLI review: a rules file saved by Notepad (a byte-order mark) read as a bad first line, and a pipe
    given as --blame-rules hung triage for ever."""
    built = _build(tmp_path, stack_images, (Call(DRV, "DriverEntry"), Call(DRV, "DrvWork"), Call(NT, "ExpFault")))
    notepad = tmp_path / "notepad.ini"
    notepad.write_bytes(b"\xef\xbb\xbfcontosoflt=ignore\r\n")
    assert triage(str(built.path), rules=BlameRules.load(notepad)).culprit is None
    pipe = tmp_path / "rules.fifo"
    os.mkfifo(pipe)
    refused = subprocess.run([sys.executable, "-m", "scripts", "triage", "--blame-rules", str(pipe), str(built.path)],
                             capture_output=True, text=True, check=False, cwd=REPO, env=ENV, timeout=60)
    assert refused.returncode == 2 and "--blame-rules" in refused.stderr and "not a regular file" in refused.stderr


@pytest.mark.parametrize("line", ["mod*ule=ignore", "=ignore", "nt!Ke*x=ignore", "nt"])
def test_bad_rule_lines_are_refused(line):
    from scripts.dumpfile.blame import BadRules, parse_rules

    with pytest.raises(BadRules):
        parse_rules(line, "rules")


def test_collect_report_shows_the_culprit_and_the_frames(tmp_path, stack_images):
    from scripts.collection.report import markdown

    stack = (Call(DRV, "DriverEntry"), Call(DRV, "DrvWork"), Call(NT, "ExpFault"))
    built = _build(tmp_path, stack_images, stack)
    verdict = triage(str(built.path))
    text = markdown({"triage": verdict.to_dict()})
    culprit = verdict.culprit.frame.symbol
    assert f"- Culprit: `{culprit}`" in text and "(found by cfi)" in text
    assert f"| 1 | `{culprit}` | cfi |" in text and "| 0 | `ntoskrnl.exe+" in text
    assert "Faulting module: `ntoskrnl.exe`" in text


def test_with_a_symbol_path_frames_carry_function_names(tmp_path, stack_images, pe_builder):
    """The test PDBs in a local symbol store (symstore's layout): the culprit is named by function."""
    import pefile

    from tests.dumpfile import stack_sources as src

    store = tmp_path / "symbols"
    for name, sources, entry in ((NT, {"nt.s": src.NTOS_ASM}, "NtEntry"),
                                 (DRV, {"drv.c": src.DRIVER_C, "drv.s": src.DRIVER_ASM}, "DriverEntry")):
        built_pe = pe_builder(sources, name=name, entry=entry, base=stack_images[name].base)
        cv = pefile.PE(data=built_pe.image).DIRECTORY_ENTRY_DEBUG[0].entry
        key = (f"{cv.Signature_Data1:08X}{cv.Signature_Data2:04X}{cv.Signature_Data3:04X}"
               f"{cv.Signature_Data4:02X}{cv.Signature_Data5:02X}{cv.Signature_Data6.hex().upper()}{cv.Age:X}")
        folder = store / built_pe.pdb_name / key
        folder.mkdir(parents=True)
        (folder / built_pe.pdb_name).write_bytes(built_pe.pdb)
    stack = (Call(DRV, "DriverEntry"), Call(DRV, "DrvWork"), Call(NT, "ExpFault"))
    built = _build(tmp_path, stack_images, stack)
    verdict = triage(str(built.path), symbols=f"srv*{store}")
    assert verdict.frames[0].function.startswith("ExpFault+")
    assert verdict.culprit.frame.function.startswith("DrvWork+")
    assert verdict.culprit.frame.symbol.startswith("contosoflt!DrvWork+0x")  # WinDbg: module without extension
    assert verdict.to_dict()["symbols"]["notes"] == []
