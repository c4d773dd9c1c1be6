"""`pipenv run repair-run` (moving here: the verb's parse/call/print)."""

from scripts.run.repair_run import add_arguments, run  # noqa: F401
