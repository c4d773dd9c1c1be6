"""Optional public symbols (`--symbols`): real PDBs from clang + lld-link, served by a loopback symbol server.

The images are mapped as the kernel maps them (headers at the base, each section at its RVA) and read
through a `read(address, size)` that raises NotInDump outside what the "dump" holds, as
Dump.read_virtual does. The symbol store key a request must use is taken from pefile's own reading of
the CodeView record, not from the code under test.
"""

from __future__ import annotations

import time
import uuid

import pefile
import pytest

from scripts.base.errors import ExitCode
from scripts.devkit.symserver import SymbolServer
from scripts.dumpfile.errors import NotInDump
from scripts.dumpfile.modules import LoadedModule
from scripts.dumpfile.symbolpath import MS_PUBLIC_SYMBOLS, Directory, Store, SymbolPath, SymbolPathError
from scripts.dumpfile.symbols import CodeViewMissing, PdbId, Symbolizer, read_codeview

DRIVER = {"contosoflt.c": r"""
__declspec(noinline) int FltWriteHelper(volatile int *p) { int x = *p; return x * 3 + 1; }
__declspec(noinline) int FltPreWrite(int a) { volatile int z = a; return FltWriteHelper(&z) + 2; }
int DriverEntry(void *a, void *b) { return FltPreWrite((int)(long long)a); }
"""}
OTHER = {"fabrikam.c": r"""
__declspec(noinline) int FabQueue(volatile int *p) { return *p + 7; }
int DriverEntry(void *a, void *b) { volatile int z = 1; return FabQueue(&z); }
"""}
KERNEL = {"nt.c": r"""
__declspec(noinline) void KeBugCheckEx(volatile int *p) { *p = 0; }
int KiEntry(void *a, void *b) { volatile int z = 1; KeBugCheckEx(&z); return z; }
"""}
CONTOSO_BASE = 0xFFFFF80420000000
FABRIKAM_BASE = 0xFFFFF80421000000
NT_BASE = 0xFFFFF8041C800000


@pytest.fixture(scope="module")
def builder(pe_builder):
    """tests/dumpfile/conftest.py's session builder (skips, with the reason, without clang/lld-link)."""
    return pe_builder


@pytest.fixture(scope="module")
def contoso(builder):
    return builder(DRIVER, name="contosoflt.sys", base=CONTOSO_BASE)


@pytest.fixture(scope="module")
def contoso_in_dump(builder):
    """contosoflt.sys linked at the base the generated dumps load it at (scripts/devkit/dumpkernel.py)."""
    from scripts.devkit.dumpkernel import DEFAULT_MODULES
    base = next(m.base for m in DEFAULT_MODULES if m.name == "contosoflt.sys")
    return builder(DRIVER, name="contosoflt.sys", base=base)


@pytest.fixture(scope="module")
def fabrikam(builder):
    return builder(OTHER, name="fabrikam.sys", base=FABRIKAM_BASE)


class Memory:
    """Kernel virtual memory holding mapped images; everything else is 'not in the dump'."""

    def __init__(self, *images, missing_pages: tuple[int, ...] = ()):
        self.regions = []
        for built in images:
            mapped = pefile.PE(data=built.image).get_memory_mapped_image()
            self.regions.append((built.base, mapped.ljust(built.size, b"\0")))
        self.missing = set(missing_pages)
        self.reads = 0

    def patch(self, address: int, data: bytes) -> None:
        for i, (base, mapped) in enumerate(self.regions):
            if base <= address < base + len(mapped):
                offset = address - base
                self.regions[i] = (base, mapped[:offset] + data + mapped[offset + len(data):])

    def read(self, address: int, size: int) -> bytes:
        self.reads += 1
        for page in range(address & ~0xFFF, address + size, 0x1000):
            if page in self.missing:
                raise NotInDump(page, "the page is not in the dump")
        for base, mapped in self.regions:
            if base <= address and address + size <= base + len(mapped):
                return mapped[address - base:address - base + size]
        raise NotInDump(address, "no page table entry")


def module(built) -> LoadedModule:
    return LoadedModule(name=built.name, base=built.base, size=built.size)


def store_key(built) -> str:
    """The symstore key as pefile reads it from the image (GUID fields + age, upper-case hex)."""
    entries = [d.entry for d in pefile.PE(data=built.image).DIRECTORY_ENTRY_DEBUG if d.entry is not None]
    return entries[0].Signature_String


@pytest.fixture
def server(tmp_path):
    with SymbolServer(tmp_path / "upstream") as running:
        yield running


# -- the symbol path -----------------------------------------------------------------------------


def test_symbol_path_forms_as_windbg_reads_them(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    default = tmp_path / "xdg" / "crashcart" / "sym"
    url = "https://symbols.example.com/download/symbols"

    assert SymbolPath.parse(f"srv*{tmp_path}/c*{url}").elements == (Store((tmp_path / "c",), url),)
    assert SymbolPath.parse(f"SRV*{url}/").elements == (Store((default,), url),)  # HTTP always has a cache
    assert SymbolPath.parse(f"srv**{url}").elements == (Store((default,), url),)
    assert SymbolPath.parse(f"srv*{tmp_path}/a*{tmp_path}/b*{url}").elements == (
        Store((tmp_path / "a", tmp_path / "b"), url),)
    assert SymbolPath.parse(f"cache*{tmp_path}/c;srv*{url}").elements == (Store((tmp_path / "c",), url),)
    assert SymbolPath.parse("srv*").elements == (Store((default,), MS_PUBLIC_SYMBOLS),)
    assert SymbolPath.parse(f"symsrv*symsrv.dll*{tmp_path}/c*{url}").elements == (Store((tmp_path / "c",), url),)
    assert SymbolPath.parse(f"srv*{tmp_path}/store").elements == (Store((), tmp_path / "store"),)
    assert SymbolPath.parse(f"{tmp_path}/pdbs;;srv*{tmp_path}/c*{url};").elements == (
        Directory(tmp_path / "pdbs"), Store((tmp_path / "c",), url))


@pytest.mark.parametrize("text, says", [
    ("", "empty"),
    ("  ;  ", "empty"),
    ("srv*http://a.example/s*http://b.example/s", "not the last store"),
    ("symsrv*othersrv.dll*/tmp/c*http://a.example/s", "othersrv.dll"),
    ("srv*/tmp/c*ftp://a.example/s", "not an http(s) URL"),
    ("http://a.example/s", "srv*<cache>*<url>"),
    ("svr*/tmp/c*http://a.example/s", "neither srv*"),
    ("cache*/tmp/a*/tmp/b", "one directory"),
    ("cache*/tmp/a", "a cache* alone looks nowhere"),
    ("srv*C:\\Symbols*https://msdl.microsoft.com/download/symbols", "Windows path"),
    ("srv*\\\\server\\share", "Windows path"),
    ("srv*/tmp/c*http://a.example/s?sig=1", "query"),
    ("srv*/tmp/c*https://me:hunter2@a.example/s", "credentials"),
])
def test_symbol_path_syntax_errors_are_usage_errors(text, says):
    with pytest.raises(SymbolPathError) as caught:
        SymbolPath.parse(text)
    assert caught.value.exit_code == ExitCode.USAGE
    assert says in caught.value.message
    assert "supported: srv*<cache>*<url>" in caught.value.message
    assert "\n" not in caught.value.message
    assert "hunter2" not in caught.value.message and "sig=1" not in caught.value.message


# -- the CodeView record -------------------------------------------------------------------------


def test_codeview_record_is_read_from_dump_memory_in_three_reads(contoso):
    memory = Memory(contoso)
    pdb = read_codeview(memory.read, contoso.base)
    assert pdb.name == "contosoflt.pdb"
    assert f"{pdb.key}" == store_key(contoso)
    assert memory.reads == 3


def test_store_key_matches_the_documented_example():
    # Microsoft's SSQP key conventions: {0x497B72F6, 0x390A, 0x44FC, {0x87, 0x8E, ...}}, age 1
    guid = uuid.UUID("497B72F6-390A-44FC-878E-5A2D63B6CC4B")
    assert PdbId("foo.pdb", guid, 1).relative == "foo.pdb/497B72F6390A44FC878E5A2D63B6CC4B1/foo.pdb"


def test_codeview_with_a_directory_or_an_unusable_name(contoso):
    memory = Memory(contoso)
    rsds = memory.regions[0][1].index(b"RSDS")
    memory.patch(contoso.base + rsds + 24, b"x\\y\\evil.pdb\0\0")  # same length as contosoflt.pdb\0
    assert read_codeview(memory.read, contoso.base).name == "evil.pdb"
    memory.patch(contoso.base + rsds + 24, b"a\\b\\c\\d\\..\0\0\0")
    with pytest.raises(CodeViewMissing, match="unusable PDB file"):
        read_codeview(memory.read, contoso.base)


# -- resolving -----------------------------------------------------------------------------------


def test_frames_resolve_from_the_server_then_offline_from_the_cache(contoso, server, tmp_path):
    key = store_key(contoso)
    server.publish("contosoflt.pdb", key, contoso.pdb)
    cache = tmp_path / "cache"
    path = f"srv*{cache}*{server.url}"
    helper = contoso.base + contoso.rva("FltWriteHelper")

    symbols = Symbolizer(path, Memory(contoso).read)
    assert symbols.name(module(contoso), helper + 0x5) == "contosoflt!FltWriteHelper+0x5"
    assert symbols.name(module(contoso), contoso.base + contoso.rva("FltPreWrite")) == "contosoflt!FltPreWrite"
    assert symbols.name(module(contoso), contoso.base + contoso.rva("DriverEntry") + 2) == "contosoflt!DriverEntry+0x2"
    assert server.paths == [f"/download/symbols/contosoflt.pdb/{key}/contosoflt.pdb"]  # once per module
    assert symbols.notes == []
    assert (cache / "contosoflt.pdb" / key / "contosoflt.pdb").read_bytes() == contoso.pdb
    assert [p.name for p in cache.rglob("*") if p.is_file()] == ["contosoflt.pdb"]  # no partial file left

    server.stop()  # offline: the cache answers
    again = Symbolizer(path, Memory(contoso).read)
    assert again.name(module(contoso), helper + 0x5) == "contosoflt!FltWriteHelper+0x5"
    assert again.requests == 0 and again.notes == []


def test_a_pdb_with_private_debug_info_names_the_function_not_its_inlinees(builder, server, tmp_path):
    inlined = builder({"inl.c": r"""
static __forceinline int Twice(volatile int *p) { int v = *p; *p = v * 2; return v + *p; }
__declspec(noinline) int FltPreWrite(int a) { volatile int z = a; int r = Twice(&z); r += Twice(&z); return r; }
int DriverEntry(void *a, void *b) { return FltPreWrite((int)(long long)a); }
"""}, name="inl.sys", base=CONTOSO_BASE, cflags=("-g", "-gcodeview"))
    server.publish("inl.pdb", store_key(inlined), inlined.pdb)
    symbols = Symbolizer(f"srv*{tmp_path / 'c'}*{server.url}", Memory(inlined).read)
    start, end = sorted((inlined.rva("FltPreWrite"), inlined.rva("DriverEntry")))
    names = [symbols.name(module(inlined), inlined.base + rva) for rva in range(start, end)]
    assert names[0] == "inl!FltPreWrite"
    body = [name for name in names if name is not None]  # the int3 padding after the body has no symbol
    assert len(body) >= 16 and None not in names[:len(body)]
    assert body[1:] == [f"inl!FltPreWrite+{offset:#x}" for offset in range(1, len(body))]


def test_an_interrupted_download_leaves_nothing_in_the_cache(contoso, server, tmp_path):
    server.publish("contosoflt.pdb", store_key(contoso), contoso.pdb)
    server.truncate_to = len(contoso.pdb) // 2
    cache = tmp_path / "cache"
    symbols = Symbolizer(f"srv*{cache}*{server.url}", Memory(contoso).read)
    assert symbols.name(module(contoso), contoso.base + contoso.rva("FltWriteHelper")) is None
    assert "the request failed" in symbols.notes[0]
    assert not [p for p in cache.rglob("*") if p.is_file()]


def test_the_kernel_is_named_nt(builder, server, tmp_path):
    kernel = builder(KERNEL, name="ntoskrnl.exe", entry="KiEntry", base=NT_BASE)
    server.publish("ntoskrnl.pdb", store_key(kernel), kernel.pdb)
    symbols = Symbolizer(f"srv*{tmp_path / 'c'}*{server.url}", Memory(kernel).read)
    assert symbols.name(module(kernel), kernel.base + kernel.rva("KeBugCheckEx") + 3) == "nt!KeBugCheckEx+0x3"


def test_a_pdb_of_another_build_is_not_used(contoso, fabrikam, server, tmp_path):
    key = store_key(contoso)
    server.publish("contosoflt.pdb", key, fabrikam.pdb)  # right name, wrong GUID
    cache = tmp_path / "cache"
    symbols = Symbolizer(f"srv*{cache}*{server.url}", Memory(contoso).read)
    assert symbols.name(module(contoso), contoso.base + contoso.rva("FltWriteHelper")) is None
    assert any("does not match contosoflt.sys" in note and key in note for note in symbols.notes)
    assert not [p for p in cache.rglob("*") if p.is_file()]  # nothing wrong or partial was kept


def test_a_pdb_the_server_does_not_have_leaves_a_note(contoso, server, tmp_path):
    key = store_key(contoso)
    server.publish("contosoflt.pdb", key[:-1] + "2", contoso.pdb)  # same GUID, another age
    symbols = Symbolizer(f"srv*{tmp_path / 'c'}*{server.url}", Memory(contoso).read)
    assert symbols.name(module(contoso), contoso.base + contoso.rva("FltWriteHelper")) is None
    assert symbols.notes == [f"no symbols for contosoflt.sys: contosoflt.pdb/{key}/contosoflt.pdb was not found "
                             f"(looked in {tmp_path / 'c'}, {server.url}); its frames stay module+offset"]
    assert symbols.to_dict()["modules"]["contosoflt.sys"]["status"] == "not-found"


def test_a_failing_server_is_noted_and_not_asked_again(contoso, fabrikam, server, tmp_path):
    server.fail_status = 500
    symbols = Symbolizer(f"srv*{tmp_path / 'c'}*{server.url}", Memory(contoso, fabrikam).read)
    assert symbols.name(module(contoso), contoso.base + contoso.rva("FltWriteHelper")) is None
    assert symbols.name(module(fabrikam), fabrikam.base + fabrikam.rva("FabQueue")) is None
    assert len(server.requests) == 1
    assert "HTTP 500" in symbols.notes[0] and "not asked again in this run" in symbols.notes[0]


def test_a_slow_server_times_out_without_failing(contoso, server, tmp_path):
    server.publish("contosoflt.pdb", store_key(contoso), contoso.pdb)
    server.delay = 3.0
    symbols = Symbolizer(f"srv*{tmp_path / 'c'}*{server.url}", Memory(contoso).read, timeout=0.5)
    started = time.monotonic()
    assert symbols.name(module(contoso), contoso.base + contoso.rva("FltWriteHelper")) is None
    assert time.monotonic() - started < 2.5
    assert "no answer within 0.5 s" in symbols.notes[0] and "not asked again" in symbols.notes[0]


def test_a_stopped_server_is_a_note(contoso, tmp_path):
    with SymbolServer(tmp_path / "up") as stopped:
        url = stopped.url
    symbols = Symbolizer(f"srv*{tmp_path / 'c'}*{url}", Memory(contoso).read)
    assert symbols.name(module(contoso), contoso.base + contoso.rva("FltWriteHelper")) is None
    assert "the request failed" in symbols.notes[0]


def test_a_compressed_pdb_is_named_not_expanded(contoso, server, tmp_path):
    key = store_key(contoso)
    server.publish("contosoflt.pdb", key, b"MSCF\0\0\0\0" + bytes(64), stored_as="contosoflt.pd_")
    symbols = Symbolizer(f"srv*{tmp_path / 'c'}*{server.url}", Memory(contoso).read)
    assert symbols.name(module(contoso), contoso.base + contoso.rva("FltWriteHelper")) is None
    assert len(symbols.notes) == 1 and "compressed contosoflt.pd_ (CAB)" in symbols.notes[0]


def test_a_module_whose_header_is_not_in_the_dump(contoso, server, tmp_path):
    memory = Memory(contoso, missing_pages=(contoso.base,))
    symbols = Symbolizer(f"srv*{tmp_path / 'c'}*{server.url}", memory.read)
    assert symbols.name(module(contoso), contoso.base + contoso.rva("FltWriteHelper")) is None
    assert symbols.notes == ["no symbols for contosoflt.sys: its PE header is not in the dump (the page is not "
                             "in the dump)"]
    assert server.requests == []


def test_local_store_plain_directory_and_case(contoso, tmp_path):
    key = store_key(contoso)
    store = tmp_path / "store"
    (store / "CONTOSOFLT.PDB" / key.lower()).mkdir(parents=True)  # a store copied from Windows
    (store / "CONTOSOFLT.PDB" / key.lower() / "contosoflt.pdb").write_bytes(contoso.pdb)
    address = contoso.base + contoso.rva("FltPreWrite") + 1
    assert Symbolizer(f"srv*{store}", Memory(contoso).read).name(module(contoso), address) == "contosoflt!FltPreWrite+0x1"
    flat = tmp_path / "pdbs"
    flat.mkdir()
    (flat / "contosoflt.pdb").write_bytes(contoso.pdb)
    assert Symbolizer(str(flat), Memory(contoso).read).name(module(contoso), address) == "contosoflt!FltPreWrite+0x1"


def test_cascading_stores_fill_every_level(contoso, server, tmp_path):
    key = store_key(contoso)
    server.publish("contosoflt.pdb", key, contoso.pdb)
    local, mid = tmp_path / "local", tmp_path / "mid"
    path = f"srv*{local}*{mid}*{server.url}"
    first = Symbolizer(path, Memory(contoso).read)
    assert first.name(module(contoso), contoso.base + contoso.rva("FltWriteHelper")) == "contosoflt!FltWriteHelper"
    assert (local / "contosoflt.pdb" / key / "contosoflt.pdb").is_file()
    assert (mid / "contosoflt.pdb" / key / "contosoflt.pdb").is_file()
    (local / "contosoflt.pdb" / key / "contosoflt.pdb").unlink()
    server.stop()
    again = Symbolizer(path, Memory(contoso).read)
    assert again.name(module(contoso), contoso.base + contoso.rva("FltWriteHelper")) == "contosoflt!FltWriteHelper"
    assert (local / "contosoflt.pdb" / key / "contosoflt.pdb").read_bytes() == contoso.pdb


def test_an_unwritable_cache_still_gives_names(contoso, server, tmp_path):
    server.publish("contosoflt.pdb", store_key(contoso), contoso.pdb)
    blocked = tmp_path / "not-a-dir"
    blocked.write_text("a file where the cache should be")
    symbols = Symbolizer(f"srv*{blocked}*{server.url}", Memory(contoso).read)
    assert symbols.name(module(contoso), contoso.base + contoso.rva("FltWriteHelper")) == "contosoflt!FltWriteHelper"
    assert any("cannot be written" in note for note in symbols.notes)


def test_addresses_outside_the_module_are_not_named(contoso, server, tmp_path):
    server.publish("contosoflt.pdb", store_key(contoso), contoso.pdb)
    symbols = Symbolizer(f"srv*{tmp_path / 'c'}*{server.url}", Memory(contoso).read)
    assert symbols.name(module(contoso), contoso.base + contoso.size) is None
    assert server.requests == []


def test_a_generated_kernel_dump_names_the_faulting_function(contoso_in_dump, server, tmp_path):
    """End to end: the image mapped into a bitmap kernel dump, read through open_dump's page tables."""
    from scripts.devkit.dumpbuilder import build_bitmap_dump
    from scripts.devkit.dumpstack import Image
    from scripts.dumpfile import open_dump

    built = contoso_in_dump
    build_bitmap_dump(tmp_path / "MEMORY.DMP", images=(Image(built.name, built.base, built.image, built.functions),))
    server.publish("contosoflt.pdb", store_key(built), built.pdb)
    address = built.base + built.rva("FltWriteHelper") + 4
    with open_dump(str(tmp_path / "MEMORY.DMP")) as dump:
        found = dump.module_at(address).module
        symbols = Symbolizer(f"srv*{tmp_path / 'c'}*{server.url}", dump.read_virtual)
        assert found is not None and found.name == "contosoflt.sys"
        assert symbols.name(found, address) == "contosoflt!FltWriteHelper+0x4"
        assert symbols.function(found, address - found.base) == "FltWriteHelper+0x4"
    assert symbols.to_dict()["modules"]["contosoflt.sys"] == {"pdb": "contosoflt.pdb", "key": store_key(built),
                                                              "status": "loaded"}
