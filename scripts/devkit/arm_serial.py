"""The serial console in the ARM double: what `az serial-console send nmi` talks to.

The Azure CLI extension (azure-cli-extensions, src/serial-console, custom.py) reads the VM, then asks ARM
for a connection to its serial port and sends the NMI as an admin command to the host it was given:

- POST `{vm}/providers/Microsoft.SerialConsole/serialPorts/{port}/connect?api-version=2018-05-01` (ARM:
  action `Microsoft.SerialConsole/serialPorts/connect/action` on the serial port) answers
  `{"connectionString": "wss://<host>/.../client"}`;
- POST `https://<host>/.../adminCommand/nmi` (the connection string with `/client` replaced, on the
  serial console service, not ARM) sends the NMI.

Here the host is the double itself under `/_serialconsole/{token}/` (no ARM, no RBAC: the token is the
authorization, as the service's is), and the NMI makes the simulated guest bugcheck.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Mapping
from typing import Any

from scripts.devkit.armdouble import ArmDouble, Request, Response, error_response

VM_PATH = r"(?P<vm_id>/subscriptions/[^/]+/resourceGroups/[^/]+/providers/Microsoft\.Compute/virtualMachines/(?P<vm>[^/]+))"


class SerialConsole:
    """Serial ports of the simulated VMs (`sims`: lower-cased VM ID -> SimVm)."""

    def __init__(self, double: ArmDouble, sims: Mapping[str, Any]):
        self.double, self.sims = double, sims
        self.connections: dict[str, str] = {}  # token -> VM ID
        double.route("POST", VM_PATH + r"/providers/Microsoft\.SerialConsole/serialPorts/(?P<port>[^/]+)/connect",
                     self.connect)
        double.route("POST", r"/_serialconsole/(?P<token>[0-9a-f]+)/adminCommand/(?P<command>[^/]+)", self.admin)

    def connect(self, d: ArmDouble, req: Request, m: re.Match) -> Response:
        vm_id = m.group("vm_id")
        if d.get(vm_id) is None:
            return d.not_found(vm_id)
        if m.group("port") != "0":
            return error_response(404, "ResourceNotFound", f"Serial port {m.group('port')} does not exist.")
        token = uuid.uuid4().hex
        self.connections[token] = vm_id
        host = d.url.split("://", 1)[1]
        return Response(200, {"connectionString": f"ws://{host}/_serialconsole/{token}/client"})

    def admin(self, d: ArmDouble, req: Request, m: re.Match) -> Response:
        vm_id = self.connections.get(m.group("token"))
        if vm_id is None:
            return error_response(401, "Unauthorized", "The serial console connection is not valid.")
        sim = self.sims.get(vm_id.lower())
        if m.group("command") != "nmi" or sim is None:
            return error_response(400, "BadRequest", f"{m.group('command')} is not simulated for {vm_id}")
        sim.nmis += 1
        sim.bugcheck(d, "nmi")  # 0x80 on real Windows; the simulator shows the same stop screen
        return Response(200, {"status": "sent"})
