"""`pipenv run rollback` (moving here: the verb's parse/call/print)."""

from scripts.nodump.rollback import add_arguments, run  # noqa: F401
