"""`python -m app [flags]` is `concept-erase app [flags]`."""

import sys

from concept_erase.cli import main

raise SystemExit(main(["app", *sys.argv[1:]]))
