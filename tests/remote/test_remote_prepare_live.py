"""The live prepare script (scripts/remote/prepare_live.ps1.j2), checked like the other PowerShell templates.

Nothing here can run Windows PowerShell 5.1, so the rendered script is parsed with tree-sitter-powershell
(no ERROR/MISSING node), held to the documented 5.1 cmdlet signatures and the 5.1 lint rules
(tests/remote/psparse.py, pslint.py), and its contract with the kit is pinned: the parameters it declares
are the ones scripts.nodump.live passes, the names it may write are the kit's, and no value ever reaches
the script's text (the rendered script is the same whatever the operator asks for; the values travel as
Run Command parameters, verbatim, as JSON data).
"""

from __future__ import annotations

import json
import re

import pytest

from scripts.azure.runcommand import Execution, Outcome
from scripts.devkit import arm_live
from scripts.nodump import live, prepare
from scripts.remote import RESULT_MARKER
from tests.remote import pslint, psparse
from tests.remote.test_remote_prepare import ps_errors


def script() -> str:
    return live.render_script()


def test_parses_clean_and_holds_no_template_syntax():
    source = script()
    assert ps_errors(source) == []
    assert "{{" not in source and "{%" not in source and "{##" not in source
    assert ps_errors(source.replace("function Invoke-Apply {", "function Invoke-Apply {{", 1))  # the check can fail


@pytest.mark.skipif(not psparse.SIGNATURES.is_file(), reason="the 5.1 cmdlet signatures are not beside the checkout")
def test_meets_windows_powershell_51_and_the_checks_reach_it():
    source = script()
    found = pslint.findings(source)
    assert found == [], "\n".join(map(str, found))
    parsed, sig = psparse.Script(source), psparse.signatures()
    used = {sig.cmdlet(c.name)[0] for c in parsed.commands if c.name and sig.cmdlet(c.name)}
    assert {"New-ItemProperty", "Remove-ItemProperty", "Get-Item", "ConvertFrom-Json", "Get-CimInstance"} <= used
    for good, bad, rule in [
        ("Remove-ItemProperty -LiteralPath $script:KeyPath -Name $name\n",
         "Remove-ItemProperty -LiteralPath $script:KeyPath -Name $name -Recurse\n", "parameter"),
        ("ConvertFrom-Json -InputObject $Text", "ConvertFrom-Json -InputObject $Text -AsHashtable", "convertfrom-json-ps7"),
        ("$current = $null\n", "$current = $null ?? 1\n", "ps7-syntax"),
    ]:
        assert good in source, good
        assert rule in {f.rule for f in pslint.findings(source.replace(good, bad, 1))}, rule


def test_json_written_one_way_and_registry_numbers_read_unsigned():
    parsed = psparse.Script(script())
    calls = [c for c in parsed.commands if c.name == "ConvertTo-Json"]
    assert len(calls) == 1
    assert parsed.text(parsed.enclosing_function(calls[0].node)).startswith("function ConvertTo-JsonText(")
    assert "function Get-UnsignedValue(" in script() and "-band 0xFFFFFFFF" not in script()


def _declared(source: str) -> set[str]:
    block = source[source.index("param(") : source.index(")\n\nSet-StrictMode")]
    return set(re.findall(r"\[string\]\$(\w+)", block))


class _Capture:
    """A runner that keeps the command it is given and answers with the script's result line."""

    vm_name = "web-01"

    def __init__(self, answer: str):
        self.answer, self.commands = answer, []

    def run(self, command, on_status=None):
        self.commands.append(command)
        return Outcome(Execution(state="Succeeded", exit_code=0, output=self.answer), 1.0, True)


def _read_answer() -> str:
    return arm_live.LiveVm("vm").run({"Mode": "read", "RunId": "r"})["output"]


def test_declares_every_parameter_the_kit_passes_and_knows_the_kits_names():
    runner = _Capture(_read_answer())
    live.read(runner, run_id="20250517T031245Z", timeout_s=60)
    (command,) = runner.commands
    assert set(command.parameters) == _declared(command.script) == {"Mode", "Values", "Remove", "Expect", "RunId"}
    names = re.search(r"\$script:Names = @\(([^)]*)\)", script()).group(1)
    assert tuple(re.findall(r"'(\w+)'", names)) == live.NAMES == arm_live.NAMES
    assert set(prepare.crash_control_values(prepare.PrepareSettings(memory_mb=1024),
                                            prepare.choose_dump_target(1, 1024, [], "always"))) < set(live.NAMES)


def test_values_are_parameters_never_spliced_into_the_script():
    """The operator's values (a legal path that looks like code) reach the VM as JSON in a parameter, verbatim;
    the script text is identical whatever was asked."""
    odd = r"%SystemRoot%\$(calc)`x`;'q'\MEMORY.DMP"
    facts = live.LiveFacts.from_result(json.loads(_read_answer().split(" ", 1)[1]))
    scripts, params = set(), []
    for dump_file in (odd, r"%SystemRoot%\MEMORY.DMP"):
        settings = prepare.PrepareSettings(memory_mb=16384, dump_type=1, dump_file=dump_file)
        runner = _Capture(arm_compute_result("applied"))
        live.apply(runner, live.plan(settings, facts), run_id="20250517T031245Z", timeout_s=60)
        (command,) = runner.commands
        scripts.add(command.script)
        params.append(command.parameters)
    assert len(scripts) == 1 and "calc" not in scripts.pop()
    assert json.loads(params[0]["Values"])["DumpFile"] == {"type": "REG_EXPAND_SZ", "value": odd}
    assert params[0]["Mode"] == "prepare"
    assert json.loads(params[0]["Expect"])["CrashDumpEnabled"] == {"type": "REG_DWORD", "value": 7}


def arm_compute_result(status: str) -> str:
    from scripts.devkit.arm_compute import result_line

    return result_line(status, values={}, facts={}, changes=[])


def test_the_script_guards_its_inputs_and_undoes_a_failed_apply():
    """What the stand-in of scripts/devkit/arm_live.py plays is what the script says it does: unknown names
    and types are bad parameters (2), a drifted value writes nothing (12), a failed write is undone."""
    source = script()
    for text in ["if ($script:Names -notcontains $name) { Complete-Run 'error' 2",
                 "if (-not $script:Kinds.ContainsKey($type)) { Complete-Run 'error' 2",
                 "Complete-Run 'changed' 12 ('nothing written: '",
                 "$script:Restored = Undo-Changes",
                 "Complete-Run 'applied' 0",
                 "Complete-Run 'read' 0"]:
        assert text in source, text
    assert source.index("$drift = @(Get-Drift)") < source.index("Set-Value 'SYSTEM' $script:Key")  # compare, then set
    assert RESULT_MARKER in source
