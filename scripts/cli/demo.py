"""`pipenv run demo` (moving here: the verb's parse/call/print)."""

from scripts.devkit.demo import add_arguments, run  # noqa: F401
