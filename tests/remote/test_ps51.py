"""The PowerShell scripts under Windows PowerShell 5.1's real semantics (#12 deliver 5).

The Windows rescue VM runs Windows PowerShell 5.1 and nothing here can: so every rendered script is held
to the documented 5.1 cmdlet signatures (../shared/pwsh/cmdlets-ws2022-ps51.json: cmdlet names, parameter
names, aliases and prefixes, parameter sets, positions) and to lint rules for the 5.1 pitfalls, both over
the tree-sitter parse (tests/remote/psparse.py, tests/remote/pslint.py). Every rule is shown to fire on a
bad snippet and to stay quiet on its 5.1 form, and the checks are shown to reach into the real templates.
"""

from __future__ import annotations

import pytest

from scripts import remote
from scripts.nodump import prepare
from tests.remote import pslint, psparse

if not psparse.SIGNATURES.is_file():  # pragma: no cover - the shared folder is beside every checkout
    pytest.skip(f"the 5.1 cmdlet signatures are not at {psparse.SIGNATURES}", allow_module_level=True)

SCRIPTS = {
    "collect": lambda: remote.render("windows"),
    "collect (smallest settings)": lambda: remote.render("windows", remote.UploadSettings(
        block_size=4096, parallel=1, max_attempts=1, auth_wait_seconds=1)),
    "prepare": lambda: prepare.render_script("windows"),
}


def rules_of(source: str) -> set[str]:
    return {f.rule for f in pslint.findings(source)}


# ---- the templates -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", SCRIPTS)
def test_templates_meet_windows_powershell_51(name):
    found = pslint.findings(SCRIPTS[name]())
    assert found == [], "\n".join(map(str, found))


@pytest.mark.parametrize("name", ["collect", "prepare"])
def test_the_checks_reach_the_templates(name):
    """Not vacuous: the templates' cmdlet calls are found and resolved against the 5.1 data, and a 5.1
    slip written into a template is caught there."""
    source = SCRIPTS[name]()
    script = psparse.Script(source)
    sig = psparse.signatures()
    used = {sig.cmdlet(c.name)[0] for c in script.commands if c.name and sig.cmdlet(c.name)}
    assert {"Get-Item", "Test-Path", "Set-Disk", "Get-Partition", "ConvertTo-Json", "Join-Path"} <= used
    assert len([c for c in script.commands if c.params()]) > 20
    for good, bad, rule in [
        ("ConvertTo-Json -InputObject $Value -Depth 12 -Compress", "ConvertTo-Json -InputObject $Value -Depth 12 -Compress -AsArray", "parameter"),
        ("ConvertTo-Json -InputObject $Value -Depth 12 -Compress", "ConvertTo-Json -InputObject $Value -Compress", "convertto-json-depth"),
        ("Set-Disk -Number $number -IsOffline $true", "Set-Disk -Number $number -IsOffline $true -IsReadOnly $true", "parameter-set"),
        ("$ErrorActionPreference = 'Continue'", "$ErrorActionPreference = 'Continue'; $x = $y ?? 1", "ps7-syntax"),
        ("$lines = @(& $FilePath @ArgumentList 2>&1)", "$lines = @(& $FilePath @ArgumentList 2>&1) -band 0xFFFFFFFF", "band-sign"),
    ]:
        assert good in source, good
        assert rule in rules_of(source.replace(good, bad, 1)), rule


def test_native_programs_run_only_through_invoke_native():
    """reg.exe and bcdedit.exe write to stderr when they fail; under 5.1 with ErrorActionPreference Stop
    that ends the script before the exit code is read (and inside Dismount-Hive's retry loop, at the
    first try). The one native call site sets the preference to Continue and returns the exit code."""
    for name in ("collect", "prepare"):
        script = psparse.Script(SCRIPTS[name]())
        native = [c for c in script.commands if psparse.is_native(script, c, psparse.signatures())]
        assert len(native) == 1
        function = script.enclosing_function(native[0].node)
        assert script.text(function).startswith("function Invoke-Native(")
        assert "& reg.exe" not in script.source and "& bcdedit" not in script.source


def test_reg_unload_is_checked_and_retried():
    """A hive left loaded keeps its file, and the disk it is on, in use: Dismount-Hive runs reg unload in a
    loop until its exit code is 0, and fails loudly (collect: a note; prepare: an error) when it never is."""
    for name in ("collect", "prepare"):
        script = psparse.Script(SCRIPTS[name]())
        dismount = next(f for f in script.nodes("function_statement") if script.text(f).startswith("function Dismount-Hive"))
        loops = [n for n in script.walk(dismount) if n.type == "for_statement"]
        assert len(loops) == 1
        loop = script.text(loops[0])
        assert "Invoke-Native 'reg.exe' @('unload'" in loop and "if ($run.ExitCode -eq 0) { return }" in loop
        assert "throw ('reg.exe unload of" in script.text(dismount)
    collect = SCRIPTS["collect"]()
    assert "try { Dismount-Hive $mountName } catch { Add-Note (" in collect


def test_json_is_written_one_way():
    """Every JSON text (result line, progress, manifests, record comparison) goes through ConvertTo-JsonText:
    -Depth given (5.1's default of 2 silently flattens), and ASCII only."""
    for name in ("collect", "prepare"):
        script = psparse.Script(SCRIPTS[name]())
        calls = [c for c in script.commands if c.name == "ConvertTo-Json"]
        assert len(calls) == 1
        assert script.text(script.enclosing_function(calls[0].node)).startswith("function ConvertTo-JsonText(")
    assert "function Get-UnsignedValue(" in SCRIPTS["prepare"]() and "-band 0xFFFFFFFF" not in SCRIPTS["prepare"]()


# ---- every rule fires on a bad snippet and stays quiet on its 5.1 form ---------------------------------------------
STOP = "$ErrorActionPreference = 'Stop'\n"
RULE_CASES = [
    ("band-sign", "$v = [uint32]([int64]$x -band 0xFFFFFFFF)",
     "$v = [BitConverter]::ToUInt32([BitConverter]::GetBytes([int]$x), 0); $m = $x -band 0xFFFF; $y = 0x80000000"),
    ("band-sign", "$f = $flags -bor 0x80000000", "$f = $flags -bor 2147483648"),  # decimal: an Int64
    ("native-stderr", STOP + "function Edit-Bcd { $o = & bcdedit.exe /store $s 2>&1; if ($LASTEXITCODE -ne 0) { throw 'x' } }",
     STOP + "function Edit-Bcd { $ErrorActionPreference = 'Continue'; $o = & bcdedit.exe /store $s 2>&1; if ($LASTEXITCODE -ne 0) { throw 'x' } }"),
    ("native-stderr", STOP + "reg.exe load HKLM\\x $p", "reg.exe load HKLM\\x $p\nif ($LASTEXITCODE) { }"),
    ("native-stderr", STOP + "function Dismount-X { $ErrorActionPreference = 'Continue'; & reg.exe unload $n 2>&1 | Out-Null }",
     STOP + "function Dismount-X { $ErrorActionPreference = 'Continue'; & reg.exe unload $n 2>&1 | Out-Null; return $LASTEXITCODE }"),
    ("native-stderr", STOP + "function Invoke-It([string]$P) { $o = & $P 2>&1; $LASTEXITCODE }",
     STOP + "function Invoke-It([string]$P) { $ErrorActionPreference = 'SilentlyContinue'; $o = & $P 2>&1; $LASTEXITCODE }"),
    ("ps7-syntax", "$a = $b ?? 'default'", "$a = $b; if ($null -eq $a) { $a = 'default' }"),
    ("ps7-syntax", "$a ??= 1", "if ($null -eq $a) { $a = 1 }"),
    ("ps7-syntax", "$n = ${obj}?.Name", "$n = $obj.Name"),
    ("ps7-syntax", "$a = $b ? 1 : 2", "$a = if ($b) { 1 } else { 2 }"),
    ("ps7-syntax", "Get-Item -LiteralPath x && Write-Output y", "Get-Item -LiteralPath x; if ($?) { Write-Output y }"),
    ("ps7-syntax", "Get-Item -LiteralPath x || Write-Output y", "Get-Item -LiteralPath x; if (-not $?) { Write-Output y }"),
    ("foreach-parallel", "1..3 | ForEach-Object -Parallel { $_ }", "1..3 | ForEach-Object -Process { $_ }"),
    ("foreach-parallel", "1..3 | % -Parallel { $_ } -ThrottleLimit 2", "1..3 | % { $_ }"),
    ("convertfrom-json-ps7", "$h = ConvertFrom-Json -InputObject $t -AsHashtable", "$h = ConvertFrom-Json -InputObject $t"),
    ("convertfrom-json-ps7", "$h = $t | ConvertFrom-Json -Depth 64", "$h = $t | ConvertFrom-Json"),
    ("join-path-children", "$p = Join-Path 'C:\\' 'Windows' 'System32'", "$p = Join-Path (Join-Path 'C:\\' 'Windows') 'System32'"),
    ("join-path-children", "$p = Join-Path -Path 'C:\\' -ChildPath 'Windows' -AdditionalChildPath 'System32'",
     "$p = Join-Path -Path 'C:\\' -ChildPath 'Windows' -Resolve"),
    ("asbytestream", "$b = Get-Content -LiteralPath $p -AsByteStream -Raw", "$b = Get-Content -LiteralPath $p -Encoding Byte -Raw"),
    ("convertto-json-depth", "$j = ConvertTo-Json -InputObject $o -Compress", "$j = ConvertTo-Json -InputObject $o -Depth 8 -Compress"),
    ("ps6-variables", "if ($IsWindows) { Write-Output 'x' }", "if ($env:OS -eq 'Windows_NT') { Write-Output 'x' }"),
    ("unicode-escape", 'Write-Output "smile `u{1F600}"', "Write-Output ('smile ' + [char]0x263A)"),
    ("encoding-name", "Set-Content -LiteralPath $p -Value $v -Encoding utf8NoBOM", "Set-Content -LiteralPath $p -Value $v -Encoding UTF8"),
    ("web-basic-parsing", "Invoke-WebRequest -Uri $u -OutFile $f", "Invoke-WebRequest -Uri $u -OutFile $f -UseBasicParsing"),
]


@pytest.mark.parametrize("rule, bad, good", RULE_CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(RULE_CASES)])
def test_rule_fires_on_the_pitfall_and_not_on_its_51_form(rule, bad, good):
    assert rule in rules_of(bad), pslint.findings(bad)
    assert rule not in rules_of(good), pslint.findings(good)


def test_every_rule_has_a_case():
    assert set(pslint.RULES) == {rule for rule, _, _ in RULE_CASES}


# ---- the signature checks ------------------------------------------------------------------------------------------
SIGNATURE_CASES = [
    ("cmdlet", "Get-Frobnicator -Name x", "Get-Item -LiteralPath x"),
    ("cmdlet", "Test-Json -Json $t", "$ok = $null -ne (ConvertFrom-Json -InputObject $t)"),  # PowerShell 6.1+
    ("parameter", "Get-Item -LiteralPath x -Bogus", "Get-Item -LiteralPath x -Force"),
    ("parameter", "Get-ChildItem -LiteralPath x -F", "Get-ChildItem -LiteralPath x -Forc"),  # -F, -Fo: ambiguous
    ("parameter", "Get-ChildItem -LiteralPath x -Fil '*.dmp'", "Get-ChildItem -LiteralPath x -Filt '*.dmp'"),
    ("parameter", "Get-Item -LiteralPath x -LiteralPath y", "Get-Item -LiteralPath x -ea 0"),
    ("parameter", "Remove-Item -LiteralPath x -Recursive", "Remove-Item -LiteralPath x -Recurse -wi"),
    ("parameter", "Start-Sleep -Milliseconds 5 -Verbos:$true -Nope", "Start-Sleep -Milliseconds 5 -Verbos:$true"),
    ("parameter-set", "Get-Item -Path x -LiteralPath y", "Get-Item -PSPath y -Force"),
    ("parameter-set", "Set-Disk -Number 1 -IsOffline $false -IsReadOnly $true", "Set-Disk -Number 1 -IsReadOnly $true"),
    ("parameter-set", "Start-Sleep -Seconds 1 -Milliseconds 5", "Start-Sleep -Milliseconds 5"),
    ("positional", "Start-Sleep 1 2", "Start-Sleep 1"),
    ("positional", "New-Item 'a' 'b' -ItemType Directory", "New-Item 'a' -ItemType Directory"),
]


@pytest.mark.parametrize("rule, bad, good", SIGNATURE_CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(SIGNATURE_CASES)])
def test_signature_check_catches_what_51_refuses(rule, bad, good):
    assert rule in rules_of(bad), pslint.findings(bad)
    assert pslint.findings(good) == [], pslint.findings(good)


def test_aliases_prefixes_and_positions_resolve_as_powershell_binds_them():
    quiet = [
        "gci -LiteralPath x -af -s",  # cmdlet alias, parameter aliases (-af: -File, -s: -Recurse)
        "1..3 | % { $_ } | ? { $_ -gt 1 }",
        "1..3 | ForEach-Object { 'begin' } { $_ } { 'end' }",  # -RemainingScripts takes the rest
        "Write-Output a b c",  # -InputObject takes the remaining arguments
        "Write-Host a b c -NoNewline",
        "$sb = New-Object System.Text.StringBuilder(16)",
        "Get-ChildItem -LiteralPath x -Force $p",  # a switch takes no value: $p goes to position 1 (-Filter)
        "Copy-Item -LiteralPath a -Destination b -Force:$true -ErrorAction:Stop",
        "$n = 0L; $m = 10",
        "function Get-Thing([string]$Name) { $Name }\nGet-Thing -Name x -Whatever",  # the script's own function
    ]
    for source in quiet:
        assert pslint.findings(source) == [], (source, pslint.findings(source))
