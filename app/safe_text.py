"""Untrusted text (token strings, model and file names, anything read from a cache, a progress file
or a data source) made safe for a terminal. `printable` is the one sanitizer (engine.safe_text, so
the engine's Markdown export uses it too); `plain` is its result as Rich Text, never read as markup."""
from __future__ import annotations

from rich.text import Text

from ffnscope.engine.safe_text import printable

__all__ = ["plain", "printable"]


def plain(text: object, style: str = "") -> Text:
    """Untrusted text for Rich output: control characters escaped, markup never interpreted."""
    return Text(printable(text), style=style)
