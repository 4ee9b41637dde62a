"""Untrusted text (token strings, model and file names) made safe for a terminal: control
characters become visible escapes, so nothing from a model or a data set can move the cursor,
change colours or hide text. Rich markup is never interpreted: callers wrap results in Text."""
from __future__ import annotations

import unicodedata


def printable(text: str) -> str:
    out = []
    for ch in text:
        if ch == "\\":
            out.append("\\\\")
        elif unicodedata.category(ch) in ("Cc", "Cf", "Zl", "Zp"):
            out.append(repr(ch)[1:-1] if ord(ch) > 0xFF or ch in "\n\r\t" else f"\\x{ord(ch):02x}")
        else:
            out.append(ch)
    return "".join(out)
