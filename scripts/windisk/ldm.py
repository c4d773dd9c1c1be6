"""Dynamic disks (LDM): recognised, and said so; their volumes are not read yet.

A dynamic disk keeps its volumes not in the partition table but in the LDM database (1 MiB at the end of
the disk on MBR, in the "LDM metadata" partition on GPT: PRIVHEAD, TOCBLOCK, VMDB and VBLK records). The
partition table only marks the disk as dynamic (an MBR entry of type 0x42 spanning the disk, or the GPT
LDM metadata/data partitions), so without an LDM reader no Windows volume is found on it. dissect.volume's
ldm module (3.18) holds structure definitions only, no reader. Until one is written this module adds a note
naming the dynamic disk and the way to collect from it (the rescue-vm strategy: Windows imports the
dynamic disk copy as a foreign disk), so the "no Windows volume" error says why.
"""

from __future__ import annotations

from scripts.windisk.mbr import Entry, Read

NOTE = ("the disk is a dynamic disk (LDM{where}): its volumes are listed in the LDM database, which snapshot-export "
        "does not read yet; collect with repair.strategy = \"rescue-vm\" (the Windows rescue VM imports the disk "
        "copy as a foreign dynamic disk: Disk Management > Import Foreign Disks, or diskpart `import`)")


def read_ldm(read: Read, size: int, at: object, scheme: str, notes: list[str]) -> tuple[list[Entry], list[str]]:
    """The partitions as the table lists them, and a note naming the dynamic disk. `at`: the start LBA of the
    MBR's type 0x42 entry, or (offset, size) of the GPT LDM metadata partition."""
    where = " metadata partition on GPT" if scheme == "gpt" else ", MBR partition type 0x42"
    return [], notes + [NOTE.format(where=where)]
