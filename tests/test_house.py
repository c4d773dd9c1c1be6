"""The shape of scripts/ (README "Architecture"): floors, no circles, small modules, one way to do each thing.

Read from the code itself (every `import`, also the ones inside functions), so a change that breaks the
layout fails here with the file and the import that broke it, not in a review months later.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = REPO / "scripts"

# The floors of the house: a package may import its own modules and those of lower floors only.
FLOORS = {
    "base": 1,
    "azure": 2, "remote": 2, "dumpfile": 2,
    "config": 3, "windisk": 3, "evidence": 3,
    "collection": 4, "nodump": 4, "remediate": 4,
    "run": 5, "devkit": 5,
    "cli": 6,
}
MAX_MODULE_LINES = 450
MAX_CLASS_LINES = 250
MAX_FLOORS = 6


def _modules() -> dict[str, Path]:
    found = {}
    for path in sorted(SCRIPTS.rglob("*.py")):
        parts = path.relative_to(REPO).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


MODULES = _modules()


def _imports(path: Path) -> list[tuple[int, str]]:
    """(line, module) for every import of a project module in the file, at any depth."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                full = f"{node.module}.{alias.name}"
                out.append((node.lineno, full if full in MODULES else node.module))
    return [(line, name) for line, name in out if name.split(".")[0] in ("scripts", "tests")]


GRAPH = {name: sorted({target for _, target in _imports(path) if target in MODULES and target != name})
         for name, path in MODULES.items()}


def _package(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 2 or (len(parts) == 2 and (SCRIPTS / parts[1]).is_dir()) else ""


def test_nothing_under_scripts_imports_tests():
    offenders = [f"{MODULES[m].relative_to(REPO)}:{line} imports {target}"
                 for m in MODULES for line, target in _imports(MODULES[m]) if target.startswith("tests")]
    assert not offenders, offenders


def test_every_package_has_a_floor():
    packages = {p.name for p in SCRIPTS.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    assert packages <= set(FLOORS), f"add the new package to FLOORS (and README's house): {packages - set(FLOORS)}"


def test_arrows_point_down():
    offenders = []
    for module, targets in GRAPH.items():
        here = _package(module)
        if not here:
            continue
        for target in targets:
            there = _package(target)
            if there and there != here and FLOORS[there] >= FLOORS[here]:
                offenders.append(f"{module} (floor {FLOORS[here]}) -> {target} (floor {FLOORS[there]})")
    assert not offenders, offenders


def test_no_import_cycles():
    state: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in GRAPH[node]:
            if state.get(nxt) == 1:
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for module in GRAPH:
        if module not in state:
            visit(module)
    assert not cycles, cycles


def test_the_house_has_at_most_six_floors():
    """The longest chain of package-to-package imports."""
    edges = {p: set() for p in FLOORS}
    for module, targets in GRAPH.items():
        for target in targets:
            a, b = _package(module), _package(target)
            if a and b and a != b:
                edges[a].add(b)
    depth: dict[str, int] = {}

    def height(package: str) -> int:
        if package not in depth:
            depth[package] = 1 + max((height(b) for b in edges[package]), default=0)
        return depth[package]

    assert max(height(p) for p in FLOORS) <= MAX_FLOORS, {p: height(p) for p in FLOORS}


@pytest.mark.parametrize("module", sorted(MODULES))
def test_modules_and_classes_stay_small(module):
    path = MODULES[module]
    text = path.read_text(encoding="utf-8")
    assert text.count("\n") <= MAX_MODULE_LINES, f"{path.relative_to(REPO)} has {text.count(chr(10))} lines"
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, ast.ClassDef):
            size = node.end_lineno - node.lineno + 1
            assert size <= MAX_CLASS_LINES, f"class {node.name} in {path.relative_to(REPO)} has {size} lines"


# ---- one way to do each thing --------------------------------------------------------------------------------
def _grep(pattern: str, allowed: set[str]) -> list[str]:
    rx = re.compile(pattern)
    hits = []
    for module, path in MODULES.items():
        if module in allowed:
            continue
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if rx.search(line):
                hits.append(f"{path.relative_to(REPO)}:{number}: {line.strip()}")
    return hits


def test_one_resource_id_parser():
    """Resource IDs are read by scripts.azure.ids only: no other module matches their shape with a regex.
    (The devkit's ARM double routes request *URLs* with patterns, as any HTTP server does; it is the
    stand-in for Azure, not a reader of IDs.)"""
    devkit = {m for m in MODULES if m.startswith("scripts.devkit.")}
    assert not _grep(r"(resourceGroups|subscriptions)/\(\?P<|parse_resource_id|is_valid_resource_id",
                     {"scripts.azure.ids"} | devkit)
    assert not _grep(r"\.index\([\"']resourcegroups[\"']\)", set())


def test_one_error_translation():
    assert not _grep(r"def (translate_azure_error|for_status|_azure_error|storage_error|_first_line|first_line)\b",
                     {"scripts.azure.errors", "scripts.base.errors"})
    assert not _grep(r"splitlines\(\)\[0\]", {"scripts.base.errors"})


def test_one_poll_helper():
    """Waiting happens in scripts.azure.poll; the range reader's retry backoff is the one other sleeper
    (it sits below azure/ and retries a single HTTP request, it does not wait for a state)."""
    assert not _grep(r"\btime\.sleep\(", {"scripts.azure.poll", "scripts.base.rangeio", "scripts.base.rangeio_http"}
                     | {m for m in MODULES if m.startswith("scripts.devkit.")})


def test_one_run_command_runner():
    assert not _grep(r"virtual_machine_run_commands", {"scripts.azure.runcommand"})


def test_one_status_to_exit_code_mapping():
    assert not _grep(r"[\"'](no_dump|disk_not_found)[\"']\s*:\s*ExitCode\.", {"scripts.collection.contract"})
