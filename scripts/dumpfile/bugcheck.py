"""Stop codes and exception codes by name, and which bugcheck parameter means what.

The numbers in a dump header are only useful once they have names and roles: 0x7E is
SYSTEM_THREAD_EXCEPTION_NOT_HANDLED, its parameter 1 is the exception code (0xC0000005, an access
violation) and parameter 2 the address of the instruction that raised it - the address the faulting
driver is found by. Names and parameter roles follow Microsoft's "Bug check code reference".

A code with 0x10000000 set (0x1000007E, 0x1000008E...) is documented as having the same meaning and
parameters as the code without it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

BUGCHECK_NAMES: dict[int, str] = {
    0x01: "APC_INDEX_MISMATCH",
    0x0A: "IRQL_NOT_LESS_OR_EQUAL",
    0x13: "EMPTY_THREAD_REAPER_LIST",
    0x18: "REFERENCE_BY_POINTER",
    0x19: "BAD_POOL_HEADER",
    0x1A: "MEMORY_MANAGEMENT",
    0x1E: "KMODE_EXCEPTION_NOT_HANDLED",
    0x24: "NTFS_FILE_SYSTEM",
    0x27: "RDR_FILE_SYSTEM",
    0x3B: "SYSTEM_SERVICE_EXCEPTION",
    0x3D: "INTERRUPT_EXCEPTION_NOT_HANDLED",
    0x4E: "PFN_LIST_CORRUPT",
    0x50: "PAGE_FAULT_IN_NONPAGED_AREA",
    0x5C: "HAL_INITIALIZATION_FAILED",
    0x67: "CONFIG_INITIALIZATION_FAILED",
    0x6B: "PROCESS1_INITIALIZATION_FAILED",
    0x74: "BAD_SYSTEM_CONFIG_INFO",
    0x77: "KERNEL_STACK_INPAGE_ERROR",
    0x7A: "KERNEL_DATA_INPAGE_ERROR",
    0x7B: "INACCESSIBLE_BOOT_DEVICE",
    0x7E: "SYSTEM_THREAD_EXCEPTION_NOT_HANDLED",
    0x7F: "UNEXPECTED_KERNEL_MODE_TRAP",
    0x80: "NMI_HARDWARE_FAILURE",
    0x8E: "KERNEL_MODE_EXCEPTION_NOT_HANDLED",
    0x9F: "DRIVER_POWER_STATE_FAILURE",
    0xA5: "ACPI_BIOS_ERROR",
    0xBE: "ATTEMPTED_WRITE_TO_READONLY_MEMORY",
    0xC1: "SPECIAL_POOL_DETECTED_MEMORY_CORRUPTION",
    0xC2: "BAD_POOL_CALLER",
    0xC4: "DRIVER_VERIFIER_DETECTED_VIOLATION",
    0xC5: "DRIVER_CORRUPTED_EXPOOL",
    0xCE: "DRIVER_UNLOADED_WITHOUT_CANCELLING_PENDING_OPERATIONS",
    0xD1: "DRIVER_IRQL_NOT_LESS_OR_EQUAL",
    0xD5: "DRIVER_PAGE_FAULT_IN_FREED_SPECIAL_POOL",
    0xE2: "MANUALLY_INITIATED_CRASH",
    0xEA: "THREAD_STUCK_IN_DEVICE_DRIVER",
    0xED: "UNMOUNTABLE_BOOT_VOLUME",
    0xEF: "CRITICAL_PROCESS_DIED",
    0xF4: "CRITICAL_OBJECT_TERMINATION",
    0xFC: "ATTEMPTED_EXECUTE_OF_NOEXECUTE_MEMORY",
    0x101: "CLOCK_WATCHDOG_TIMEOUT",
    0x109: "CRITICAL_STRUCTURE_CORRUPTION",
    0x116: "VIDEO_TDR_FAILURE",
    0x124: "WHEA_UNCORRECTABLE_ERROR",
    0x133: "DPC_WATCHDOG_VIOLATION",
    0x139: "KERNEL_SECURITY_CHECK_FAILURE",
    0x13A: "KERNEL_MODE_HEAP_CORRUPTION",
    0x154: "UNEXPECTED_STORE_EXCEPTION",
    0x15F: "CONNECTED_STANDBY_WATCHDOG_TIMEOUT_LIVEDUMP",
    0x161: "LIVE_SYSTEM_DUMP",
    0x1CA: "SYNTHETIC_WATCHDOG_TIMEOUT",
    0xDEADDEAD: "MANUALLY_INITIATED_CRASH1",
    0xC000021A: "STATUS_SYSTEM_PROCESS_TERMINATED",
    0xC0000221: "STATUS_IMAGE_CHECKSUM_MISMATCH",
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
    """0x1000007E -> 0x7E: the 0x10000000 variants share name and parameters."""
    if code & 0xF0000000 == 0x10000000 and (code & 0x0FFFFFFF) in BUGCHECK_NAMES:
        return code & 0x0FFFFFFF
    return code


def bugcheck_name(code: int) -> str | None:
    return BUGCHECK_NAMES.get(base_code(code))


def exception_name(code: int) -> tuple[str, str] | None:
    return EXCEPTION_NAMES.get(code)


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

    @property
    def exception_symbol(self) -> str | None:
        named = exception_name(self.exception_code) if self.exception_code is not None else None
        return named[0] if named else None

    @property
    def exception_description(self) -> str | None:
        named = exception_name(self.exception_code) if self.exception_code is not None else None
        return named[1] if named else None

    def to_dict(self) -> dict[str, Any]:
        return {
            "code": f"{self.code:#x}",
            "name": self.name,
            "parameters": [f"{p:#x}" for p in self.parameters],
            "exception": None if self.exception_code is None else {
                "code": f"{self.exception_code:#010x}",
                "name": self.exception_symbol,
                "description": self.exception_description,
            },
            "faulting_address": None if self.faulting_address is None else f"{self.faulting_address:#x}",
            "faulting_address_parameter": self.faulting_address_parameter,
        }


def interpret(code: int, parameters: tuple[int, ...], pointer_bits: int = 64) -> BugcheckMeaning:
    """Names the stop code and picks the exception and faulting address out of its parameters."""
    base = base_code(code)
    name = BUGCHECK_NAMES.get(base)
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
            access=access, accessed_address=accessed,
        )
    if base in _ADDRESS_BUGCHECKS:
        index = _ADDRESS_BUGCHECKS[base]
        accessed = parameters[0]  # all three: parameter 1 is the memory that was referenced
        return BugcheckMeaning(code=code, name=name, parameters=parameters,
                               faulting_address=_pointer(parameters[index - 1], pointer_bits),
                               faulting_address_parameter=index, accessed_address=accessed)
    return BugcheckMeaning(code=code, name=name, parameters=parameters)


def _pointer(value: int, bits: int) -> int:
    return value & ((1 << bits) - 1)
