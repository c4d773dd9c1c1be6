"""Stop codes and exception codes by name, and what each bugcheck parameter means.

The numbers in a dump header are only useful once they have names and roles: 0x7E is
SYSTEM_THREAD_EXCEPTION_NOT_HANDLED, its parameter 1 is the exception code (0xC0000005, an access
violation) and parameter 2 the address of the instruction that raised it - the address the faulting
driver is found by. Names and parameter meanings are data (bugcheck_codes.json, next to this file):
every code in Microsoft's "Bug check code reference", and the four parameters of the most frequent codes
with the sub-code tables where parameter 1 selects what parameters 2-4 mean (0x1A, 0x133, 0x9F, 0x139,
0xC4, 0x19, 0x7F, 0xC2...), each from the code's own reference page.

A code with 0x10000000 set (0x1000007E, 0x1000008E...) is documented under its own name (..._M) with the
same meaning and parameters as the code without it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

_DATA = json.loads((Path(__file__).with_name("bugcheck_codes.json")).read_text(encoding="utf-8"))
BUGCHECK_NAMES: dict[int, str] = {int(code, 16): name for code, name in _DATA["codes"].items()}
_PARAMETERS: dict[int, dict[str, Any]] = {int(code, 16): entry for code, entry in _DATA["parameters"].items()}
_DEPENDS = "Depends on parameter 1"  # a general meaning that a sub-code replaces
_TABLES: dict[str, dict[int, str]] = {
    name: {int(value, 16): text for value, text in table.items()} for name, table in _DATA["tables"].items()
}

# NTSTATUS exception codes: (symbol, what it means to an operator)
EXCEPTION_NAMES: dict[int, tuple[str, str]] = {
    0x80000001: ("STATUS_GUARD_PAGE_VIOLATION", "guard page violation"),
    0x80000002: ("STATUS_DATATYPE_MISALIGNMENT", "misaligned data access"),
    0x80000003: ("STATUS_BREAKPOINT", "breakpoint (an assertion or int 3 in the driver)"),
    0x80000004: ("STATUS_SINGLE_STEP", "single step"),
    0xC0000005: ("STATUS_ACCESS_VIOLATION", "access violation (invalid memory access)"),
    0xC0000006: ("STATUS_IN_PAGE_ERROR", "in-page error (the page could not be read from disk)"),
    0xC0000008: ("STATUS_INVALID_HANDLE", "invalid handle"),
    0xC000000D: ("STATUS_INVALID_PARAMETER", "invalid parameter"),
    0xC0000017: ("STATUS_NO_MEMORY", "out of memory"),
    0xC000001D: ("STATUS_ILLEGAL_INSTRUCTION", "illegal instruction"),
    0xC0000025: ("STATUS_NONCONTINUABLE_EXCEPTION", "non-continuable exception"),
    0xC0000026: ("STATUS_INVALID_DISPOSITION", "invalid exception disposition"),
    0xC000008C: ("STATUS_ARRAY_BOUNDS_EXCEEDED", "array bounds exceeded"),
    0xC000008D: ("STATUS_FLOAT_DENORMAL_OPERAND", "floating-point denormal operand"),
    0xC000008E: ("STATUS_FLOAT_DIVIDE_BY_ZERO", "floating-point division by zero"),
    0xC000008F: ("STATUS_FLOAT_INEXACT_RESULT", "floating-point inexact result"),
    0xC0000090: ("STATUS_FLOAT_INVALID_OPERATION", "floating-point invalid operation"),
    0xC0000091: ("STATUS_FLOAT_OVERFLOW", "floating-point overflow"),
    0xC0000092: ("STATUS_FLOAT_STACK_CHECK", "floating-point stack check"),
    0xC0000093: ("STATUS_FLOAT_UNDERFLOW", "floating-point underflow"),
    0xC0000094: ("STATUS_INTEGER_DIVIDE_BY_ZERO", "integer division by zero"),
    0xC0000095: ("STATUS_INTEGER_OVERFLOW", "integer overflow"),
    0xC0000096: ("STATUS_PRIVILEGED_INSTRUCTION", "privileged instruction"),
    0xC000009A: ("STATUS_INSUFFICIENT_RESOURCES", "insufficient system resources"),
    0xC00000FD: ("STATUS_STACK_OVERFLOW", "kernel stack overflow"),
    0xC0000374: ("STATUS_HEAP_CORRUPTION", "heap corruption"),
    0xC0000409: ("STATUS_STACK_BUFFER_OVERRUN", "stack buffer overrun (security check failure)"),
    0xC0000420: ("STATUS_ASSERTION_FAILURE", "assertion failure"),
    0xC0000602: ("STATUS_FAIL_FAST_EXCEPTION", "fail-fast exception"),
}

# Bugchecks caused by an unhandled exception: (1-based parameter with the exception code, parameter with
# the faulting instruction's address, parameter with the address of the EXCEPTION_RECORD or None).
_EXCEPTION_BUGCHECKS: dict[int, tuple[int, int, int | None]] = {
    0x1E: (1, 2, None),  # KMODE_EXCEPTION_NOT_HANDLED: parameters 3/4 are the record's first two parameters
    0x3B: (1, 2, None),  # SYSTEM_SERVICE_EXCEPTION: parameter 3 is a CONTEXT
    0x7E: (1, 2, 3),  # SYSTEM_THREAD_EXCEPTION_NOT_HANDLED: parameter 3 record, 4 context
    0x8E: (1, 2, None),  # KERNEL_MODE_EXCEPTION_NOT_HANDLED: parameter 3 is a trap frame
}
# Bugchecks without an exception whose parameters still name the faulting instruction.
_ADDRESS_BUGCHECKS: dict[int, int] = {
    0x0A: 4,  # IRQL_NOT_LESS_OR_EQUAL: parameter 4 is the address that referenced the memory
    0xD1: 4,  # DRIVER_IRQL_NOT_LESS_OR_EQUAL: same
    0x50: 3,  # PAGE_FAULT_IN_NONPAGED_AREA: parameter 3 is the faulting instruction
}

ACCESS_KINDS = {0: "read", 1: "write", 8: "execute"}


def base_code(code: int) -> int:
    """0x1000007E -> 0x7E: the 0x10000000 variants share the meaning and parameters of the base code."""
    if code & 0xF0000000 == 0x10000000 and (code & 0x0FFFFFFF) in BUGCHECK_NAMES:
        return code & 0x0FFFFFFF
    return code


def bugcheck_name(code: int) -> str | None:
    """The documented name: the code's own (0x1000007E is SYSTEM_THREAD_EXCEPTION_NOT_HANDLED_M, as WinDbg
    prints it), else the base code's for an undocumented 0x10000000 variant."""
    return BUGCHECK_NAMES.get(code) or BUGCHECK_NAMES.get(base_code(code))


def exception_name(code: int) -> tuple[str, str] | None:
    return EXCEPTION_NAMES.get(code)


@dataclass(frozen=True)
class ParameterMeaning:
    """One bugcheck parameter: what it is (`meaning`) and, where a table says, what its value means (`decoded`)."""

    index: int  # 1-based
    value: int
    meaning: str | None
    decoded: str | None = None

    @property
    def line(self) -> str:
        """`parameter 1 = 0x41790: the type of memory management violation - A page table page has been corrupted`"""
        text = f"parameter {self.index} = {self.value:#x}"
        if self.meaning:
            text += f": {self.meaning}"
        if self.decoded:
            text += f" - {self.decoded}"
        return text

    def to_dict(self) -> dict[str, Any]:
        return {"index": self.index, "value": f"{self.value:#x}", "meaning": self.meaning, "decoded": self.decoded}


def describe_parameters(code: int, parameters: tuple[int, ...]) -> tuple[ParameterMeaning, ...]:
    """What each of the four parameters means for this stop code (None where the reference says nothing)."""
    entry = _PARAMETERS.get(base_code(code))
    if entry is None:
        return tuple(ParameterMeaning(i + 1, value, None) for i, value in enumerate(parameters))
    general: list[str] = entry["parameters"]
    subcodes: dict[str, Any] | None = entry.get("subcodes")
    sub = subcodes.get(f"{parameters[0]:#x}") if subcodes else None
    values: dict[str, str] = entry.get("values", {})
    out = []
    for i, value in enumerate(parameters):
        meaning = general[i]
        decoded = _decode(values.get(str(i + 1)), value)
        if subcodes is not None and i == 0:
            decoded = sub["meaning"] if sub else "not a sub-code the reference lists"
        elif sub is not None and i > 0:
            specific = (sub.get("parameters") or [None, None, None])[i - 1]
            meaning = specific or (meaning if meaning != _DEPENDS else "not described for this sub-code")
        out.append(ParameterMeaning(i + 1, value, meaning, decoded))
    return tuple(out)


def _decode(table: str | None, value: int) -> str | None:
    if table is None:
        return None
    if table == "exception":
        named = exception_name(value & 0xFFFFFFFF)
        return f"{named[0]}: {named[1]}" if named else None
    known = _TABLES[table].get(value)
    if known is None and table == "irql":
        return f"IRQL {value}" if value < 32 else None
    return known


@dataclass(frozen=True)
class BugcheckMeaning:
    code: int
    name: str | None
    parameters: tuple[int, ...]
    exception_code: int | None = None
    faulting_address: int | None = None
    faulting_address_parameter: int | None = None  # 1-based
    exception_record_address: int | None = None
    access: str | None = None  # for 0x1E access violations, from parameter 3
    accessed_address: int | None = None  # 0x1E access violations: parameter 4; 0x0A/0xD1/0x50: parameter 1
    described: tuple[ParameterMeaning, ...] = field(default=(), compare=False)

    @property
    def exception_symbol(self) -> str | None:
        named = exception_name(self.exception_code) if self.exception_code is not None else None
        return named[0] if named else None

    @property
    def exception_description(self) -> str | None:
        named = exception_name(self.exception_code) if self.exception_code is not None else None
        return named[1] if named else None

    @property
    def parameter_lines(self) -> list[str]:
        """A readable line per parameter (`parameter 2 = 0x...: The address where the exception occurred`)."""
        return [p.line for p in self.described]

    def to_dict(self) -> dict[str, Any]:
        described = self.described or describe_parameters(self.code, self.parameters)
        return {
            "code": f"{self.code:#x}",
            "name": self.name,
            "parameters": [p.to_dict() for p in described],
            "exception": None if self.exception_code is None else {
                "code": f"{self.exception_code:#010x}",
                "name": self.exception_symbol,
                "description": self.exception_description,
            },
            "faulting_address": None if self.faulting_address is None else f"{self.faulting_address:#x}",
            "faulting_address_parameter": self.faulting_address_parameter,
        }


def interpret(code: int, parameters: tuple[int, ...], pointer_bits: int = 64) -> BugcheckMeaning:
    """Names the stop code, says what each parameter means, and picks the exception and faulting address
    out of the parameters."""
    base = base_code(code)
    name = bugcheck_name(code)
    described = describe_parameters(code, parameters)
    if base in _EXCEPTION_BUGCHECKS:
        exc_index, address_index, record_index = _EXCEPTION_BUGCHECKS[base]
        access = accessed = None
        exception_code = parameters[exc_index - 1] & 0xFFFFFFFF
        if base == 0x1E and exception_code == 0xC0000005:
            access = ACCESS_KINDS.get(parameters[2])
            accessed = parameters[3]
        return BugcheckMeaning(
            code=code, name=name, parameters=parameters, exception_code=exception_code,
            faulting_address=_pointer(parameters[address_index - 1], pointer_bits),
            faulting_address_parameter=address_index,
            exception_record_address=parameters[record_index - 1] if record_index else None,
            access=access, accessed_address=accessed, described=described,
        )
    if base in _ADDRESS_BUGCHECKS:
        index = _ADDRESS_BUGCHECKS[base]
        accessed = parameters[0]  # all three: parameter 1 is the memory that was referenced
        return BugcheckMeaning(code=code, name=name, parameters=parameters,
                               faulting_address=_pointer(parameters[index - 1], pointer_bits),
                               faulting_address_parameter=index, accessed_address=accessed, described=described)
    return BugcheckMeaning(code=code, name=name, parameters=parameters, described=described)


def _pointer(value: int, bits: int) -> int:
    return value & ((1 << bits) - 1)
