"""`pipenv run summary` (moving here: the verb's parse/call/print)."""

from scripts.run.summary import add_arguments, run  # noqa: F401
