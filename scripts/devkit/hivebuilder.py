"""A small writer of Windows registry hive files (regf), for building test disks.

It writes what a reader needs and nothing more: the base block with its checksum, one hive bin, key
nodes (nk) with hashed subkey lists (lh, sorted the way Windows sorts them), value lists, values (vk,
inline for data of 4 bytes or less) and one shared security descriptor (sk). Files it writes are read
back by dissect.regf in the tests, by the bash remote script's python3 reader and by hivexsh, which is what keeps it
honest. Not supported, because no test needs them: big data (db) cells, volatile keys, classes.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

REG_SZ = 1
REG_EXPAND_SZ = 2
REG_BINARY = 3
REG_DWORD = 4
REG_MULTI_SZ = 7
REG_QWORD = 11

_KEY_COMP_NAME = 0x0020
_KEY_ROOT_FLAGS = 0x0004 | 0x0008 | 0x0020  # HIVE_ENTRY | NO_DELETE | COMP_NAME
_VALUE_COMP_NAME = 0x0001
_NO_CELL = 0xFFFFFFFF
_FILETIME_2024 = 133_480_000_000_000_000  # a fixed, plausible LastWriteTime: same input, same bytes


@dataclass
class Value:
    type: int
    data: bytes


@dataclass
class Key:
    name: str
    values: dict[str, Value] = field(default_factory=dict)
    subkeys: dict[str, "Key"] = field(default_factory=dict)

    def child(self, name: str) -> "Key":
        for existing_name, key in self.subkeys.items():
            if existing_name.lower() == name.lower():
                return key
        key = self.subkeys[name] = Key(name)
        return key


def encode(type_: int, value: object) -> bytes:
    """The bytes Windows stores for a value of the given type."""
    if type_ in (REG_SZ, REG_EXPAND_SZ):
        return (str(value) + "\0").encode("utf-16-le")
    if type_ == REG_MULTI_SZ:
        return ("".join(f"{s}\0" for s in value) + "\0").encode("utf-16-le")  # type: ignore[union-attr]
    if type_ == REG_DWORD:
        return struct.pack("<I", int(value))  # type: ignore[arg-type]
    if type_ == REG_QWORD:
        return struct.pack("<Q", int(value))  # type: ignore[arg-type]
    return bytes(value)  # type: ignore[arg-type]


class HiveBuilder:
    """Collects keys and values by path, then writes them as one hive file."""

    def __init__(self, root_name: str = "ROOT", file_name: str = r"\SystemRoot\System32\Config\SYSTEM"):
        self.root = Key(root_name)
        self.file_name = file_name

    def key(self, path: str) -> Key:
        key = self.root
        for part in [p for p in path.split("\\") if p]:
            key = key.child(part)
        return key

    def set(self, path: str, name: str, value: object, type_: int = REG_SZ) -> "HiveBuilder":
        self.key(path).values[name] = Value(type_, encode(type_, value))
        return self

    def to_bytes(self) -> bytes:
        return _Writer(self.root, self.file_name).write()


def _lh_hash(name: str) -> int:
    h = 0
    for ch in name.upper():
        h = (h * 37 + ord(ch)) & 0xFFFFFFFF
    return h


def _name_bytes(name: str) -> tuple[bytes, bool]:
    try:
        return name.encode("latin-1"), True
    except UnicodeEncodeError:
        return name.encode("utf-16-le"), False


def _security_descriptor() -> bytes:
    """Self-relative SD: owner Administrators, group SYSTEM, DACL granting SYSTEM full control."""
    admins = struct.pack("<BB", 1, 2) + (5).to_bytes(6, "big") + struct.pack("<II", 32, 544)
    system = struct.pack("<BB", 1, 1) + (5).to_bytes(6, "big") + struct.pack("<I", 18)
    ace = struct.pack("<BBHI", 0, 0, 4 + 4 + len(system), 0x000F003F) + system
    acl = struct.pack("<BBHHH", 2, 0, 8 + len(ace), 1, 0) + ace
    owner_off = 20
    group_off = owner_off + len(admins)
    dacl_off = group_off + len(system)
    header = struct.pack("<BBHIIII", 1, 0, 0x8004, owner_off, group_off, 0, dacl_off)
    return header + admins + system + acl


class _Writer:
    def __init__(self, root: Key, file_name: str):
        self.root = root
        self.file_name = file_name
        self.cells = bytearray(b"\0" * 0x20)  # the hbin header, filled in at the end
        self.sk_offset = 0

    def alloc(self, payload: bytes) -> int:
        offset = len(self.cells)
        size = (4 + len(payload) + 7) & ~7
        self.cells += struct.pack("<i", -size) + payload + b"\0" * (size - 4 - len(payload))
        return offset

    def patch(self, offset: int, at: int, fmt: str, *values: int) -> None:
        struct.pack_into(fmt, self.cells, offset + 4 + at, *values)

    def write(self) -> bytes:
        sd = _security_descriptor()
        self.sk_offset = self.alloc(b"sk" + struct.pack("<HIIII", 0, 0, 0, 0, len(sd)) + sd)
        root_offset = self.write_key(self.root, parent=0, root=True)
        refs = self.count_keys(self.root)
        # sk: flink and blink point to itself (the only descriptor), reference count = keys using it.
        self.patch(self.sk_offset, 4, "<III", self.sk_offset, self.sk_offset, refs)
        size = (len(self.cells) + 4095) & ~4095
        free = size - len(self.cells)
        if free:
            self.cells += struct.pack("<i", free) + b"\0" * (free - 4)
        struct.pack_into("<4sIIIIQI", self.cells, 0, b"hbin", 0, size, 0, 0, _FILETIME_2024, 0)
        return self.base_block(root_offset, size) + bytes(self.cells)

    def count_keys(self, key: Key) -> int:
        return 1 + sum(self.count_keys(k) for k in key.subkeys.values())

    def write_key(self, key: Key, parent: int, root: bool = False) -> int:
        name, compressed = _name_bytes(key.name)
        flags = _KEY_ROOT_FLAGS if root else (_KEY_COMP_NAME if compressed else 0)
        fixed = struct.pack("<2sHQIIIIIIIIIIIIIIIHH", b"nk", flags, _FILETIME_2024, 0, parent,
                            0, 0, _NO_CELL, _NO_CELL, 0, _NO_CELL, self.sk_offset, _NO_CELL,
                            0, 0, 0, 0, 0, len(name), 0)
        offset = self.alloc(fixed + name)
        # subkeys, sorted as Windows keeps them (by upper-cased name)
        children = sorted(key.subkeys.values(), key=lambda k: k.name.upper())
        if children:
            entries = [(self.write_key(child, offset), _lh_hash(child.name)) for child in children]
            lh = b"lh" + struct.pack("<H", len(entries)) + b"".join(struct.pack("<II", o, h) for o, h in entries)
            list_offset = self.alloc(lh)
            self.patch(offset, 0x14, "<I", len(children))
            self.patch(offset, 0x1C, "<I", list_offset)
            self.patch(offset, 0x34, "<I", max(len(c.name) * 2 for c in children))
        if key.values:
            vk_offsets = [self.write_value(n, v) for n, v in key.values.items()]
            list_offset = self.alloc(b"".join(struct.pack("<I", o) for o in vk_offsets))
            self.patch(offset, 0x24, "<II", len(vk_offsets), list_offset)
            self.patch(offset, 0x3C, "<II", max(len(n) * 2 for n in key.values),
                       max(len(v.data) for v in key.values.values()))
        return offset

    def write_value(self, name: str, value: Value) -> int:
        raw_name, compressed = _name_bytes(name)
        if len(value.data) <= 4:
            length = len(value.data) | 0x80000000
            data = struct.unpack("<I", value.data.ljust(4, b"\0"))[0]
        else:
            length = len(value.data)
            data = self.alloc(value.data)
        flags = _VALUE_COMP_NAME if compressed else 0
        return self.alloc(b"vk" + struct.pack("<HIIIHH", len(raw_name), length, data, value.type, flags, 0) + raw_name)

    def base_block(self, root_offset: int, hbins_size: int) -> bytes:
        block = bytearray(4096)
        struct.pack_into("<4sIIQIIIIII", block, 0, b"regf", 1, 1, _FILETIME_2024, 1, 5, 0, 1,
                         root_offset, hbins_size)
        struct.pack_into("<I", block, 0x2C, 1)  # clustering factor
        name = self.file_name.encode("utf-16-le")[-64:]
        block[0x30:0x30 + len(name)] = name
        checksum = 0
        for (word,) in struct.iter_unpack("<I", bytes(block[:0x1FC])):
            checksum ^= word
        if checksum == 0:
            checksum = 1
        elif checksum == 0xFFFFFFFF:
            checksum = 0xFFFFFFFE
        struct.pack_into("<I", block, 0x1FC, checksum)
        return bytes(block)


def system_hive(*, current: int = 1, crash_control: dict[str, tuple[int, object]] | None = None,
                paging_files: list[str] | None = None, control_sets: tuple[int, ...] | None = None) -> bytes:
    """A SYSTEM hive as a test disk needs it: Select\\Current naming the current control set, and
    CrashControl plus Memory Management\\PagingFiles in it. Other control sets get decoy values, so a
    reader that ignores Select\\Current reads the wrong ones."""
    sets = control_sets or tuple(sorted({1, 2, current}))
    hive = HiveBuilder()
    for name, v in (("Current", current), ("Default", current), ("Failed", 0), ("LastKnownGood", current)):
        hive.set("Select", name, v, REG_DWORD)
    for n in sets:
        base = f"ControlSet{n:03d}\\Control"
        if n == current:
            values = crash_control if crash_control is not None else {
                "CrashDumpEnabled": (REG_DWORD, 2), "DumpFile": (REG_EXPAND_SZ, r"%SystemRoot%\MEMORY.DMP"),
                "MinidumpDir": (REG_EXPAND_SZ, r"%SystemRoot%\Minidump")}
            for name, (type_, value) in values.items():
                hive.set(base + "\\CrashControl", name, value, type_)
            hive.set(base + "\\Session Manager\\Memory Management", "PagingFiles",
                     paging_files if paging_files is not None else [r"C:\pagefile.sys 0 0"], REG_MULTI_SZ)
        else:
            hive.set(base + "\\CrashControl", "CrashDumpEnabled", 7, REG_DWORD)
            hive.set(base + "\\CrashControl", "DumpFile", r"%SystemRoot%\DECOY.DMP", REG_EXPAND_SZ)
            hive.set(base + "\\CrashControl", "MinidumpDir", r"%SystemRoot%\DecoyMinidump", REG_EXPAND_SZ)
        hive.set(base + "\\Windows", "CSDVersion", 0, REG_DWORD)
    return hive.to_bytes()
