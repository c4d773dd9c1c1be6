"""Scripts that run on the rescue VM, rendered from the Jinja2 templates beside this file.

The rule that keeps them safe: a template holds code only. Everything that comes from the outside
world — endpoint, container, blob prefix, disk IDs, LUN — reaches the script as a Run Command
*parameter* (`RunCommandInputParameter`), which the Run Command handler hands to the script as data: a
named PowerShell parameter on Windows, an environment variable on Linux. The template context is kit
constants and whole numbers only (checked here), so no value can turn into code however it is spelled.

What the scripts share is written once, in partials named `_*.j2` that they `{% include %}`: per language
the output, cleanup and disk search (`_common`), the Windows-path rule (`_winpaths`, whose table is
rendered from scripts/remote/winpaths.py, so Python, bash and PowerShell map a path the same way), and
one partial per large part of one script (`_upload`, `_hive_edit`, `_bcd`).

Rules every script keeps (tests/remote holds one test per rule):
- JSON is written by a JSON tool, never by splicing a value into JSON text: PowerShell's ConvertTo-Json
  (through ConvertTo-JsonText: -Depth given, ASCII only), bash's json_obj/json_arr over python3's json
  module (on every Ubuntu image; jq is not, and nothing is installed for it);
- nothing is overwritten: every blob a script creates (a dump's Put Block List, a manifest's Put Blob)
  carries If-None-Match: *, and a 409/412 is the status upload_failed naming the blob, never a retry
  that replaces it (the Run Command's own output/error append blobs are the service's);
- Windows PowerShell 5.1 as it is: native programs run through Invoke-Native (their stderr is text, their
  exit code judged), registry numbers are read unsigned, and tests/remote/test_ps51.py checks every cmdlet
  and parameter against the documented 5.1 signatures and the 5.1 pitfalls as lint rules.

The remote contract, the same for both scripts:
- one line `CRASHCART_RESULT {json}` on stdout: status (collected | no_dump | disk_not_found |
  upload_failed | error), message, volume, crash_control (CrashDumpEnabled a number, or null when the
  registry holds another type), files[] (kind, source_path, blob, url, size, sha256, header, uploaded),
  notes[];
- progress lines `CRASHCART_PROGRESS {"blob", "done", "total"}` on stdout while uploading;
- exit code 0 / 10 / 11 / 12 for collected / no_dump / disk_not_found / upload_failed, 1 for an
  unexpected error, 2 for a bad parameter;
- blobs `<prefix>/MEMORY.DMP`, `<prefix>/Minidump/<name>.dmp`, `<prefix>/PAGEFILE.DMP` (a dump still in
  the page file), `<prefix>/DEDICATED.DMP`, each with `<blob>.manifest.json`.
"""

from __future__ import annotations

import functools
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from scripts.remote import winpaths

RESULT_MARKER = "CRASHCART_RESULT"
PROGRESS_MARKER = "CRASHCART_PROGRESS"
# Bearer tokens need x-ms-version 2017-11-09 or later; this one is accepted by Azure and Azurite alike.
X_MS_VERSION = "2023-11-03"
MiB = 1 << 20
MAX_BLOCK_SIZE = 100 * MiB  # what the kit allows (the service allows more); 50,000 blocks = 4.8 TiB

TEMPLATES = {"windows": "collect.ps1.j2", "linux": "collect.sh.j2"}

# Exit codes of the remote scripts -> their status (the same numbers as scripts.errors.ExitCode).
REMOTE_EXIT = {0: "collected", 10: "no_dump", 11: "disk_not_found", 12: "upload_failed", 1: "error", 2: "error"}


@dataclass(frozen=True)
class UploadSettings:
    """Defaults written into the script; each can still be overridden by a parameter of the same name."""

    # 32 MiB blocks, 8 in flight: measured with bench/upload_bench.py (the bash upload beside the SDK's
    # upload_blob(max_concurrency=8)), ahead of 100 MiB x 4 and 16 MiB x 8. A file that would need more than
    # 50,000 blocks (1.5 TiB at 32 MiB) gets bigger blocks, up to MAX_BLOCK_SIZE, from the script itself.
    block_size: int = 32 * MiB
    parallel: int = 8
    max_attempts: int = 8
    auth_wait_seconds: int = 600  # a new role assignment can take minutes to be honoured by storage

    def __post_init__(self) -> None:
        for name, value in asdict(self).items():
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"UploadSettings.{name} must be a positive whole number, not {value!r}")
        if not 4096 <= self.block_size <= MAX_BLOCK_SIZE:
            raise ValueError(f"block_size must be 4 KiB to 100 MiB, not {self.block_size}")
        if self.parallel > 16:
            raise ValueError("parallel must be at most 16")


def sh_literal(value: str) -> str:
    """A kit constant as a single-quoted bash word (rendered data, never a user value)."""
    return "'" + value.replace("'", "'\\''") + "'"


def ps_literal(value: str) -> str:
    """A kit constant as a single-quoted PowerShell string; PowerShell also ends such a string at the
    typographic single quotes, so those are doubled too."""
    for quote in "'\u2018\u2019\u201a\u201b":
        value = value.replace(quote, quote * 2)
    return "'" + value + "'"


@functools.lru_cache(maxsize=1)
def _environment():
    import jinja2

    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(Path(__file__).parent)),
        undefined=jinja2.StrictUndefined,
        autoescape=False,
        keep_trailing_newline=True,
        trim_blocks=True,  # a line holding only {% ... %} (an include, a loop) leaves no blank line behind
        # bash's ${#var} and PowerShell's <# #> must stay text: comments use a marker neither language has
        comment_start_string="{##",
        comment_end_string="##}",
    )
    env.filters.update(sh=sh_literal, ps=ps_literal, ps_bool=lambda value: "$true" if value else "$false")
    env.globals["winpaths"] = winpaths  # the Windows-path rule, rendered into every script as data
    return env


def render_template(name: str, **context: Any) -> str:
    """Any template in this folder, with the settings every remote script needs (code only, no user values)."""
    return _environment().get_template(name).render(result_marker=RESULT_MARKER, **context)


def render(os_name: str, settings: UploadSettings | None = None) -> str:
    """The collect script for the rescue VM's OS ("windows" | "linux"). Takes no user values."""
    if os_name not in TEMPLATES:
        raise ValueError(f"no collect script for rescue OS {os_name!r}: expected one of {sorted(TEMPLATES)}")
    settings = settings or UploadSettings()
    template = _environment().get_template(TEMPLATES[os_name])
    return template.render(
        x_ms_version=X_MS_VERSION, result_marker=RESULT_MARKER, progress_marker=PROGRESS_MARKER,
        **asdict(settings),
    )


def parse_marked(text: str | None, marker: str) -> dict[str, Any] | None:
    """The JSON object of the last `<marker> {...}` line in a script's output (None when there is none)."""
    for line in reversed((text or "").splitlines()):
        line = line.strip()
        if line.startswith(marker + " "):
            try:
                value = json.loads(line[len(marker) + 1:])
            except (json.JSONDecodeError, RecursionError):
                continue
            if isinstance(value, dict):
                return value
    return None
