"""The fleet report as a person sees it: rendered by headless Chromium (a screenshot is kept in the test's
tmp folder), read back as the DOM Chromium built; and the JSON counts equal the manifest's entries."""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest

from scripts.azure.identity import vm_key
from scripts.run import fleetreport
from scripts.run.fleetmanifest import new_entry
from tests.run.fleetkit import vm_ids

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def manifest() -> dict:
    vms = {}
    for i, vm_id in enumerate(vm_ids(9)):
        entry = new_entry(vm_id)
        if i < 6:
            driver = "contosoflt.sys" if i < 5 else "netvsc.sys"
            entry.update(state="collected", exit_code=0, stop_code="0x0000007E",
                         stop_name="SYSTEM_THREAD_EXCEPTION_NOT_HANDLED", culprit=driver,
                         report_blob=f"{vm_key(vm_id)}/s/report.json",
                         dumps=[{"blob": f"{vm_key(vm_id)}/s/Minidump/crash.dmp", "size": 9,
                                 "url": f"https://ev.blob.core.windows.net/dumps/{vm_key(vm_id)}/s/Minidump/crash.dmp"
                                        "?sig=SECRET"}])
        elif i == 6:
            entry.update(state="failed", exit_code=10, reason="the broken volume holds no memory dump <b>x</b>")
        elif i == 7:
            entry.update(state="failed", exit_code=30, reason="terraform apply failed for the repair stack")
        else:
            entry.update(state="left-for-rerun", exit_code=5, reason="throttled")
        vms[entry["key"]] = entry
    return {"schema": "crashcart.fleet/1", "fleet_id": "fleet-demo", "vms": vms}


def test_the_report_counts_what_the_manifest_holds():
    report = fleetreport.build(manifest())
    assert report["total"] == 9
    assert report["counts"] == {"pending": 0, "running": 0, "collected": 6, "failed": 2, "left-for-rerun": 1}
    assert report["culprits"] == [{"driver": "contosoflt.sys", "count": 5}, {"driver": "netvsc.sys", "count": 1}]
    assert report["stop_codes"][0]["count"] == 6
    assert report["common_culprit"]["driver"] == "contosoflt.sys" and report["common_culprit"]["count"] == 5


def test_no_common_culprit_on_a_tie():
    doc = manifest()
    for entry in list(doc["vms"].values())[2:5]:
        entry["culprit"] = "netvsc.sys"  # now 2 contosoflt.sys, 4 netvsc.sys
    list(doc["vms"].values())[5]["culprit"] = "contosoflt.sys"
    assert fleetreport.build(doc)["common_culprit"] is None  # 3 and 3


def test_a_windows_driver_as_the_common_culprit_is_not_sent_to_a_vendor():
    doc = manifest()
    for entry in list(doc["vms"].values())[:5]:
        entry["culprit"] = "netvsc.sys"  # the Hyper-V network driver Windows ships
    sentence = fleetreport.build(doc)["common_culprit"]["sentence"]
    assert sentence.startswith("netvsc.sys, a Windows driver, is the culprit in 6 of 6")
    assert "vendor" not in sentence and "cumulative update" in sentence
    assert "vendor's fixed version" in fleetreport.build(manifest())["common_culprit"]["sentence"]


def test_the_page_is_self_contained_and_escapes_what_it_shows():
    page = fleetreport.html(fleetreport.build(manifest()))
    assert "<script" not in page and "<link" not in page and "@import" not in page and "src=" not in page
    hrefs = re.findall(r'href="([^"]+)"', page)
    assert len(hrefs) == 6 and all(h.startswith("https://ev.blob.core.windows.net/dumps/") for h in hrefs)
    assert "SECRET" not in page  # a SAS never reaches the page
    assert "&lt;b&gt;x&lt;/b&gt;" in page  # text from the VMs is escaped


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install chromium)")
def test_chromium_renders_the_chart_and_the_common_culprit(tmp_path):
    files = fleetreport.write(fleetreport.build(manifest()), tmp_path / "report")
    shot = tmp_path / "fleet-report.png"
    base = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-extensions",
            f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1200,1400"]
    subprocess.run([*base, f"--screenshot={shot}", f"file://{files['html']}"], capture_output=True, timeout=120,
                   check=False)
    assert shot.exists() and shot.stat().st_size > 10_000, "chromium wrote no screenshot"
    dom = subprocess.run([*base, "--dump-dom", f"file://{files['html']}"], capture_output=True, text=True,
                         timeout=120, check=True).stdout
    text = re.sub(r"<[^>]+>", " ", dom)
    text = re.sub(r"\s+", " ", text)
    assert "Fleet report: fleet-demo" in text
    assert "Common culprit: contosoflt.sys" in text
    assert "collected: 6" in text and "failed: 2" in text and "left-for-rerun: 1" in text
    culprits = re.search(r'<svg id="culprits".*?</svg>', dom, re.S).group(0)
    bars = re.findall(r'<rect [^>]*width="(\d+)"', culprits)
    assert len(bars) == 2 and int(bars[0]) > int(bars[1]) * 4  # 5 against 1
    assert "contosoflt.sys" in culprits and "netvsc.sys" in culprits
    assert len(re.findall(r"<rect ", re.search(r'<svg id="stop-codes".*?</svg>', dom, re.S).group(0))) == 1
    assert len(re.findall(r"<tr data-key=", dom)) == 9
    assert "terraform apply failed for the repair stack" in text
