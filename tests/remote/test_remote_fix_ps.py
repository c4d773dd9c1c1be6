"""The PowerShell variant of the fix script (scripts/remote/fix.ps1.j2) under Windows PowerShell 5.1's rules.

It cannot run here: it is parsed with tree-sitter (no ERROR/MISSING node), held to the documented 5.1
cmdlet signatures and the 5.1 pitfall lint rules like collect/prepare (tests/remote/pslint.py), and both
variants are checked to declare every parameter the kit passes for every recipe, apply and undo.
"""

from __future__ import annotations

import re

import pytest

from scripts.remediate import recipes
from tests.remote import pslint, psparse
from tests.remote.test_remote_prepare import ps_errors

if not psparse.SIGNATURES.is_file():  # pragma: no cover - the shared folder is beside every checkout
    pytest.skip(f"the 5.1 cmdlet signatures are not at {psparse.SIGNATURES}", allow_module_level=True)


def test_fix_ps1_parses_and_meets_windows_powershell_51():
    source = recipes.render_script("windows")
    assert ps_errors(source) == []
    found = pslint.findings(source)
    assert found == [], "\n".join(map(str, found))
    assert "{{" not in source and "{%" not in source


def test_the_checks_reach_the_fix_template():
    source = recipes.render_script("windows")
    script = psparse.Script(source)
    sig = psparse.signatures()
    used = {sig.cmdlet(c.name)[0] for c in script.commands if c.name and sig.cmdlet(c.name)}
    assert {"Get-FileHash", "Move-Item", "Get-ChildItem", "Get-Item", "Set-Disk", "Get-Partition"} <= used
    # a 5.1 slip written into this template is caught
    good = "Get-FileHash -LiteralPath $Path -Algorithm SHA256"
    assert good in source
    assert "parameter" in {f.rule for f in pslint.findings(source.replace(good, good + " -Confirm:$false -Depth 2", 1))}
    assert ps_errors(source.replace("function Edit-Driver([string]$Base) {", "function Edit-Driver([string]$Base) {{", 1))


def test_native_programs_run_only_through_invoke_native():
    source = recipes.render_script("windows")
    script = psparse.Script(source)
    native = [c for c in script.commands if psparse.is_native(script, c, psparse.signatures())]
    assert len(native) == 1 and script.text(script.enclosing_function(native[0].node)).startswith("function Invoke-Native(")
    assert "Invoke-Native 'dism.exe'" in source and "Invoke-Native 'bcdedit.exe'" in source



def test_safe_mode_uses_bcdedits_documented_one_time_switches_and_never_sets_default():
    # BCDEdit Command-Line Options: /copy {id} /d, /set {id} safeboot minimal, /displayorder {id} /remove,
    # /delete {id}, /deletevalue; "BCDEdit /bootsequence": the one-time boot sequence
    source = recipes.render_script("windows")
    calls = re.findall(r"Invoke-BcdEdit \$\w+ \(?@\(([^)]*)\)", source)
    assert sorted(calls) == sorted(["'/copy', '{default}', '/d', $script:SafeModeDescription",
                                    "'/set', $entry, 'safeboot', 'minimal'", "'/displayorder', $entry, '/remove'",
                                    "'/delete', $SafeModeEntry", "'/deletevalue', '{bootmgr}', 'bootsequence'",
                                    "'/bootsequence'"])
    assert "'{default}', 'safeboot'" not in source  # the persistent form is gone: {default} is never changed
    assert "$script:SafeModeDescription = 'crashcart safe mode (once)'" in source
    assert "$script:BootSequenceElement = '24000002'" in source and "$script:SafeBootElement = '25000080'" in source


def _ps_params(script: str) -> set[str]:
    block = script[script.index("param(") : script.index(")\n\nSet-StrictMode")]
    return set(re.findall(r"\[string\]\$(\w+)", block))


def _bash_params(script: str) -> set[str]:
    return set(re.findall(r"\$\{(\w+):-", script)) - {"PATH"}


@pytest.mark.parametrize("recipe", [
    recipes.Recipe("disable-driver", driver="csagent"), recipes.Recipe("remove-file", pattern=r"C:\x\*.sys"),
    recipes.Recipe("safe-mode"), recipes.Recipe("last-known-good"), recipes.Recipe("revert-pending")])
def test_both_variants_declare_every_parameter_the_kit_passes(recipe):
    passed = set(recipe.parameters(run_id="fix-1", mode="plan", disk_lun=0))
    applied = {"changes": [{"changed": True, "key": r"ControlSet001\Services\csagent", "name": "Current",
                            "old": {"type": "REG_DWORD", "value": 1}}],
               "files": [{"moved": True}], "run_id": "fix-1"}
    if recipe.name == "safe-mode":  # what the scripts answer: the new entry and the boot sequence they set
        applied["changes"] = [{"changed": True, "key": "Objects\\{5fa5a6a1-7e1c-11ee-9a8c-000d3a2b4c5d}", "name": "entry",
                               "old": None},
                              {"changed": True, "key": "Objects\\{9dea862c-5cdd-4e70-acc1-f32b344d4795}\\Elements\\24000002",
                               "name": "Element", "old": {"type": "REG_MULTI_SZ", "value": ["{11111111-2222-3333-4444-555555555555}"]}}]
    undo = recipes.undo_parameters(recipe, applied, run_id="undo-1", disk_lun=0) or {}
    if recipe.name == "safe-mode":
        assert (undo["SafeModeEntry"], undo["OldBootSequence"]) == ("{5fa5a6a1-7e1c-11ee-9a8c-000d3a2b4c5d}",
                                                                     "{11111111-2222-3333-4444-555555555555}")
    passed |= set(undo)
    assert passed <= _ps_params(recipes.render_script("windows"))
    assert passed <= _bash_params(recipes.render_script("linux"))
