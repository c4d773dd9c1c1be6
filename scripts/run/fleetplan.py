"""`fleet plan`: a fleet's VM list as a job matrix, so a CI system runs the shards in parallel.

The CI system is the distributed engine: each matrix job runs `fleet run --vms <list> --shard I/N` on
the same VM list, takes its own shard (the same split on every machine: by VM key, in N near-equal
contiguous parts) and shares the one manifest in evidence (the fleet id derives from the whole list);
a last job runs `fleet report`, which reads that manifest. Nothing here schedules anything.

Written: `matrix-github.json` (a `strategy.matrix` value: {"include": [{"shard": "1/4", ...}]}),
`matrix-azure.json` (an Azure Pipelines `strategy.matrix` object: {"shard_1_of_4": {"SHARD": "1/4"}}),
and `shard-I-of-N.txt` per shard, for a person to read.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from scripts.azure.identity import vm_key
from scripts.base.errors import CrashcartError, ExitCode

MAX_SHARDS = 256  # GitHub Actions runs at most 256 jobs per matrix


def parse_shard(text: str) -> tuple[int, int]:
    """`2/8` -> (2, 8): shard 2 of 8, 1-based."""
    m = re.fullmatch(r"\s*([0-9]{1,4})\s*/\s*([0-9]{1,4})\s*", text or "")
    if not m or not 1 <= int(m.group(1)) <= int(m.group(2)) <= MAX_SHARDS:
        raise CrashcartError(f"--shard {str(text).encode('unicode_escape').decode()[:40]!r} is not valid",
                             f"write I/N with 1 <= I <= N <= {MAX_SHARDS}, e.g. 2/8", ExitCode.USAGE)
    return int(m.group(1)), int(m.group(2))


def split(vm_ids: tuple[str, ...] | list[str], shards: int) -> list[list[str]]:
    """N near-equal contiguous parts of the list ordered by VM key (empty parts when N > VMs)."""
    if not 1 <= shards <= MAX_SHARDS:
        raise CrashcartError(f"--shards {shards} is out of range", f"use 1 to {MAX_SHARDS}", ExitCode.USAGE)
    ordered = sorted(vm_ids, key=vm_key)
    size, extra = divmod(len(ordered), shards)
    parts, start = [], 0
    for i in range(shards):
        end = start + size + (1 if i < extra else 0)
        parts.append(ordered[start:end])
        start = end
    return parts


def shard_of(vm_ids: tuple[str, ...], shard: tuple[int, int]) -> tuple[str, ...]:
    index, count = shard
    return tuple(split(vm_ids, count)[index - 1])


def write_list(vm_ids: tuple[str, ...], out_dir: Path) -> Path:
    """The VM list (a --selector's result) as `vms.txt` beside the matrices: every shard runs this same list."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "vms.txt"
    path.write_text("# selected through Azure Resource Graph by `fleet plan --selector`\n"
                    + "".join(v + "\n" for v in vm_ids), encoding="utf-8")
    return path


def plan(vm_ids: tuple[str, ...], shards: int, fleet_id: str, vms_file: str, out_dir: Path) -> dict[str, Any]:
    """Writes the matrices and shard lists; returns what `fleet plan` prints."""
    parts = [p for p in split(vm_ids, min(shards, len(vm_ids)))]
    count = len(parts)
    github = {"include": [{"shard": f"{i}/{count}", "vms": len(p)} for i, p in enumerate(parts, 1)]}
    azure = {f"shard_{i}_of_{count}": {"SHARD": f"{i}/{count}"} for i in range(1, count + 1)}
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "matrix-github.json").write_text(json.dumps(github) + "\n", encoding="utf-8")
    (out_dir / "matrix-azure.json").write_text(json.dumps(azure) + "\n", encoding="utf-8")
    for i, part in enumerate(parts, 1):
        (out_dir / f"shard-{i}-of-{count}.txt").write_text("".join(v + "\n" for v in part), encoding="utf-8")
    return {"fleet_id": fleet_id, "vms_file": vms_file, "vms": len(vm_ids), "shards": count,
            "github_matrix": github, "azure_matrix": azure, "out_dir": str(out_dir),
            "shard_command": f"pipenv run fleet run --vms {vms_file} --fleet-id {fleet_id} --shard <I>/{count}"}
