"""BitLocker (Azure Disk Encryption) volumes read in the kit: real volumes from dissect.fve's source distribution,
unlocked with their real .BEK files (conftest.py downloads them; skipped, saying why, when it cannot), inside a GPT
disk read through scripts.base.rangeio as the snapshot export reads its URL."""

from __future__ import annotations

import hashlib
import io

import pytest

from scripts.base.errors import ExitCode
from scripts.base.rangeio import open_source
from scripts.windisk import bitlocker, disk, extract, hive
from scripts.windisk.errors import ExtractError
from tests.windisk.conftest import bde_volume


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _reader(bitlocker_disk):
    return open_source(str(bitlocker_disk.path), block_size=64 * 1024)


def test_without_a_key_the_bitlocker_windows_volume_is_refused_with_exit_11_and_the_ways_to_unlock(bitlocker_disk):
    with pytest.raises(ExtractError) as caught:
        disk.find_windows_volume(_reader(bitlocker_disk))
    err = caught.value
    assert err.exit_code == ExitCode.DISK_NOT_FOUND
    assert "BitLocker" in err.message and "partition 3" in err.message
    assert "manage-bde" in err.hint and "Key Vault" in err.hint


def test_the_real_volume_unlocked_with_its_bek_gives_ntfs_the_system_hive_and_the_dumps_byte_for_byte(bitlocker_disk):
    reader = _reader(bitlocker_disk)
    volume, scheme, partitions, notes = disk.find_windows_volume(reader, bek=bitlocker_disk.volume.bek)
    assert scheme == "gpt" and volume.number == 3 and volume.offset == bitlocker_disk.offset
    assert volume.encryption == "BEK" and partitions[2]["filesystem"] == "NTFS in BitLocker"
    # the report and the preflight say that the bytes pass through the kit
    shown = volume.to_dict()
    assert shown["encryption"] == "BitLocker, unlocked with BEK" and "pass through this machine" in shown["read"]
    assert any("no server-side copy" in n for n in notes)

    settings, _ = hive.read_crash_control(volume)
    assert settings.dump_file == r"%SystemRoot%\MEMORY.DMP" and settings.to_dict()["CrashDumpEnabled"] == 1

    dumps, _, skipped, _ = extract.find_dumps(volume.reader, volume, settings)
    kinds = {d.kind: d for d in dumps}
    assert set(kinds) == {"memory", "minidump"} and skipped == []
    memory = kinds["memory"]
    assert memory.header.bugcheck_code == 0x7E and memory.file.fragments > 1
    original = bitlocker_disk.windows.originals["Windows/MEMORY.DMP"].read_bytes()
    assert _sha(memory.file.read(volume.reader, 0, memory.file.size)) == _sha(original)
    mini = kinds["minidump"]
    assert mini.file.read(volume.reader, 0, mini.file.size) == \
        bitlocker_disk.windows.originals["Windows/Minidump/051724-21453-01.dmp"].read_bytes()
    # the extents are disk offsets, and what the disk holds there is ciphertext: a server-side copy of those
    # ranges would store encrypted sectors, which is why the bytes must be decrypted in the kit
    first = next(e for e in memory.file.extents if not e.zero)
    assert disk.read_at(reader, first.disk_offset, 512) != original[first.file_offset:first.file_offset + 512]


def test_another_volumes_bek_does_not_unlock_it_and_the_error_says_which_key_to_take(bitlocker_disk, bde_data):
    wrong = (bde_data / "startup_key.bek").read_bytes()
    with pytest.raises(ExtractError) as caught:
        disk.find_windows_volume(_reader(bitlocker_disk), bek=wrong)
    err = caught.value
    assert err.exit_code == ExitCode.DISK_NOT_FOUND
    assert "does not unlock partition 3" in err.message and "no matching VMK" in err.message
    assert "az vm encryption show" in err.hint and "rescue-vm" in err.hint


@pytest.mark.parametrize("key", [b"", b"not a key file" * 8])
def test_bytes_that_are_no_bek_file_are_named_as_such_not_a_traceback(bitlocker_disk, key):
    with pytest.raises(ExtractError) as caught:
        disk.find_windows_volume(_reader(bitlocker_disk), bek=key)
    assert "is not a BitLocker external key file" in caught.value.message
    assert caught.value.exit_code == ExitCode.DISK_NOT_FOUND


@pytest.mark.parametrize(("name", "bek", "how"), [
    ("recovery_key", "recovery_key", "BEK"),  # ADE's kind of protector: an external key
    ("startup_key", "startup_key", "BEK"),
    ("suspended", None, "clear key (protection suspended)"),  # no key needed, as Windows reads it
    ("decrypted", None, "fully decrypted"),
])
def test_real_volumes_open_to_their_ntfs_boot_sector_and_mft_mirror(bde_data, name, bek, how):
    volume = bde_volume(bde_data, name, bek)
    unlocked = bitlocker.unlock(io.BytesIO(volume.image), bek=volume.bek, where="partition 3")
    assert unlocked is not None and unlocked.how == how
    stream = unlocked.stream
    assert stream.read(512)[3:11] == b"NTFS    "
    stream.seek(0x2000)  # the $MFT mirror: encrypted on disk, an MFT record once decrypted
    assert stream.read(8) == b"FILE0\x00\x03\x00"
    if bek:
        assert volume.image[0x2000:0x2008] != b"FILE0\x00\x03\x00"


def test_a_locked_volume_without_a_key_is_not_opened(bde_data):
    volume = bde_volume(bde_data, "recovery_key", None)
    assert bitlocker.unlock(io.BytesIO(volume.image), bek=None, where="partition 3") is None


def test_a_volume_without_an_external_key_protector_says_so(bde_data):
    volume = bde_volume(bde_data, "recovery_password", None)  # protected by a recovery password only
    key = (bde_data / "recovery_key.bek").read_bytes()
    with pytest.raises(ExtractError) as caught:
        bitlocker.unlock(io.BytesIO(volume.image), bek=key, where="partition 3")
    assert "no external-key (.BEK) protector" in caught.value.message


def test_the_bek_served_by_the_key_vault_double_wrapped_with_a_kek_unlocks_the_disk(bitlocker_disk):
    """The whole snapshot-export read path of an ADE disk: the disk's encryption settings name the secret and the
    KEK, the real SDK clients read and unwrap the BEK from the Key Vault double, dissect.fve unlocks the volume."""
    from scripts.azure import keyvault as kv
    from scripts.devkit.keyvault import Credential, KeyVaultDouble

    with KeyVaultDouble() as vault:
        kek = vault.add_rsa_key("ade-kek")
        url = vault.set_secret("5ed1-bek", vault.wrap(kek, bitlocker_disk.volume.bek), content_type="Wrapped BEK",
                               tags={"DiskEncryptionKeyFileName": "5ED1.BEK", "MachineName": "web-01",
                                     "DiskEncryptionKeyEncryptionAlgorithm": "RSA-OAEP"})
        vault.grant("pipeline", kv.SECRETS_USER)
        vault.grant("pipeline", kv.CRYPTO_USER)
        settings = {"encryptionSettingsCollection": {"enabled": True, "encryptionSettings": [{
            "diskEncryptionKey": {"secretUrl": url, "sourceVault": {"id": vault.resource_id}},
            "keyEncryptionKey": {"keyUrl": kek, "sourceVault": {"id": vault.resource_id}}}]}}
        (reference,) = kv.references(disk=settings)
        bek = kv.read_bek(reference, Credential("pipeline"), connection_verify=vault.ca_file)
    volume, _, _, _ = disk.find_windows_volume(_reader(bitlocker_disk), bek=bek.data)
    settings_, _ = hive.read_crash_control(volume)
    dumps, _, _, _ = extract.find_dumps(volume.reader, volume, settings_)
    memory = next(d for d in dumps if d.kind == "memory")
    assert memory.file.read(volume.reader, 0, memory.file.size) == \
        bitlocker_disk.windows.originals["Windows/MEMORY.DMP"].read_bytes()
