"""`python -m scripts <verb>`: the entry point behind every `pipenv run <verb>` alias (scripts.cli)."""

import sys

from scripts.cli import main

if __name__ == "__main__":
    sys.exit(main())
