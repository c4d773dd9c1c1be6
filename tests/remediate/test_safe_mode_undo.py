"""safe-mode's undo as the manifest records it (scripts.remediate.recipes.undo_parameters): the copy of
{default} the fix made is deleted and the boot manager's one-time boot sequence (BCD element 0x24000002)
goes back to what it was, from either script's answer (bash: REG_MULTI_SZ as hex; PowerShell: as text)."""

from __future__ import annotations

from scripts.remediate import apply, recipes

ENTRY = "{0b2c3d4e-1111-4222-8333-944455556666}"
OTHER = "{11111111-2222-3333-4444-555555555555}"
SEQUENCE_KEY = r"Objects\{9dea862c-5cdd-4e70-acc1-f32b344d4795}\Elements\24000002"
NEW_ENTRY = {"type": "BCD_OBJECT", "id": ENTRY, "copy_of": "{5fa5a6a1-7e1c-11ee-9a8c-000d3a2b4c5d}",
             "description": "crashcart safe mode (once)", "safeboot": "minimal"}


def multi_sz_hex(*items: str) -> str:
    data = "".join(item + "\0" for item in items).encode("utf-16-le") + b"\0\0"
    return ",".join(f"{b:02x}" for b in data)


def undo(changes: list[dict]) -> dict | None:
    return recipes.undo_parameters(recipes.Recipe("safe-mode"), {"changes": changes}, run_id="undo-1", disk_lun=2)


def test_a_new_entry_is_deleted_and_an_absent_boot_sequence_removed():
    params = undo([{"store": "BCD", "key": f"Objects\\{ENTRY}", "name": "entry", "old": None, "new": NEW_ENTRY,
                    "changed": True},
                   {"store": "BCD", "key": SEQUENCE_KEY, "name": "Element", "old": None, "changed": True,
                    "new": {"type": "REG_MULTI_SZ", "hex": multi_sz_hex(ENTRY)}}])
    assert params == {"Recipe": "safe-mode", "Action": "undo", "Mode": "apply", "Force": "1", "RunId": "undo-1",
                      "DiskLun": "2", "SafeModeEntry": ENTRY, "OldBootSequence": "absent"}


def test_the_boot_sequence_that_was_there_comes_back_from_either_script():
    for old in ({"type": "REG_MULTI_SZ", "hex": multi_sz_hex(OTHER, ENTRY.upper())},  # bash (hivexsh)
                {"type": "REG_MULTI_SZ", "value": [OTHER, ENTRY.upper()]}):            # PowerShell (reg load)
        params = undo([{"key": SEQUENCE_KEY, "name": "Element", "old": old, "changed": True}])
        assert params["OldBootSequence"] == f"{OTHER},{ENTRY.upper()}" and "SafeModeEntry" not in params


def test_a_rerun_that_changed_nothing_has_nothing_to_undo_and_never_deletes_an_entry_it_found():
    found = {"store": "BCD", "key": f"Objects\\{ENTRY}", "name": "entry", "old": NEW_ENTRY, "new": NEW_ENTRY}
    assert undo([{**found, "changed": False},
                 {"key": SEQUENCE_KEY, "name": "Element", "old": None, "new": None, "changed": False}]) is None
    # the entry was found (a boot consumed the sequence): the sequence is set again, the entry stays on undo
    params = undo([{**found, "changed": False}, {"key": SEQUENCE_KEY, "name": "Element", "old": None, "changed": True}])
    assert params["OldBootSequence"] == "absent" and "SafeModeEntry" not in params


def test_the_log_names_the_new_entry():
    assert apply.shown(NEW_ENTRY) == f"BCD entry {ENTRY} 'crashcart safe mode (once)' (safeboot minimal)"
