"""The Windows-path rule (scripts/remote/winpaths.py) and its three readers: one table of cases, answered by
the Python function, by the bash functions cut out of the rendered scripts and run with bash, and — no
PowerShell here — by the PowerShell scripts' rendered data table, which must be the Python one, beside
functions that parse clean with tree-sitter-powershell.
"""

from __future__ import annotations

import re
import subprocess

import pytest
import tree_sitter
import tree_sitter_powershell

from scripts import remote
from scripts.remote import winpaths

# path of the broken VM -> (path on its OS volume, the same when it names a file); None: refused
CASES: list[tuple[str, str | None, str | None]] = [
    (r"%SystemRoot%\MEMORY.DMP", "Windows/MEMORY.DMP", "Windows/MEMORY.DMP"),
    (r"%systemroot%\minidump", "Windows/minidump", "Windows/minidump"),
    (r"%SYSTEMROOT%\Crash Dumps\LATEST.DMP", "Windows/Crash Dumps/LATEST.DMP", "Windows/Crash Dumps/LATEST.DMP"),
    (r"%WinDir%\Dumps\k.dmp", "Windows/Dumps/k.dmp", "Windows/Dumps/k.dmp"),
    (r"%SystemDrive%\pagefile.sys", "pagefile.sys", "pagefile.sys"),
    (r"\SystemRoot\MEMORY.DMP", "Windows/MEMORY.DMP", "Windows/MEMORY.DMP"),
    (r"C:\CrashDumps\web-01.dmp", "CrashDumps/web-01.dmp", "CrashDumps/web-01.dmp"),
    (r"\??\C:\pagefile.sys", "pagefile.sys", "pagefile.sys"),  # as PagingFiles writes it
    (r"\??\C:\dumps\x.dmp", "dumps/x.dmp", "dumps/x.dmp"),
    (r"\??\%SystemRoot%\x.dmp", "Windows/x.dmp", "Windows/x.dmp"),
    ("c:/dumps/x.dmp", "dumps/x.dmp", "dumps/x.dmp"),  # Win32 takes '/' for '\'
    ("C:\\a\\.\\b\\\\c.dmp", "a/b/c.dmp", "a/b/c.dmp"),  # '.' and empty components are nothing
    (r"%SystemRoot%\$(touch x)`id`;'q'\MEMORY.DMP", "Windows/$(touch x)`id`;'q'/MEMORY.DMP",
     "Windows/$(touch x)`id`;'q'/MEMORY.DMP"),  # data, never code
    # a variable is text: %SystemRoot%MEMORY.DMP is C:\WindowsMEMORY.DMP
    ("%SystemRoot%MEMORY.DMP", "WindowsMEMORY.DMP", "WindowsMEMORY.DMP"),
    # folders, not files
    ("%SystemRoot%", "Windows", None),
    ("%SystemRoot%\\", "Windows", None),
    ("\\SystemRoot", "Windows", None),
    ("C:\\", "", None),
    ("C:", "", None),
    ("C:\\dumps\\.", "dumps", None),
    # not on the broken OS volume
    ("C:MEMORY.DMP", None, None),  # relative to C:'s current directory, not C:\
    ("%SystemDrive%MEMORY.DMP", None, None),  # the same: %SystemDrive% is "C:"
    (r"\SystemRootX\MEMORY.DMP", None, None),  # another NT object than \SystemRoot
    (r"D:\MEMORY.DMP", None, None),  # the temporary disk
    (r"\??\D:\pagefile.sys", None, None),
    (r"\\server\share\x.dmp", None, None),
    (r"\\?\C:\x.dmp", None, None),  # a Win32 form Windows does not write in these values
    (r"%TEMP%\x.dmp", None, None),
    ("MEMORY.DMP", None, None),
    (" C:\\x.dmp", None, None),
    ("", None, None),
    ("%\u017fystemRoot%\\x.dmp", None, None),  # 'ſ' folds to 's' in Unicode, not in this rule: ASCII only
    # '..' could climb out of the volume, or out of the folder the prefix names
    (r"%SystemRoot%\..\..\x.dmp", None, None),
    (r"C:\a\..\b.dmp", None, None),
]

# a path the kit hands to prepare-dump to write into the registry -> accepted
PARAMETER_CASES: list[tuple[str, bool]] = [
    (r"%SystemRoot%\MEMORY.DMP", True),
    (r"C:\DedicatedDump.sys", True),
    ("C:/dumps/x.dmp", True),
    (r"%SystemRoot%\$(calc)`x`;'q'\MEMORY.DMP", True),
    ("C:\\" + "a" * 237, True),  # 240 characters
    ("C:\\" + "a" * 238, False),
    ("x", False),
    ("C:\\", False),
    (r"D:\MEMORY.DMP", False),
    (r"%SystemRoot%\..\x.dmp", False),
    ('%SystemRoot%\\a"b.dmp', False),
    ("%SystemRoot%\\a\nb.dmp", False),
    ("%SystemRoot%\\a\tb.dmp", False),
    (r"%SystemRoot%\a|b.dmp", False),
    (r"\\server\share\x.dmp", False),
    (r"\??\C:\x.dmp", False),  # '?' is not a character of a file name
    ("%SystemRoot%\\Minidump\\", False),
]


@pytest.mark.parametrize("path, volume, file", CASES)
def test_python(path, volume, file):
    assert winpaths.volume_path(path) == volume
    assert winpaths.file_path(path) == file


@pytest.mark.parametrize("value, accepted", PARAMETER_CASES)
def test_python_parameter(value, accepted):
    assert (winpaths.parameter_path(value) is not None) is accepted


# ---- bash ------------------------------------------------------------------------------------------------------
def bash_rule(script: str) -> str:
    """The rule's block of a rendered bash script: its table and functions, from the section header to the
    end of win_file_rel."""
    start = script.index("# ---- Windows paths of the broken VM")
    end = script.index("\n}\n", script.index("win_file_rel() {")) + 3
    return script[start:end]


def bash_scripts() -> dict[str, str]:
    return {"collect.sh": remote.render("linux"), "prepare.sh": remote.render_template("prepare.sh.j2")}


def run_bash(program: str, inputs: list[str]) -> list[str]:
    """Runs `program` with the inputs NUL-separated on stdin; its NUL-separated answers."""
    proc = subprocess.run(["bash", "-c", program], input="".join(f"{i}\0" for i in inputs).encode(),
                          capture_output=True, timeout=60, env={"PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr.decode()
    return proc.stdout.decode().split("\0")[:-1]


@pytest.mark.parametrize("name", ["collect.sh", "prepare.sh"])
def test_bash(name):
    rule = bash_rule(bash_scripts()[name])
    program = "set -uo pipefail\nexport LC_ALL=C\n" + rule + """
while IFS= read -r -d '' p; do
  if r=$(win_to_rel "$p"); then printf 'V%s\\0' "$r"; else printf 'N\\0'; fi
  if r=$(win_file_rel "$p"); then printf 'V%s\\0' "$r"; else printf 'N\\0'; fi
done
"""
    answers = run_bash(program, [path for path, _, _ in CASES])
    got = [(a[1:] if a.startswith("V") else None) for a in answers]
    expected = [x for _, volume, file in CASES for x in (volume, file)]
    assert list(zip([p for p, _, _ in CASES for _ in (0, 1)], got)) == \
        list(zip([p for p, _, _ in CASES for _ in (0, 1)], expected))


def test_bash_parameter():
    script = bash_scripts()["prepare.sh"]
    check = re.search(r"^check_path_param\(\) \{.*?^\}\n", script, re.S | re.M)
    assert check is not None
    program = "set -uo pipefail\nexport LC_ALL=C\n" + bash_rule(script) + "\n" + check.group(0) + """
finish() { exit "$2"; }
while IFS= read -r -d '' p; do
  if (check_path_param DumpFile "$p"); then printf 'yes\\0'; else printf 'no\\0'; fi
done
"""
    answers = run_bash(program, [value for value, _ in PARAMETER_CASES])
    assert list(zip([v for v, _ in PARAMETER_CASES], answers)) == \
        [(v, "yes" if accepted else "no") for v, accepted in PARAMETER_CASES]


# ---- PowerShell --------------------------------------------------------------------------------------------------
def ps_scripts() -> dict[str, str]:
    return {"collect.ps1": remote.render("windows"), "prepare.ps1": remote.render_template("prepare.ps1.j2")}


PS_STRING = r"'((?:[^']|'')*)'"


def ps_table(script: str) -> list[tuple[str, str, bool]]:
    """The rows of $script:WinPrefixes as rendered: (prefix, folder, whole component)."""
    block = re.search(r"^\$script:WinPrefixes = @\(\n(.*?)^\)$", script, re.S | re.M)
    assert block is not None
    rows = []
    for line in block.group(1).splitlines():
        row = re.fullmatch(rf"\s*@\({PS_STRING}, {PS_STRING}, \$(true|false)\),?", line)
        assert row is not None, line
        rows.append((row.group(1).replace("''", "'"), row.group(2).replace("''", "'"), row.group(3) == "true"))
    return rows


def ps_errors(source: str) -> list[str]:
    tree = tree_sitter.Parser(tree_sitter.Language(tree_sitter_powershell.language())).parse(source.encode("utf-8"))
    problems, stack = [], [tree.root_node]
    while stack:
        node = stack.pop()
        if node.type == "ERROR" or node.is_missing:
            problems.append(f"{node.type} at line {node.start_point[0] + 1}")
        stack.extend(node.children)
    return problems


@pytest.mark.parametrize("name", ["collect.ps1", "prepare.ps1"])
def test_powershell_carries_the_python_table(name):
    script = ps_scripts()[name]
    assert ps_table(script) == [(row.prefix, row.folder, row.whole_component) for row in winpaths.PREFIXES]
    assert f"$script:WinNtDosDevices = '{winpaths.NT_DOS_DEVICES}'" in script
    start = script.index("# ---- Windows paths of the broken VM")
    end = script.index("\n}\n", script.index("function ConvertTo-VolumeFile(")) + 3
    rule = script[start:end]
    assert ps_errors(rule) == []
    for function in ("Split-WindowsPath", "ConvertTo-VolumeRelative", "ConvertTo-VolumeFile"):
        assert f"function {function}([string]$WindowsPath)" in rule
    assert ps_errors(rule.replace("function ConvertTo-VolumeFile(", "function ConvertTo-VolumeFile((", 1))  # it can fail


def test_powershell_parameter_rule_is_the_python_one():
    script = ps_scripts()["prepare.ps1"]
    low, high = winpaths.PARAMETER_LENGTH
    assert f"$Value.Length -lt {low} -or $Value.Length -gt {high}" in script
    assert f"$Value.IndexOfAny([char[]]'{winpaths.PARAMETER_FORBIDDEN}')" in script
    assert "ConvertTo-VolumeFile $Value" in script


def test_the_defaults_are_rendered_from_python():
    collect_sh, collect_ps = remote.render("linux"), remote.render("windows")
    for default in (winpaths.DEFAULT_DUMP_FILE, winpaths.DEFAULT_MINIDUMP_DIR, winpaths.PAGEFILE):
        assert f"'{default}'" in collect_sh and f"'{default}'" in collect_ps
    for script in (remote.render_template("prepare.sh.j2"), remote.render_template("prepare.ps1.j2")):
        assert f"'{winpaths.DEFAULT_DUMP_FILE}'" in script and f"'{winpaths.DEDICATED_DUMP_FILE}'" in script


def test_literals_stay_data():
    assert remote.sh_literal("it's") == "'it'\\''s'"
    assert remote.ps_literal("it's \u2019") == "'it''s \u2019\u2019'"
