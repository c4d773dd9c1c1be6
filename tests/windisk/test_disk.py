"""scripts.windisk.disk: the exported disk's VHD footer (the partition tables and volumes are read over real
disk images in test_extract.py)."""

from __future__ import annotations

import io
import struct

import pytest

from scripts.devkit import gptdisk
from scripts.windisk import disk
from scripts.windisk.errors import ExtractError


def test_fixed_vhd_footer_is_recognised_and_other_vhds_refused():
    raw = bytes(8192)
    assert disk.disk_size(io.BytesIO(raw)) == (8192, False)
    assert disk.disk_size(io.BytesIO(raw + gptdisk.fixed_vhd_footer(8192))) == (8192, True)
    dynamic = bytearray(gptdisk.fixed_vhd_footer(8192))
    struct.pack_into(">I", dynamic, 60, 3)
    with pytest.raises(ExtractError, match="not a fixed VHD"):
        disk.disk_size(io.BytesIO(raw + bytes(dynamic)))
    with pytest.raises(ExtractError, match="dynamic VHD"):
        disk.disk_size(io.BytesIO(bytes(gptdisk.fixed_vhd_footer(8192)) + raw))
