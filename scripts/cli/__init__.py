"""The command line: one thin module per verb (parse, call, print JSON, exit code).

The table of verbs is scripts/__main__.py; it imports a verb's module only when that verb is asked for.
"""
