"""The one Rich console factory of the command line: on a terminal text wraps at its width; written to
a pipe or a file, nothing is hard-wrapped, so a message stays one line at any length (tables still
lay out in 80 columns there, or COLUMNS)."""
from __future__ import annotations

from rich.console import Console


def console(stderr: bool = False) -> Console:
    out = Console(stderr=stderr)
    out.soft_wrap = not out.is_terminal
    return out
