"""The Windows collect script's CRC-64 (#15): the C# it compiles with Add-Type on the rescue VM computes Azure
Storage's CRC-64, and the manifest carries it as the bash script's does.

Nothing here runs Windows PowerShell or a C# compiler. The C# is kept to statements that are also C, so its
two loops - the table's and the update's - are taken out of the rendered script as they are and compiled by
this machine's C compiler inside a harness that declares C#'s `ulong`, then run over random data and held to
an independent CRC-64 (tests.evidence.test_crc64.reference). The rest is checked as text over the rendered
script: the running CRC over every block read, the manifest fields, the fallback when Add-Type is refused.
"""

from __future__ import annotations

import random
import re
import shutil
import subprocess

import pytest

from scripts import remote
from tests.evidence.test_crc64 import reference, table_reference

COMPILER = shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")


def _csharp() -> str:
    script = remote.render("windows")
    start = script.index("$script:Crc64Source = @'\n") + len("$script:Crc64Source = @'\n")
    return script[start:script.index("\n'@", start)]


def _statement(source: str, pattern: str) -> str:
    (found,) = re.findall(pattern, source)
    return found


@pytest.mark.skipif(COMPILER is None, reason="no C compiler")
def test_the_csharp_loops_compute_azure_storages_crc64(tmp_path):
    source = _csharp()
    table_loop = _statement(source, r"for \(int k = 0; k < 8; k\+\+\) \{[^\n]*\}")
    update_loop = _statement(source, r"for \(int i = offset; i < offset \+ count; i\+\+\) \{[^\n]*\}")
    assert "ulong c = ~crc;" in source and "return ~c;" in source and "ulong c = (ulong)i;" in source
    harness = tmp_path / "crc.c"
    harness.write_text(f"""
#include <stdio.h>
#include <stdlib.h>
#define ulong unsigned long long  /* C#'s ulong (after the headers: glibc has a typedef of its own) */
typedef unsigned char byte;
static ulong Table[256];
static ulong Update(ulong crc, const byte *data, int offset, int count) {{
    ulong c = ~crc;
    ulong *t = Table;
    {update_loop}
    return ~c;
}}
int main(void) {{
    for (int i = 0; i < 256; i++) {{ ulong c = (ulong)i; {table_loop} Table[i] = c; }}
    static byte buf[1 << 20];
    size_t n = fread(buf, 1, sizeof buf, stdin);
    ulong crc = 0;
    size_t half = n / 3;  /* two calls, as Send-File makes one per block */
    crc = Update(crc, buf, 0, (int)half);
    crc = Update(crc, buf, (int)half, (int)(n - half));
    printf("%016llx\\n", crc);
    return 0;
}}
""")
    exe = tmp_path / "crc"
    built = subprocess.run([COMPILER, "-O1", "-o", str(exe), str(harness)], capture_output=True, text=True)
    assert built.returncode == 0, built.stderr
    for length in (0, 1, 9, 4096, 100_003):
        data = b"123456789" if length == 9 else random.Random(length).randbytes(length)
        out = subprocess.run([str(exe)], input=data, capture_output=True, check=True).stdout.decode().strip()
        assert out == f"{reference(data):016x}" if length < 5000 else out == table_reference(data)
    assert subprocess.run([str(exe)], input=b"123456789", capture_output=True).stdout.decode().strip() == "ae8b14860a799888"


def test_the_manifest_and_the_block_list_carry_the_crc64_computed_while_reading():
    script = remote.render("windows")
    # the running CRC over every block, right beside the running SHA-256 (the file is read once)
    assert re.search(r"\[void\]\$sha\.TransformBlock\(\$buffer, 0, \$count, \$null, 0\)\n\s+if \(\$useCrc\) "
                     r"\{ \$crc = \[CrashcartCrc64\]::Update\(\$crc, \$buffer, 0, \$count\) \}", script)
    assert "$headers['x-ms-meta-crc64'] = $crc.ToString('x16')" in script
    assert "crc64        = $script:UploadCrc64" in script
    assert "crc64_by     = $(if ($null -ne $script:UploadCrc64) { 'rescue-vm' } else { $null })" in script
    # refused Add-Type (Constrained Language Mode): a note, and the SHA-256 alone - never a made-up CRC
    assert "Add-Type -TypeDefinition $script:Crc64Source -Language CSharp" in script
    assert "the manifests carry the SHA-256 only" in script
