"""The one sanitizer for untrusted text: token strings, model and file names, data sources, domains,
firing rules, progress files and paths, wherever they are shown (CLI tables, info, report, jobs,
errors, Markdown exports and the TUI). Control characters (ESC, BEL, CR, NUL, the C1 range, bidi
and other format characters, line and paragraph separators) become visible escapes, so nothing from a
cache or a data set can move the cursor, set a title, change colours or hide text; a backslash is
doubled so an escape shown is never mistaken for one written. Markup is the caller's: Rich output
wraps the result in Text (app.safe_text.plain), Markdown backslash-escapes its own specials."""
from __future__ import annotations

import unicodedata


def printable(text: object) -> str:
    out = []
    for ch in str(text):
        if ch == "\\":
            out.append("\\\\")
        elif unicodedata.category(ch) in ("Cc", "Cf", "Zl", "Zp", "Cs"):
            out.append(repr(ch)[1:-1] if ord(ch) > 0xFF or ch in "\n\r\t" else f"\\x{ord(ch):02x}")
        else:
            out.append(ch)
    return "".join(out)
