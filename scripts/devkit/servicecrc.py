"""The CRC-64 the Blob service computes over a block it stored, at machine speed, for the devkit's copy shim.

Like the service, the shim hashes at machine speed: a slicing-by-8 CRC-64 (scripts.evidence.crc64's:
CRC-64/NVME, reflected polynomial 0x9A6C9329AC4BC9B5) in C, built once with this machine's C compiler into
the temp folder and loaded with ctypes (the GIL released while it runs); without a compiler it falls back to
scripts.evidence.crc64.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import tempfile
from typing import Any

from scripts.evidence import crc64


_CRC64_C = r"""
#include <stdint.h>
#include <stddef.h>
#include <string.h>
static uint64_t t[8][256];
void crashcart_crc64_init(void) {
    for (int i = 0; i < 256; i++) {
        uint64_t c = (uint64_t)i;
        for (int k = 0; k < 8; k++) c = (c & 1) ? (c >> 1) ^ 0x9A6C9329AC4BC9B5ULL : c >> 1;
        t[0][i] = c;
    }
    for (int i = 0; i < 256; i++)
        for (int k = 1; k < 8; k++) t[k][i] = (t[k - 1][i] >> 8) ^ t[0][t[k - 1][i] & 0xFF];
}
uint64_t crashcart_crc64(uint64_t crc, const unsigned char *p, size_t n) {
    crc = ~crc;
    while (n >= 8) {
        uint64_t v;
        memcpy(&v, p, 8);
        crc ^= v;  /* little-endian hosts only: the loader checks */
        crc = t[7][crc & 0xFF] ^ t[6][(crc >> 8) & 0xFF] ^ t[5][(crc >> 16) & 0xFF] ^ t[4][(crc >> 24) & 0xFF]
            ^ t[3][(crc >> 32) & 0xFF] ^ t[2][(crc >> 40) & 0xFF] ^ t[1][(crc >> 48) & 0xFF] ^ t[0][crc >> 56];
        p += 8;
        n -= 8;
    }
    while (n--) crc = t[0][(crc ^ *p++) & 0xFF] ^ (crc >> 8);
    return ~crc;
}
"""


@functools.lru_cache(maxsize=1)
def _native_crc64() -> Any:
    """The C CRC-64 as a function(bytes) -> int, or None (no compiler, a big-endian host, a failed build)."""
    import sys

    compiler = shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if compiler is None or sys.byteorder != "little":
        return None
    tag = hashlib.sha256(_CRC64_C.encode()).hexdigest()[:12]
    lib = os.path.join(tempfile.gettempdir(), f"crashcart-crc64-{tag}-{os.getuid()}.so")
    try:
        if not os.path.exists(lib):
            folder = tempfile.mkdtemp(prefix="crashcart-crc64-")
            source = os.path.join(folder, "crc64.c")
            with open(source, "w") as handle:
                handle.write(_CRC64_C)
            subprocess.run([compiler, "-O2", "-shared", "-fPIC", "-o", os.path.join(folder, "crc64.so"), source],
                           check=True, capture_output=True, timeout=120)
            os.replace(os.path.join(folder, "crc64.so"), lib)
            shutil.rmtree(folder, ignore_errors=True)
        dll = ctypes.CDLL(lib)
    except (OSError, subprocess.SubprocessError):
        return None
    dll.crashcart_crc64_init()
    function = dll.crashcart_crc64
    function.restype, function.argtypes = ctypes.c_uint64, [ctypes.c_uint64, ctypes.c_char_p, ctypes.c_size_t]
    return lambda data: int(function(0, data, len(data)))


def block_crc64(data: bytes) -> int:
    """The CRC-64 the service reports for a block (scripts.evidence.crc64's, computed in C when it can be)."""
    native = _native_crc64()
    return native(data) if native is not None else crc64.crc64(data)
