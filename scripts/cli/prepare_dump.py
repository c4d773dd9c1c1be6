"""`pipenv run prepare-dump` (moving here: the verb's parse/call/print)."""

from scripts.nodump.prepare import add_arguments, run  # noqa: F401
