"""Finding a file by path, and listing a folder, on an NTFS volume: dissect.ntfs's structures, walked with bounds.

A folder's names are a B-tree: its $I30 INDEX_ROOT holds the first level, and an entry marked as a node points
(by VCN) at an index buffer in $INDEX_ALLOCATION holding the level below. dissect.ntfs's own path lookup
trusts those pointers: a node that leads back to a buffer already visited sends its search round forever
(its index buffers are cached, so not even a read marks the loop), its listing walks every VCN the
allocation's size allows, and it follows reparse points without a limit. On a damaged or hostile disk
each of those is a hang. Here the same structures are walked with a visited set and a cap on the buffers
of one folder, and reparse points are not followed (the paths crashcart reads, Windows\\System32\\config
and the dump folders, have none).

`open_volume` opens the volume without the two path searches dissect.ntfs makes on its own ($Secure and
$Extend\\$UsnJrnl: crashcart needs neither). Errors are dissect.ntfs's: FileNotFoundError /
NotADirectoryError for what is not there, BrokenIndexError for an index that loops or does not index file
names.
"""

from __future__ import annotations

import io
from typing import Any

MAX_BUFFERS = 4096  # index buffers of one folder: 4 KiB each, room for some 100,000 names
FILE_NAME = 0x30  # $FILE_NAME, the attribute a folder's $I30 index is made of
DOS_NAMESPACE = 2  # an 8.3 alias, listed beside the long name


def open_volume(stream: Any) -> Any:
    """dissect.ntfs.NTFS over the volume's bytes, with empty stand-ins for the security descriptors and the
    change journal, so that opening it makes no path search."""
    from dissect.ntfs import NTFS

    return NTFS(stream, sds=io.BytesIO(), usnjrnl=io.BytesIO())


def find(ntfs: Any, path: str) -> Any:
    """The MFT record at `path` ('/'- or '\\'-separated, from the root of the volume), names compared as NTFS
    compares them (case-insensitively)."""
    node = ntfs.mft.root
    for part in [p for p in path.replace("\\", "/").split("/") if p]:
        if not node.is_dir():
            raise NotADirectoryError(f"{path}: a part of the path is not a folder")
        node = _child(node, part, path)
    return node


def listdir(record: Any) -> list[str]:
    """The long names in a folder (no 8.3 aliases), sorted."""
    from dissect.ntfs.exceptions import BrokenIndexError

    index = _index(record)
    names: set[str] = set()
    pending = [list(index.root.entries())]
    seen: set[int] = set()
    while pending:
        for entry in pending.pop():
            if entry.is_node:
                pending.append(_buffer(index, entry.node_vcn, seen, BrokenIndexError))
            if entry.is_end:
                break
            name, namespace = _name(entry, BrokenIndexError)
            if namespace != DOS_NAMESPACE:
                names.add(name)
    return sorted(names)


def _child(node: Any, name: str, path: str) -> Any:
    """The entry called `name` in the folder `node`: a descent of its B-tree, each buffer visited once."""
    from dissect.ntfs.exceptions import BrokenIndexError

    index = _index(node)
    wanted = name.upper()
    entries = list(index.root.entries())
    seen: set[int] = set()
    while True:
        stop = None
        for entry in entries:
            if entry.is_end:
                stop = entry
                break
            found = _name(entry, BrokenIndexError)[0].upper()
            if found == wanted:
                return entry.dereference()
            if wanted < found:
                stop = entry
                break
        if stop is None or not stop.is_node:
            raise FileNotFoundError(f"File not found: {path}")
        entries = _buffer(index, stop.node_vcn, seen, BrokenIndexError)


def _index(record: Any) -> Any:
    from dissect.ntfs.exceptions import BrokenIndexError

    index = record.index("$I30")
    if index.root.attribute_type != FILE_NAME:
        raise BrokenIndexError(f"the folder's index holds attribute type {int(index.root.attribute_type):#x}, "
                               "not file names")
    return index


def _buffer(index: Any, vcn: int, seen: set[int], broken: type[Exception]) -> list[Any]:
    """The entries of the index buffer at `vcn`, if it was not visited before and the folder is not too big."""
    if vcn in seen:
        raise broken(f"the folder's index loops back to its buffer at VCN {vcn}")
    if len(seen) >= MAX_BUFFERS:
        raise broken(f"the folder's index has more than {MAX_BUFFERS} buffers")
    seen.add(vcn)
    return list(index.index_buffer(vcn).entries())


def _name(entry: Any, broken: type[Exception]) -> tuple[str, int]:
    """(name, namespace) of an index entry's $FILE_NAME key: FileNameLength at 0x40, the namespace at 0x41,
    the UTF-16 name from 0x42."""
    key = entry.key
    if len(key) < 0x42 or len(key) < 0x42 + 2 * key[0x40]:
        raise broken("an index entry is too short for the file name it holds")
    return key[0x42:0x42 + 2 * key[0x40]].decode("utf-16-le", "replace"), key[0x41]
