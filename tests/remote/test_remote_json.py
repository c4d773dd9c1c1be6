"""The bash scripts write JSON with a JSON tool, never by splicing (#13 deliver 7, defect 8).

collect.sh used to print CrashDumpEnabled into its result line as it found it: a registry value of an
odd type (text, binary, a huge number, quotes, newlines) made the line invalid JSON, and the kit then
concluded from a lost result instead of the script's own "no_dump". Now every JSON text is written by
python3's json module (always on Ubuntu; jq is not, and nothing is installed for it), and CrashDumpEnabled
is a number when the registry holds one (REG_DWORD / REG_QWORD, unsigned) and null otherwise, with a
note: exactly what snapshot-export's reader (dissect.regf, scripts/windisk/hive.py) reports.
"""

from __future__ import annotations

import io
import json
import re
import subprocess

import pytest

from scripts import remote
from scripts.devkit import diskimage as windisk
from scripts.devkit import hivebuilder
from scripts.devkit.hivebuilder import REG_BINARY, REG_DWORD, REG_EXPAND_SZ, REG_MULTI_SZ, REG_QWORD, REG_SZ
from tests.support.rescue import (  # noqa: F401 - fixtures
    azurite_https, container, imds, linux_script, loop_devices_of, run_bash, script_env, tls,
)

PREFIX = "web-01/20250517T031245Z"

ODD = {
    "text with quotes and newlines": (REG_SZ, 'he said "7"\n}, "status": "collected"\\ x'),
    "a huge number as text": (REG_SZ, "9" * 40),
    "REG_EXPAND_SZ": (REG_EXPAND_SZ, "%CrashDumpEnabled%"),
    "binary with control bytes": (REG_BINARY, b'\x01\x02"\n\x00{'),
    "multi-string": (REG_MULTI_SZ, ["1", '2"']),
    "DWORD with the top bit set": (REG_DWORD, 0xFFFFFFFF),
    "QWORD maximum": (REG_QWORD, 2**64 - 1),
    "DWORD 0": (REG_DWORD, 0),
}


def expected(type_: int, value: object) -> int | None:
    """What snapshot-export reports for the same hive: dissect.regf's value when it is a number."""
    from dissect.regf import RegistryHive

    hive = hivebuilder.system_hive(current=1, crash_control={"CrashDumpEnabled": (type_, value)})
    read = RegistryHive(io.BytesIO(hive)).open(r"ControlSet001\Control\CrashControl").value("CrashDumpEnabled").value
    return read if isinstance(read, int) else None


def result_lines(proc) -> list[str]:
    return [line for line in proc.stdout.splitlines() if line.startswith(remote.RESULT_MARKER + " ")]


@pytest.mark.slow
@pytest.mark.root
@pytest.mark.parametrize("case", ODD)
def test_odd_crash_dump_enabled_gives_valid_json_and_the_right_status(case, linux_script, container, azurite_https,
                                                                       imds, tls, tmp_path):
    reason = windisk.can_build()
    if reason:
        pytest.skip(reason)
    type_, value = ODD[case]
    hive = hivebuilder.system_hive(current=1, crash_control={"CrashDumpEnabled": (type_, value)},
                                   paging_files=[r"C:\pagefile.sys 0 0"])
    files = {"Windows/System32/config/SYSTEM": hive, "Windows/System32/ntoskrnl.exe": b"MZ" + bytes(4000)}
    image = windisk.build_disk(tmp_path / "odd.img", windisk.windows_gpt_layout(files, 24))

    proc = run_bash(linux_script, script_env(azurite_https, container, imds, tls, image, PREFIX))
    lines = result_lines(proc)
    assert len(lines) == 1, proc.stdout
    result = json.loads(lines[0][len(remote.RESULT_MARKER) + 1:])  # valid JSON, whatever the hive holds
    assert (proc.returncode, result["status"]) == (10, "no_dump"), proc.stderr
    assert remote.parse_marked(proc.stdout, remote.RESULT_MARKER) == result  # what the kit reads
    assert remote.REMOTE_EXIT[proc.returncode] == result["status"]
    assert set(result) >= {"message", "volume", "crash_control", "files", "notes", "prefix"}

    enabled, same_as_snapshot_export = result["crash_control"]["CrashDumpEnabled"], expected(type_, value)
    assert enabled == same_as_snapshot_export and (enabled is None) == (same_as_snapshot_export is None)
    assert not isinstance(enabled, (bool, str, float))
    if enabled is None:
        assert any(n.startswith("CrashDumpEnabled on the broken VM is ") and "not a number" in n for n in result["notes"])
    if enabled == 0:
        assert any("CrashDumpEnabled is 0" in n for n in result["notes"])
    assert result["crash_control"]["control_set"] == "ControlSet001"
    assert loop_devices_of(image) == ""


# ---- the JSON tool itself ------------------------------------------------------------------------------------
def json_tool(*args: str) -> subprocess.CompletedProcess:
    """json_obj / json_arr exactly as the rendered scripts define them, run with bash."""
    script = remote.render("linux")
    start = script.index("readonly JSON_PY=")
    end = script.index("\n", script.index("json_arr() {"))
    return subprocess.run(["bash", "-c", script[start:end] + '\n"$@"', "json", *args], capture_output=True, text=True,
                          env={"PATH": "/usr/local/bin:/usr/bin:/bin", "LC_ALL": "C"})


def test_values_reach_the_json_as_data():
    hostile = 'a"b\\c\n\t\x01}], "status": "collected", "x": ["'
    proc = json_tool("json_obj", "s:text", hostile, "n:big", "0xFFFFFFFFFFFFFFFF", "N:none", "", "b:yes", "true",
                     "as:notes", "2", hostile, "", "j:nested", '{"k": [1, null]}', "s:source.path", "C:\\x", "n:source.size", "-3")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == {"text": hostile, "big": 2**64 - 1, "none": None, "yes": True,
                                       "notes": [hostile, ""], "nested": {"k": [1, None]},
                                       "source": {"path": "C:\\x", "size": -3}}
    assert proc.stdout.isascii() and proc.stdout.count("\n") == 1  # one line, whatever the values hold
    assert json.loads(json_tool("json_arr", "s", "x", "\u00e9\u4e2d").stdout) == ["x", "\u00e9\u4e2d"]


@pytest.mark.parametrize("args", [
    ("n:size", "12; rm -rf /"), ("n:size", "1e3"), ("b:ok", "yes"), ("j:header", '{"a": 1'), ("j:header", ""),
    ("as:notes", "3", "a", "b"), ("s:name",), ("name", "value"),
])
def test_anything_that_is_not_json_is_refused(args):
    proc = json_tool("json_obj", *args)
    assert proc.returncode == 3 and proc.stdout == "" and proc.stderr.startswith("json: ")


SPLICE = re.compile(r"""printf [^\n]*'[^'\n]*("[\w-]+":|\{")""")  # printf '{"name":%s...' or '..."name":%s'


def test_no_json_is_spliced_by_hand():
    """No printf builds JSON in the bash scripts any more (the check finds the old ones: see the second part)."""
    from scripts.nodump import prepare

    for script in (remote.render("linux"), prepare.render_script("linux")):
        assert [line for line in script.splitlines() if SPLICE.search(line)] == []
        assert "json_str" not in script and "join_json" not in script
    old = [  # two lines of the scripts before this change
        """  printf '%s {"status":%s,"message":%s,%s}\\n' "$RESULT_MARKER" "$(json_str "$1")" "$(result_fields)\"""",
        """  printf '"prefix":%s,"volume":%s' "$(json_str "$PREFIX")" "$VOLUME_JSON\"""",
    ]
    assert all(SPLICE.search(line) for line in old)


@pytest.mark.parametrize("env, code", [
    ({"BlobEndpoint": ""}, 2),  # a bad parameter: refused before anything runs
    ({"BlobEndpoint": "https://127.0.0.1:1/devstoreaccount1"}, 1),  # python3 looked for, and missing: nothing installed
])
def test_without_python3_the_result_line_is_still_json(tmp_path, env, code):
    """The fallback when the JSON tool itself cannot run: a fixed line naming the status, the exit code kept."""
    script = tmp_path / "collect.sh"
    script.write_text(remote.render("linux").replace("python3", "python3-not-installed"))
    proc = subprocess.run(["bash", str(script)], capture_output=True, text=True, timeout=60,
                          env={"PATH": "/usr/bin:/bin", "Prefix": "p", "Container": "c", **env})
    found = remote.parse_marked(proc.stdout, remote.RESULT_MARKER)
    assert proc.returncode == code and found is not None, (proc.stdout, proc.stderr)
    assert found["status"] == "error" and "python3" in found["message"] and found["notes"] == []
    assert "apt-get" not in proc.stderr and "installing" not in proc.stderr
