"""The fleet report: what every VM of a fleet ended as, and what the crashes have in common.

Built from the fleet manifest alone (scripts.run.fleetmanifest), so the report a CI merge job writes
from evidence equals the one a single machine writes: `fleet-report.json` (for pipelines) and
`fleet-report.html`, one self-contained page (inline CSS and SVG, no script, no external asset, so it
opens from an artifact store or a mail attachment): the counts per state, bar charts of the stop codes
and the culprit drivers across the fleet, the common culprit called out, and one row per VM with its
status, stop code, culprit, a link to its dump in evidence, and the fix outcome when there is one.
"""

from __future__ import annotations

import collections
import datetime as dt
import functools
import json
from pathlib import Path
from typing import Any

from scripts.azure import ids
from scripts.dumpfile.blame import is_windows_module
from scripts.run.fleetmanifest import COLLECTED, STATES, counts

SCHEMA = "crashcart.fleet-report/1"
JSON_FILE = "fleet-report.json"
HTML_FILE = "fleet-report.html"
TEMPLATES = Path(__file__).parent / "templates"
BAR_HEIGHT, BAR_GAP, LABEL_WIDTH, BAR_WIDTH = 22, 6, 380, 360


def build(manifest: dict[str, Any], now: dt.datetime | None = None) -> dict[str, Any]:
    """The report document from the manifest document."""
    entries = sorted((manifest.get("vms") or {}).values(), key=lambda e: (e.get("state") != COLLECTED, e["key"]))
    vms = [_row(e) for e in entries]
    stop_codes = collections.Counter((v["stop_code"], v["stop_name"]) for v in vms if v["stop_code"])
    culprits = collections.Counter(v["culprit"] for v in vms if v["culprit"])
    return {
        "schema": SCHEMA,
        "fleet_id": manifest.get("fleet_id"),
        "generated_at": (now or dt.datetime.now(dt.timezone.utc)).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "total": len(vms),
        "counts": counts(manifest.get("vms") or {}),
        "stop_codes": [{"code": c, "name": n, "count": k} for (c, n), k in
                       sorted(stop_codes.items(), key=lambda i: (-i[1], i[0][0]))],
        "culprits": [{"driver": d, "count": k} for d, k in sorted(culprits.items(), key=lambda i: (-i[1], i[0]))],
        "common_culprit": common_culprit(culprits, sum(1 for v in vms if v["state"] == COLLECTED)),
        "vms": vms,
    }


def _row(entry: dict[str, Any]) -> dict[str, Any]:
    ref = ids.try_parse(str(entry.get("vm_id") or ""), "vm")
    dumps = entry.get("dumps") or []
    return {
        "vm_id": entry.get("vm_id"), "name": ref.name if ref else entry.get("key"),
        "resource_group": ref.resource_group if ref else None, "key": entry.get("key"),
        "state": entry.get("state"), "reason": entry.get("reason"), "exit_code": entry.get("exit_code"),
        "attempts": entry.get("attempts"), "stop_code": entry.get("stop_code"), "stop_name": entry.get("stop_name"),
        "culprit": entry.get("culprit"), "dump_url": dumps[0].get("url") if dumps else None,
        "dump_blob": dumps[0].get("blob") if dumps else None, "report_blob": entry.get("report_blob"),
        "fix": entry.get("fix"),
    }


def common_culprit(culprits: collections.Counter, collected: int) -> dict[str, Any] | None:
    """The driver blamed most often, when it is blamed at least twice and more often than any other."""
    ranked = culprits.most_common(2)
    if not ranked or ranked[0][1] < 2 or (len(ranked) > 1 and ranked[1][1] == ranked[0][1]):
        return None
    driver, count = ranked[0]
    blamed = sum(culprits.values())
    windows = is_windows_module(driver)
    return {"driver": driver, "count": count, "of_blamed": blamed, "of_collected": collected,
            "share": round(count / blamed, 3),
            "sentence": f"{driver}{', a Windows driver,' if windows else ''} is the culprit in {count} of {blamed} "
                        f"triaged crash dumps ({count * 100 // blamed}%): " + (
                            "install the latest cumulative update on every affected VM, or send one of the dumps to "
                            "Microsoft support" if windows else
                            "install its vendor's fixed version, or disable it, on every affected VM")}


# ---- the page -------------------------------------------------------------------------------------------------
def bars(items: list[tuple[str, int]]) -> dict[str, Any]:
    """An SVG bar chart's geometry: one bar per (label, count), widths relative to the largest."""
    top = max((n for _, n in items), default=1) or 1
    rows = [{"label": label, "count": n, "y": i * (BAR_HEIGHT + BAR_GAP),
             "width": max(2, round(BAR_WIDTH * n / top))} for i, (label, n) in enumerate(items)]
    return {"rows": rows, "height": max(1, len(rows)) * (BAR_HEIGHT + BAR_GAP), "label_width": LABEL_WIDTH,
            "bar_width": BAR_WIDTH, "bar_height": BAR_HEIGHT, "width": LABEL_WIDTH + BAR_WIDTH + 60}


@functools.lru_cache(maxsize=1)
def _template():
    import jinja2

    env = jinja2.Environment(loader=jinja2.FileSystemLoader(str(TEMPLATES)), autoescape=True,
                             undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    return env.get_template("fleet-report.html.j2")


def html(report: dict[str, Any]) -> str:
    stop_chart = bars([(f"{s['code']} {s['name'] or ''}".strip(), s["count"]) for s in report["stop_codes"]])
    culprit_chart = bars([(c["driver"], c["count"]) for c in report["culprits"]])
    return _template().render(r=report, states=STATES, stop_chart=stop_chart, culprit_chart=culprit_chart,
                              safe_url=_safe_url)


def _safe_url(url: Any) -> str | None:
    """Only https (or the local emulator's http) links reach the page, never a SAS token."""
    text = str(url or "").split("?", 1)[0]
    return text if text.startswith(("https://", "http://127.0.0.1", "http://localhost")) else None


def write(report: dict[str, Any], folder: Path) -> dict[str, str]:
    """fleet-report.json and fleet-report.html in `folder` (replaced: the report is derived, the
    manifest in evidence is the record)."""
    folder.mkdir(parents=True, exist_ok=True)
    files = {"json": folder / JSON_FILE, "html": folder / HTML_FILE}
    files["json"].write_text(json.dumps(report, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    files["html"].write_text(html(report), encoding="utf-8")
    return {k: str(v) for k, v in files.items()}
