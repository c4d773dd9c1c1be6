"""`pipenv run sweep` (moving here: the verb's parse/call/print)."""

from scripts.run.sweep import add_arguments, run  # noqa: F401
