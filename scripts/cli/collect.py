"""`pipenv run collect` (moving here: the verb's parse/call/print)."""

from scripts.collection.rescue_vm import add_arguments, run  # noqa: F401
