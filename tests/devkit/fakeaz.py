"""A fake `az` for tests: `az serial-console send nmi` as the serial-console extension of the Azure CLI runs it
(azure-cli-extensions, src/serial-console, custom.py), against the ARM double: read the VM, ask ARM for the
serial port's connection (`Microsoft.SerialConsole/serialPorts/connect/action`), post the admin command `nmi`
to the host the connection string names. Like the extension, it hides why a connection was refused ("An
unexpected error occurred. Could not establish connection to VM or VMSS.")."""

from __future__ import annotations

import os
import stat
import sys
from pathlib import Path


def install_fake_az(folder: Path, monkeypatch) -> Path:
    """Puts `az` first on PATH (in `folder`/bin); returns the file recording each call's arguments."""
    bin_dir = folder / "bin"
    bin_dir.mkdir(exist_ok=True)
    record = folder / "az-args"
    script = bin_dir / "az"
    script.write_text(f"""#!{sys.executable}
import json, os, sys, urllib.error, urllib.request
open({str(record)!r}, "a").write(" ".join(sys.argv[1:]) + "\\n")
args = sys.argv[1:]
value = lambda flag: args[args.index(flag) + 1]
arm = os.environ["CRASHCART_ARM_ENDPOINT"]
vm = (f"/subscriptions/{{value('--subscription')}}/resourceGroups/{{value('--resource-group')}}"
      f"/providers/Microsoft.Compute/virtualMachines/{{value('--name')}}")
def call(url, method="GET"):
    with urllib.request.urlopen(urllib.request.Request(url, method=method, data=b"" if method == "POST" else None)) as r:
        return json.load(r)
try:
    call(f"{{arm}}{{vm}}?$expand=instanceView&api-version=2024-11-01")
except urllib.error.HTTPError as err:
    error = json.load(err)["error"]
    sys.exit(f"ERROR: ({{error['code']}}) {{error['message']}}")
try:
    connection = call(f"{{arm}}{{vm}}/providers/Microsoft.SerialConsole/serialPorts/0/connect?api-version=2018-05-01",
                      "POST")["connectionString"]
except Exception:
    sys.exit("ERROR: An unexpected error occurred. Could not establish connection to VM or VMSS.")
url = connection.replace("wss", "https").replace("ws", "http").replace("/client", "/adminCommand/nmi")
try:
    call(url, "POST")
    print("NMI sent successfully")
except urllib.error.HTTPError:
    print("Failed to send NMI")
""")
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    return record
