"""`python -m scripts <verb>`: the entry point behind every `pipenv run <verb>` alias, and the table of verbs.

Each verb lives in its own module under scripts/cli/ with `add_arguments(parser)` and `run(args) -> int`; modules are
imported only when their verb is asked for, so `--help` and every command start fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from scripts.base.console import run_verb, setup_logging
from scripts.base.errors import ExitCode

VERBOSE = ("-v", "--verbose")

VERBS: dict[str, tuple[str, str]] = {
    "discover": ("scripts.cli.discover", "read the broken VM and its OS disk from Azure and write the config file"),
    "demo": ("scripts.cli.demo", "the kit's main job on this machine: a crashed VM's disk, Azure doubles, "
                             "snapshot-export, triage, report"),
    "summary": ("scripts.cli.summary", "synthesize both stacks and summarize what `cdktf deploy` would create"),
    "collect": ("scripts.cli.collect", "run the collection on the rescue VM and verify the dump in evidence storage"),
    "preflight": ("scripts.cli.preflight", "check roles, providers, disk policy, encryption, quota and evidence "
                                        "access before anything is created; name the strategy"),
    "repair-run": ("scripts.cli.repair_run", "deploy, collect, tear down and report: the whole job in one command"),
    "triage": ("scripts.cli.triage", "read a dump (file or blob URL): bugcheck, exception and faulting driver"),
    "sweep": ("scripts.cli.sweep", "list (and delete) expired repair resource groups"),
    "prepare-dump": ("scripts.cli.prepare_dump", "configure the disk copy to write a dump, swap it in and trigger it"),
    "rollback": ("scripts.cli.rollback", "put the original OS disk back on the VM"),
    "fix": ("scripts.cli.fix", "repair the disk copy (disable a driver, quarantine files, safe mode, ...) "
                            "and with --verify prove the VM boots from it, or roll back"),
    "fleet": ("scripts.cli.fleet", "many VMs in one run (repair-run per VM, resumable), a CI job matrix, one report"),
    "verify": ("scripts.cli.verify", "read a stored dump back (read access only) and check its CRC-64 and SHA-256 "
                                     "against its manifest"),
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    verbose = [a for a in argv[:1] if a in VERBOSE]  # `-v` before the verb means what it means after it
    argv = argv[len(verbose):]
    if not argv or argv[0] in ("-h", "--help"):
        width = max(len(v) for v in VERBS)
        lines = [f"  {name:<{width}}  {summary}" for name, (_, summary) in VERBS.items()]
        text = "usage: python -m scripts [-v] <verb> [options]\n\nverbs:\n" + "\n".join(lines) + "\n"
        (sys.stdout if argv else sys.stderr).write(text)  # asked for: on stdout, as each verb's --help
        return int(ExitCode.OK if argv else ExitCode.USAGE)
    verb, rest = argv[0], verbose + argv[1:]
    if verb not in VERBS:
        sys.stderr.write(f"error: unknown verb '{verb}'\nnext:  choose one of: {', '.join(VERBS)}\n")
        return int(ExitCode.USAGE)
    module_name, summary = VERBS[verb]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        if err.name != module_name:
            raise
        sys.stderr.write(f"error: '{verb}' is not available in this version of crashcart\n")
        return int(ExitCode.USAGE)
    parser = argparse.ArgumentParser(prog=f"pipenv run {verb}", description=summary)
    parser.add_argument(*VERBOSE, action="store_true", help="debug logging on stderr")
    module.add_arguments(parser)
    args = parser.parse_args(rest)
    setup_logging(args.verbose)
    return run_verb(lambda: module.run(args))


if __name__ == "__main__":
    sys.exit(main())
