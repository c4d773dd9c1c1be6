"""Benchmark: the Linux rescue script's upload path against the SDK's own parallel upload of the same file.

    .venv/bin/python bench/upload_bench.py [--size-mib 1024] [--rounds 3] [--settings 32:8,100:4,16:8]

Against one Azurite (HTTPS with OAuth, as the rescue VM reaches storage; a fake IMDS hands out the token)
behind the devkit's copy shim, also over HTTPS (scripts/devkit/copyshim.py: it answers each Put Block with the
x-ms-content-crc64 Azure returns, which Azurite 3.35 does not). Both contenders go through the same shim:

1. the bash upload path of scripts/remote/collect.sh.j2 as rendered for the VM (`_upload.sh.j2` with
   `_common.sh.j2`: dd per block, the running SHA-256, Put Block with curl in parallel jobs, each block's
   CRC-64 from the service's answer, Put Block List), driven by a few lines that call `upload_range` on the
   file, for each BlockSize:Parallel in `--settings` (the first is what collect uses: UploadSettings);
2. azure-storage-blob's `upload_blob(max_concurrency=8)` of the same file.

The SDK's upload straight to Azurite (no shim) is timed too: the figure divides the script's best throughput
by the SDK's best on either path, so the shim's cost (a Python relay the script needs for the service's CRC,
which Azure returns for free) counts against the script, never for it. `--no-service-crc` makes the shim answer without the CRC, so the
script computes every block's CRC-64 on the VM (the fallback path).

Each is run `--rounds` times (alternating); the best throughput of each counts. Printed: a table, and the
issue's figure, `rescue-vm upload: Z× the SDK's parallel upload throughput` (goal Z >= 0.9), for the
setting collect uses (the first of `--settings`; the others are shown for comparison). The uploaded blobs are checked: same bytes (SHA-256) and, for the script, the CRC-64
it recorded equal to scripts.evidence.crc64 over the file.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import os
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SDK = "SDK upload_blob(max_concurrency=8), via the shim"
SDK_DIRECT = "SDK upload_blob(max_concurrency=8), straight to Azurite"
sys.path.insert(0, str(REPO))

def _script() -> str:
    from scripts.devkit.uploaddriver import upload_script

    return upload_script()


def _mbps(size: int, seconds: float) -> float:
    return size / seconds / 1e6


def main(argv: list[str] | None = None) -> int:
    from scripts.remote import UploadSettings

    default = UploadSettings()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mib", type=int, default=1024)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--no-service-crc", action="store_true", help="the shim sends no x-ms-content-crc64")
    shipped = f"{default.block_size >> 20}:{default.parallel}"
    parser.add_argument("--settings", default=",".join(dict.fromkeys([shipped, "100:4", "16:8"])),
                        help="BlockSize(MiB):Parallel pairs for the script, comma-separated (default: %(default)s)")
    args = parser.parse_args(argv)
    settings = [tuple(int(x) for x in pair.split(":")) for pair in args.settings.split(",")]

    from scripts.devkit.copyshim import CopyShim
    from scripts.evidence import crc64
    from tests.support.storagefakes import FakeImds, make_tls, service_client, start_azurite_oauth

    work = Path(tempfile.mkdtemp(prefix="crashcart-upload-bench-"))
    size = args.size_mib << 20
    source = work / "MEMORY.DMP"
    sha, crc = hashlib.sha256(), crc64.Crc64()
    with open(source, "wb") as out:
        for _ in range(0, size, 16 << 20):
            chunk = os.urandom(min(16 << 20, size - out.tell()))
            out.write(chunk)
            sha.update(chunk)
    t = time.monotonic()
    with open(source, "rb") as f:
        while chunk := f.read(16 << 20):
            crc.update(chunk)
    want_sha, want_crc = sha.hexdigest(), crc.hexdigest()
    print(f"file: {args.size_mib} MiB of random bytes; independent CRC-64 {want_crc} ({time.monotonic() - t:.0f} s)",
          file=sys.stderr)
    script = work / "upload.sh"
    script.write_text(_script())

    tls = make_tls(work)
    best: dict[str, float] = {}
    checks: list[str] = []
    with start_azurite_oauth(tls) as azurite, CopyShim(azurite, str(tls.cert), str(tls.key)) as shim, FakeImds() as imds:
        shim.report_crc64 = not args.no_service_crc
        direct = service_client(azurite, tls).create_container(f"bench-{uuid.uuid4().hex[:8]}")
        via_shim = service_client(dataclasses.replace(azurite, blob_endpoint=shim.blob_endpoint), tls)
        container = via_shim.get_container_client(direct.container_name)
        for round_ in range(args.rounds):
            for block_mib, parallel in settings:
                key = f"script BlockSize {block_mib} MiB, Parallel {parallel}"
                name = f"script-{round_}-{block_mib}-{parallel}"
                env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(work), "CURL_CA_BUNDLE": str(tls.cert),
                       "BlobEndpoint": shim.blob_endpoint, "Container": container.container_name,
                       "ImdsEndpoint": imds.url, "BlockSize": str(block_mib << 20), "Parallel": str(parallel),
                       "Src": str(source), "Length": str(size), "Name": name}
                t = time.monotonic()
                proc = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, timeout=3600)
                seconds = time.monotonic() - t
                if proc.returncode != 0 or "UPLOADED" not in proc.stdout:
                    print(f"{key}: failed ({proc.returncode}): {proc.stderr[-1500:]}", file=sys.stderr)
                    return 1
                got_sha, got_crc, got_by = (proc.stdout.split("UPLOADED", 1)[1].split() + ["", "", ""])[:3]
                checks.append(f"{key}: sha256 {'ok' if got_sha == want_sha else 'WRONG'}, "
                              f"crc64 {'ok' if got_crc == want_crc else 'WRONG ' + got_crc} (computed by {got_by})")
                best[key] = max(best.get(key, 0.0), _mbps(size, seconds))
                container.delete_blob(name)
                print(f"round {round_ + 1}: {key}: {seconds:.1f} s", file=sys.stderr)
            for key, target in ((SDK, container), (SDK_DIRECT, direct)):
                name = f"sdk-{round_}-{len(key)}"
                t = time.monotonic()
                with open(source, "rb") as f:
                    target.get_blob_client(name).upload_blob(f, length=size, max_concurrency=8)
                seconds = time.monotonic() - t
                best[key] = max(best.get(key, 0.0), _mbps(size, seconds))
                stored = hashlib.sha256()
                for chunk in direct.get_blob_client(name).download_blob(max_concurrency=4).chunks():
                    stored.update(chunk)
                checks.append(f"{key}: sha256 {'ok' if stored.hexdigest() == want_sha else 'WRONG'}")
                direct.delete_blob(name)
                print(f"round {round_ + 1}: {key}: {seconds:.1f} s", file=sys.stderr)

    import shutil

    shutil.rmtree(work, ignore_errors=True)
    sdk, sdk_direct = best.pop(SDK), best.pop(SDK_DIRECT)
    print(f"\nrescue-vm upload benchmark: {args.size_mib} MiB file, Azurite over HTTPS on loopback behind the copy "
          f"shim (HTTPS), best of {args.rounds} round(s), {os.cpu_count()} CPU(s) shared with Azurite and the shim")
    print(f"{'method':<66} {'MB/s':>8} {'vs SDK':>7}")
    sdk_best = max(sdk, sdk_direct)
    print(f"{SDK_DIRECT:<66} {sdk_direct:>8.1f} {sdk_direct / sdk_best:>6.2f}x")
    print(f"{SDK:<66} {sdk:>8.1f} {sdk / sdk_best:>6.2f}x")
    for key, rate in best.items():
        print(f"{key:<66} {rate:>8.1f} {rate / sdk_best:>6.2f}x")
    for line in sorted(set(checks)):
        print(f"  {line}")
    if any("WRONG" in line for line in checks):
        print("rescue-vm upload: NO - an uploaded blob or its CRC-64 is wrong (see above)")
        return 1
    top = next(iter(best))  # the first setting: what collect uses (scripts.remote.UploadSettings by default)
    print(f"(the figure: {top}, against the SDK's best path)")
    print(f"rescue-vm upload: {best[top] / sdk_best:.2f}\u00d7 the SDK's parallel upload throughput")
    return 0


if __name__ == "__main__":
    sys.exit(main())
