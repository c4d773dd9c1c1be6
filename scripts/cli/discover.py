"""`pipenv run discover` (moving here: the verb's parse/call/print)."""

from scripts.run.discover import add_arguments, run  # noqa: F401
