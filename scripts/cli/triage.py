"""`pipenv run triage` (moving here: the verb's parse/call/print)."""

from scripts.dumpfile.triage import add_arguments, run  # noqa: F401
