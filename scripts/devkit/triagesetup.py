"""What bench/rangeread_bench.py, bench/triage_bench.py and tests/dumpfile/test_rangereads.py share to measure a
triage's reads: the module list they build, the dump, and a reader seen through `read_at` only.

- `module_list(count)`: DEFAULT_MODULES padded with filler drivers to `count`, the faulting driver moved to
  the end of the list, so a walk of PsLoadedModuleList goes all the way before it finds it;
- `build_triage_target(path, size, modules, layout)`: the complete bitmap dump they triage, with the module
  list laid out "measured" (as in a real kernel's list, dumpkernel.MEASURED_LAYOUT; its pool on 2 MiB pages)
  or "scattered" (every entry a page apart on 4 KiB pages: the pessimistic layout);
- `ReadAtOnly`: a reader (scripts.base.rangereader.RangeReader) offered to the triage with `read_at` only, no
  `read_many`/`prefetch`: every address is read, and waited for, on its own (the dump reader before issue
  15). It remembers what it read (`spots`), so the same reads can be replayed together.
"""

from __future__ import annotations

import os
from pathlib import Path

from scripts.devkit.dumpbuilder import DEFAULT_MODULES, BuiltDump, Module, build_bitmap_dump

MiB = 1 << 20
FAULTING = "contosoflt.sys"
LAYOUTS = ("measured", "scattered")


def module_list(count: int) -> tuple[Module, ...]:
    """DEFAULT_MODULES padded with filler drivers to `count` (a real VM loads 150-250), the faulting driver last."""
    faulting = next(m for m in DEFAULT_MODULES if m.name == FAULTING)
    others = [m for m in DEFAULT_MODULES if m is not faulting]
    others += [Module(f"drv{i:03}.sys", 0xFFFFF80422000000 + i * 0x40000, 0x20000, 0x60000000 + i)
               for i in range(max(0, count - len(DEFAULT_MODULES)))]
    return (*others, faulting)


def build_triage_target(path: str | Path, size: int, modules: int = 200, layout: str = "measured") -> BuiltDump:
    """A complete bitmap dump of a machine with `size` bytes of RAM (sparse on disk) and `modules` modules."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, not {layout!r}")
    return build_bitmap_dump(Path(path), memory_size=size, modules=module_list(modules), complete=True,
                             module_layout=layout)


class ReadAtOnly:
    """A reader seen through `read_at` (plus name, size and counters) only; `spots` lists what was read."""

    def __init__(self, reader):
        self._reader, self.name, self.size = reader, reader.name, reader.size
        self.spots: list[tuple[int, int]] = []

    def read_at(self, offset: int, size: int) -> bytes:
        self.spots.append((offset, size))
        return self._reader.read_at(offset, size)

    @property
    def bytes_read(self) -> int:
        return self._reader.bytes_read

    @property
    def requests(self) -> int:
        return self._reader.requests

    def close(self) -> None:
        pass


def data_extents(path: Path):
    """(offset, length) of the parts of a sparse file that hold data (SEEK_DATA/SEEK_HOLE)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        offset = 0
        while offset < size:
            try:
                start = os.lseek(fd, offset, os.SEEK_DATA)
            except OSError:  # ENXIO: no more data
                return
            end = os.lseek(fd, start, os.SEEK_HOLE)
            yield start, end - start
            offset = end
    finally:
        os.close(fd)


def upload_sparse(container, name: str, path: Path) -> None:
    """A page blob of the file's size with only its data extents written (Put Page, 4 MiB at most)."""
    blob = container.get_blob_client(name)
    size = path.stat().st_size
    blob.create_page_blob(size)
    with open(path, "rb") as f:
        for start, length in data_extents(path):
            start, end = start // 512 * 512, -(-(start + length) // 512) * 512
            for at in range(start, end, 4 * MiB):
                chunk_end = min(end, at + 4 * MiB)
                f.seek(at)
                data = f.read(chunk_end - at).ljust(chunk_end - at, b"\0")
                blob.upload_page(data, offset=at, length=len(data))
