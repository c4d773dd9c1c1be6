"""Boot diagnostics: the symptom evidence Microsoft's article starts from.

"When you view the VM's screenshot with boot diagnostics, it shows 'Your PC ran into a problem' with
stop code SYSTEM_THREAD_EXCEPTION_NOT_HANDLED (0x0000007E)." `capture_symptoms` fetches that screenshot
and the serial console log of the broken VM at the start of a run and keeps them with the dumps:

    <vm key>/<run stamp>/bootdiag/screenshot.bmp
    <vm key>/<run stamp>/bootdiag/serial.log

ARM's `retrieveBootDiagnosticsData` POST answers with two short-lived read-only SAS URIs (managed or
custom boot diagnostics storage alike); the bytes are read from them and uploaded to the evidence
container (If-None-Match: *: an earlier capture under the same name stays, and this one is reported as
not stored). The SAS URIs are secrets: they are never logged nor written to a report.

The serial log also tells whether Windows bugchecked: with EMS on (prepare-dump turns it on), the stop
screen goes to COM1 as EMS machine-information XML (`<INSTANCE CLASSNAME="BLUESCREEN">`, `STOPCODE`),
and plain-text stop lines are recognised too. `serial_bugcheck` reads both; `swap.wait_for_crash`
polls it.

Symptoms are evidence, not a precondition: boot diagnostics turned off, a VM that never booted since,
or a storage hiccup make `capture_symptoms` return status "unavailable" (with the reason and the
command that fixes it), never fail the run.
"""

from __future__ import annotations

import hashlib
import logging
import re
import struct
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from scripts.azure.errors import translate_azure_error
from scripts.base.errors import CrashcartError
from scripts.evidence import blobs as evidence

log = logging.getLogger("crashcart.bootdiag")

SCREENSHOT = "screenshot.bmp"
SERIAL_LOG = "serial.log"
DEFAULT_SAS_MINUTES = 10
MAX_BYTES = 32 * 1024 * 1024  # a screenshot is ~2 MB, a serial log rarely more than a few
TAIL_LINES = 40


@dataclass
class Captured:
    """One boot diagnostics file as stored in evidence."""

    blob: str
    url: str
    size: int
    sha256: str
    content_type: str
    local: str = ""
    width: int | None = None  # screenshot only (from the BMP header)
    height: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v not in (None, "")}


@dataclass
class Symptoms:
    """What boot diagnostics showed; `to_dict()` goes into the report as `symptoms`."""

    status: str  # captured | partial | unavailable
    message: str
    hint: str = ""
    screenshot: Captured | None = None
    serial_log: Captured | None = None
    bugcheck: dict[str, Any] | None = None  # from the serial log: {"code", "name", "parameters", "source"}
    serial_tail: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "status": self.status, "message": self.message, "hint": self.hint,
            "screenshot": self.screenshot.to_dict() if self.screenshot else None,
            "serial_log": self.serial_log.to_dict() if self.serial_log else None,
            "bugcheck": self.bugcheck, "serial_tail": list(self.serial_tail),
        }


# ---- reading the serial log --------------------------------------------------------------------------------
_EMS_BLUESCREEN = re.compile(r'CLASSNAME\s*=\s*"BLUESCREEN"', re.IGNORECASE)
_EMS_PROPERTY = re.compile(
    r'<PROPERTY\s+NAME\s*=\s*"(?P<name>STOPCODE|BUGCHECKP[1-4])"[^>]*>\s*<VALUE>\s*"?(?P<value>0x[0-9A-Fa-f]+)"?\s*</VALUE>',
    re.IGNORECASE)
_TEXT_STOP = re.compile(r"\*\*\*\s*STOP:\s*(?P<code>0x[0-9A-Fa-f]{1,8})(?:\s*\((?P<params>[^)]*)\))?", re.IGNORECASE)
_TEXT_STOP_CODE = re.compile(r"Stop code:\s*(?P<name>[A-Z][A-Z0-9_]{4,})(?:\s*\((?P<code>0x[0-9A-Fa-f]{1,8})\))?")


def serial_bugcheck(text: str) -> dict[str, Any] | None:
    """The last stop the serial log shows (EMS XML or a text stop line), or None."""
    found: dict[str, Any] | None = None
    for block in re.split(r"(?=<\?xml)", text or ""):
        if not _EMS_BLUESCREEN.search(block):
            continue
        props = {m.group("name").upper(): m.group("value") for m in _EMS_PROPERTY.finditer(block)}
        code = props.get("STOPCODE")
        found = {"code": _code(code) if code else None, "source": "ems",
                 "parameters": [props[p] for p in ("BUGCHECKP1", "BUGCHECKP2", "BUGCHECKP3", "BUGCHECKP4") if p in props]}
    for match in _TEXT_STOP.finditer(text or ""):
        params = [p.strip() for p in (match.group("params") or "").split(",") if p.strip()]
        found = {"code": _code(match.group("code")), "source": "text", "parameters": params}
    for match in _TEXT_STOP_CODE.finditer(text or ""):
        found = {"code": _code(match.group("code")) if match.group("code") else None, "source": "text",
                 "parameters": [], "name": match.group("name")}
    if found is not None and found.get("code") and not found.get("name"):
        found["name"] = _bugcheck_name(found["code"])
    return found


def _code(text: str) -> str:
    return f"0x{int(text, 16):08X}"


def _bugcheck_name(code: str) -> str | None:
    try:
        from scripts.dumpfile.bugcheck import bugcheck_name

        return bugcheck_name(int(code, 16))
    except (ImportError, ValueError):
        return None


def bmp_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) of a BMP, or None when the bytes are not one."""
    if len(data) < 26 or data[:2] != b"BM":
        return None
    width, height = struct.unpack_from("<ii", data, 18)
    return width, abs(height)


# ---- fetching ----------------------------------------------------------------------------------------------
def boot_diagnostics_uris(compute: Any, resource_group: str, vm_name: str,
                          sas_minutes: int = DEFAULT_SAS_MINUTES) -> tuple[str | None, str | None]:
    """(screenshot SAS URI, serial log SAS URI) from retrieveBootDiagnosticsData. Raises HttpResponseError."""
    result = compute.virtual_machines.retrieve_boot_diagnostics_data(
        resource_group, vm_name, sas_uri_expiration_time_in_minutes=sas_minutes)
    return result.console_screenshot_blob_uri or None, result.serial_console_log_blob_uri or None


def download(sas_uri: str, max_bytes: int = MAX_BYTES) -> bytes:
    """The bytes behind a read-only SAS URI (at most `max_bytes`: the end of a longer file)."""
    from azure.storage.blob import BlobClient

    client = BlobClient.from_blob_url(sas_uri)
    size = client.get_blob_properties().size or 0
    offset = max(0, size - max_bytes)
    return client.download_blob(offset=offset, length=size - offset if size else None).readall() if size else b""


def read_serial_log(compute: Any, resource_group: str, vm_name: str) -> str:
    """The VM's serial console log now, as text ("" when there is none yet). Raises on Azure errors."""
    _, serial = boot_diagnostics_uris(compute, resource_group, vm_name, sas_minutes=DEFAULT_SAS_MINUTES)
    if not serial:
        return ""
    return download(serial).decode("utf-8", errors="replace")


def _store(container: Any, prefix: str, folder: str, name: str, data: bytes, content_type: str,
           out_dir: Path | None) -> Captured:
    blob = f"{prefix}/{folder}/{name}"
    url = evidence.upload_bytes(container, blob, data, content_type)  # If-None-Match: *: BlobExists if taken
    local = ""
    if out_dir is not None:
        path = out_dir / folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            with path.open("xb") as handle:  # created, never replaced
                handle.write(data)
            local = str(path)
        except FileExistsError:
            log.warning("    %s exists already (an earlier run's): kept; this capture is %s in evidence", path, blob)
    return Captured(blob=blob, url=url, size=len(data), sha256=hashlib.sha256(data).hexdigest(),
                    content_type=content_type, local=local)


def capture_symptoms(compute: Any, container: Any, resource_group: str, vm_name: str, prefix: str, *,
                     out_dir: Path | None = None, folder: str = "bootdiag",
                     sas_minutes: int = DEFAULT_SAS_MINUTES) -> Symptoms:
    """Fetches the VM's boot diagnostics screenshot and serial log into `<prefix>/<folder>/` in the
    evidence container (and `out_dir/<folder>/` locally). Never raises for Azure or storage failures:
    the result says what could not be had and why."""
    from azure.core.exceptions import AzureError

    try:
        screenshot_uri, serial_uri = boot_diagnostics_uris(compute, resource_group, vm_name, sas_minutes)
    except AzureError as err:
        return _unavailable(err, vm_name, resource_group)
    if not screenshot_uri and not serial_uri:
        return Symptoms("unavailable", f"boot diagnostics of {vm_name} hold no screenshot or serial log yet",
                        "boot diagnostics capture them while the VM boots: check that they are enabled "
                        f"(az vm boot-diagnostics enable -g {resource_group} -n {vm_name}) and that the VM has "
                        "started since")
    result = Symptoms("captured", "")
    problems: list[str] = []
    for uri, name, content_type in ((screenshot_uri, SCREENSHOT, "image/bmp"), (serial_uri, SERIAL_LOG, "text/plain")):
        if not uri:
            problems.append(f"no {name} in boot diagnostics")
            continue
        try:
            data = download(uri)
            captured = _store(container, prefix, folder, name, data, content_type, out_dir)
        except AzureError as err:
            problems.append(translate_azure_error(err, name, doing=f"copy {name} from boot diagnostics").message)
            continue
        except CrashcartError as err:
            problems.append(f"{name}: {err.message}")
            continue
        if name == SCREENSHOT:
            size = bmp_size(data)
            if size:
                captured.width, captured.height = size
            else:
                problems.append("the screenshot is not a BMP image")
            result.screenshot = captured
        else:
            text = data.decode("utf-8", errors="replace")
            result.serial_log = captured
            result.bugcheck = serial_bugcheck(text)
            result.serial_tail = [line.rstrip("\r") for line in text.splitlines()[-TAIL_LINES:]]
    if result.screenshot is None and result.serial_log is None:
        result.status = "unavailable"
    elif problems:
        result.status = "partial"
    stop = ""
    if result.bugcheck:
        stop = f"; the serial log shows stop {result.bugcheck.get('code') or '?'}"
        if result.bugcheck.get("name"):
            stop += f" ({result.bugcheck['name']})"
    result.message = ("boot diagnostics of " + vm_name + ": " +
                      (", ".join(c.blob for c in (result.screenshot, result.serial_log) if c) or "nothing stored") +
                      stop + ("; " + "; ".join(problems) if problems else ""))
    if problems:
        result.hint = "re-run to capture them again; the rest of the run does not depend on them"
    log.info("    %s", result.message)
    return result


def _unavailable(err: Exception, vm_name: str, resource_group: str) -> Symptoms:
    said = translate_azure_error(err, f"VM {vm_name}", doing=f"read the boot diagnostics of {vm_name}", hints={
        "auth": "the signed-in identity needs Microsoft.Compute/virtualMachines/retrieveBootDiagnosticsData/action "
                "(Virtual Machine Contributor) on the VM",
        "not_found": f"check that VM {vm_name} exists in {resource_group}",
        "failed": f"enable boot diagnostics (az vm boot-diagnostics enable -g {resource_group} -n {vm_name}); the "
                  "screenshot and serial log are then captured at the next boot",
    })
    log.warning("    %s", said.message)
    return Symptoms("unavailable", said.message, said.hint)
