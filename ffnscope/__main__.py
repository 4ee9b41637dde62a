"""`python -m ffnscope ARGS`: the command line, as jobs start it (never `-m app.cli`, which would
import a user's own app.py from the working directory)."""
import sys

from ffnscope.app.cli import main

sys.exit(main())
