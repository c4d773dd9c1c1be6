"""The copy shim answers a plain Put Block with the x-ms-content-crc64 Azure documents (Azurite 3.35 sends none).

Put Block REST page, response headers: x-ms-content-crc64 "for versions 2019-02-02 or later ... computed by the
Blob service ... returned when the Content-md5 header isn't present in the request". The SDK returns it as
`content_crc64`; it must be the CRC-64 of the bytes stored (checked against an independent bit-by-bit CRC).
"""

from __future__ import annotations

import os
import uuid

import pytest

from scripts.devkit.azurite import start_azurite
from scripts.devkit.copyshim import CopyShim
from scripts.evidence import crc64
from tests.evidence.test_crc64 import reference

pytestmark = [pytest.mark.slow]


@pytest.fixture(scope="module")
def shim():
    with start_azurite() as azurite, CopyShim(azurite) as instance:
        yield instance


@pytest.fixture
def blob(shim):
    from azure.storage.blob import BlobServiceClient

    container = BlobServiceClient.from_connection_string(shim.connection_string).create_container(
        f"shim-{uuid.uuid4().hex[:8]}")
    return container.get_blob_client("MEMORY.DMP")


def test_put_block_without_content_md5_answers_the_services_crc64(shim, blob):
    data = os.urandom(70_001)
    answer = blob.stage_block("block-1", data, length=len(data))
    assert answer["content_crc64"] is not None
    assert crc64.from_header(answer["content_crc64"]) == reference(data)
    blob.commit_block_list(["block-1"])
    assert blob.download_blob().readall() == data  # the block was stored as sent


def test_put_block_with_content_md5_answers_no_crc64(shim, blob):
    answer = blob.stage_block("block-1", b"x" * 1000, validate_content=True)  # the SDK sends Content-MD5
    assert answer["content_crc64"] is None


def test_a_service_that_reports_no_crc64(shim, blob):
    shim.report_crc64 = False
    try:
        assert blob.stage_block("block-1", b"y" * 1000)["content_crc64"] is None
    finally:
        shim.report_crc64 = True
